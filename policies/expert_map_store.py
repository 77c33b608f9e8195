"""The Expert Map Store of fMoE: past iterations' (semantic embedding, expert map) pairs.

Preallocated numpy arrays of ``capacity`` rows (FMOE_ALGORITHM.md, vocabulary and step 6):

- ``emb``   [C, E] float32: unit-normalised embeddings (zeros for a row stored without one);
  E is the embedding width, or ``project_dim`` when a fixed random projection (JL) is used
  to save memory (Mixtral's h=4096 costs 16 KiB per row in float32).
- ``maps``  [L, C, J] float32, layer-major so one layer's rows of all stored maps are one
  contiguous [C, J] block (the trajectory search reads one layer per step).
- ``cumsq`` [L, C]: cumulative squared norm of each stored map over layers 0..l, so the
  norm of any prefix is one lookup (cosine of prefixes without touching the maps), and
  ``inv_prefix`` [L, C] its inverse square root (0 for an all-zero prefix), so a search
  step scales dot products with one multiply.

Rows are appended while there is room; when full, each new row overwrites the stored row
with the highest redundancy RDY = (d/L) s_sem + ((L-d)/L) s_traj against it (step 6).
Every write bumps ``version`` and stamps the row, so a searcher holding running dot
products can refresh exactly the rows that changed (:meth:`changed_since`).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from specs.errors import InputError
from specs.limits import require_memory

FORMAT = "fmoe-expert-map-store"
FORMAT_VERSION = 1
_EPS = 1e-12


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm; all-zero rows stay zero. Returns float32 [N, D]."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > _EPS)


def safe_cosine(dots: np.ndarray, a_norm: np.ndarray, b_norm: np.ndarray) -> np.ndarray:
    """dots [N, M] / (a_norm [N, 1] * b_norm [M]); 0 where either norm is zero."""
    den = np.asarray(a_norm, np.float32).reshape(-1, 1) * np.asarray(b_norm, np.float32).reshape(
        1, -1
    )
    return np.divide(dots, den, out=np.zeros(np.shape(dots), np.float32), where=den > _EPS)


class ExpertMapStore:
    """Capacity-bounded store of (embedding, L x J map) rows with RDY replacement.

    Contract: ``capacity >= 1``; ``num_layers``/``num_experts`` > 0; every map added is
    finite with shape [L, J]; embeddings of one store share one width (fixed by the first
    embedding seen). ``size`` never exceeds ``capacity``.
    """

    def __init__(
        self,
        capacity: int,
        num_layers: int,
        num_experts: int,
        prefetch_distance: int = 1,
        project_dim: int | None = None,
        project_seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise InputError(f"expert map store capacity must be >= 1, got {capacity}")
        if num_layers < 1 or num_experts < 1:
            raise InputError(
                f"expert map store needs layers and experts >= 1, got {num_layers} x {num_experts}"
            )
        if project_dim is not None and project_dim < 1:
            raise InputError(f"embedding projection width must be >= 1, got {project_dim}")
        self.capacity = int(capacity)
        self.num_layers = int(num_layers)
        self.num_experts = int(num_experts)
        self.prefetch_distance = int(prefetch_distance)
        self.project_dim = project_dim
        self.project_seed = int(project_seed)
        self.input_dim: int | None = None
        self._proj: np.ndarray | None = None
        self.size = 0
        self.version = 0
        L, C, J = self.num_layers, self.capacity, self.num_experts
        require_memory(
            f"expert map store of {C} rows x {L} layers x {J} experts",
            4.0 * L * C * J + 8.0 * L * C + 8.0 * C,
            "lower the policy option store_capacity",
        )
        self.maps = np.zeros((L, C, J), np.float32)
        self.cumsq = np.zeros((L, C), np.float32)
        self.inv_prefix = np.zeros((L, C), np.float32)
        self.emb = np.zeros((C, 0), np.float32)
        self.row_version = np.zeros(C, np.int64)

    # -- embeddings ----------------------------------------------------------------------
    @property
    def embed_width(self) -> int:
        """Width of stored embeddings (0 until the first embedding arrives)."""
        return int(self.emb.shape[1])

    def _fix_input_dim(self, dim: int) -> None:
        if self.input_dim is None:
            self.input_dim = int(dim)
            width = self.project_dim if self.project_dim is not None else self.input_dim
            if self.project_dim is not None:
                rng = np.random.default_rng(self.project_seed)
                self._proj = (rng.standard_normal((self.input_dim, width)) / np.sqrt(width)).astype(
                    np.float32
                )
            self.emb = np.zeros((self.capacity, width), np.float32)
        elif dim != self.input_dim:
            raise InputError(f"embedding width {dim} differs from the store's {self.input_dim}")

    def prepare(self, emb: np.ndarray) -> np.ndarray:
        """Raw embeddings [N, H] -> stored form [N, E] (projected if configured, unit rows)."""
        emb = np.asarray(emb, np.float32)
        if emb.ndim != 2:
            raise InputError(f"embeddings must be [rows, width], got shape {emb.shape}")
        if not np.isfinite(emb).all():
            raise InputError("embeddings hold a non-finite value")
        self._fix_input_dim(emb.shape[1])
        if self._proj is not None:
            emb = emb @ self._proj
        return unit_rows(emb)

    # -- search primitives ---------------------------------------------------------------
    def semantic_scores(self, query: np.ndarray) -> np.ndarray:
        """Cosine of prepared queries [B, E] with every stored embedding: [B, size]."""
        if self.embed_width == 0 or query.shape[1] != self.embed_width:
            return np.zeros((query.shape[0], self.size), np.float32)
        return query @ self.emb[: self.size].T

    def layer_dots(self, layer: int, probs: np.ndarray) -> np.ndarray:
        """Dot products of rows [B, J] with layer ``layer`` of every stored map: [B, size]."""
        return probs @ self.maps[layer, : self.size].T

    def prefix_norms(self, layer: int) -> np.ndarray:
        """L2 norm of each stored map's prefix of layers 0..layer: [size]."""
        return np.sqrt(self.cumsq[layer, : self.size])

    def prefix_dots(self, rows: np.ndarray, observed: np.ndarray, upto: int) -> np.ndarray:
        """Dots of observed prefixes [B, L', J] (layers 0..upto-1) with stored rows ``rows``: [B, len(rows)]."""
        if upto <= 0 or len(rows) == 0:
            return np.zeros((observed.shape[0], len(rows)), np.float32)
        return np.einsum(
            "blj,lrj->br", observed[:, :upto], self.maps[:upto][:, rows], optimize=True
        )

    def changed_since(self, version: int) -> np.ndarray:
        """Indices of rows written after ``version`` (appended or replaced)."""
        return np.flatnonzero(self.row_version[: self.size] > version)

    def redundancy(self, s_sem: np.ndarray, s_traj: np.ndarray) -> np.ndarray:
        """RDY = (d/L) s_sem + ((L-d)/L) s_traj, with d clamped to [0, L]."""
        d = min(max(self.prefetch_distance, 0), self.num_layers)
        w = d / self.num_layers
        return w * s_sem + (1.0 - w) * s_traj

    # -- insertion ------------------------------------------------------------------------
    def add_batch(
        self,
        maps: np.ndarray,
        emb: np.ndarray | None = None,
        *,
        sem: np.ndarray | None = None,
        traj: np.ndarray | None = None,
        prepared: bool = False,
    ) -> np.ndarray:
        """Offer N finished iterations in order; returns the row each one was written to.

        ``maps`` [N, L, J]; ``emb`` [N, H] raw (or [N, E] already :meth:`prepare`-d when
        ``prepared``) or None. ``sem``/``traj`` [N, size] may carry the cosines of the new
        rows with the current rows (semantic; full-map trajectory) when the caller already
        has them (the policy's running search state); otherwise they are computed here.
        The result equals offering the rows one at a time.
        """
        maps = np.asarray(maps, np.float32)
        L, J = self.num_layers, self.num_experts
        if maps.ndim != 3 or maps.shape[1:] != (L, J):
            raise InputError(f"expert maps must have shape [rows, {L}, {J}], got {maps.shape}")
        if not np.isfinite(maps).all():
            raise InputError("expert maps hold a non-finite value")
        N = maps.shape[0]
        if N == 0:
            return np.zeros(0, np.int64)
        if emb is not None and len(emb) != N:
            raise InputError(f"{len(emb)} embeddings for {N} maps")
        q = (
            None
            if emb is None
            else (np.asarray(emb, np.float32) if prepared else self.prepare(emb))
        )
        if q is not None and q.shape[1] != self.embed_width:
            raise InputError(
                f"prepared embedding width {q.shape[1]} differs from the store's {self.embed_width}"
            )
        slots = np.empty(N, np.int64)
        if N <= self.capacity - self.size:  # room for all: plain appends, no similarity needed
            for i in range(N):
                slots[i] = self._write(self.size, maps[i], None if q is None else q[i])
                self.size += 1
            return slots
        flat = maps.reshape(N, L * J)
        # the new rows' norms: for their similarities to the stored rows (unless given) and
        # to each other (a batch of several)
        norms = np.linalg.norm(flat, axis=1) if traj is None or N > 1 else None
        n0, C = self.size, self.capacity
        s_sem = np.zeros((N, C), np.float32)
        s_traj = np.zeros((N, C), np.float32)
        if sem is not None:
            s_sem[:, :n0] = sem[:, :n0]
        elif q is not None:
            s_sem[:, :n0] = self.semantic_scores(q)
        if traj is not None:
            s_traj[:, :n0] = traj[:, :n0]
        else:
            dots = np.zeros((N, n0), np.float32)
            for layer in range(L):
                dots += maps[:, layer] @ self.maps[layer, :n0].T
            s_traj[:, :n0] = safe_cosine(dots, norms, np.sqrt(self.cumsq[L - 1, :n0]))
        if N > 1:  # similarities among the new rows, for rows written after them in this batch
            g_sem = q @ q.T if q is not None else np.zeros((N, N), np.float32)
            g_traj = safe_cosine(flat @ flat.T, norms, norms)
        for i in range(N):
            if self.size < C:
                slot = self.size
                self.size += 1
            else:
                slot = int(np.argmax(self.redundancy(s_sem[i], s_traj[i])))
            slots[i] = self._write(slot, maps[i], None if q is None else q[i])
            if i + 1 < N:
                s_sem[i + 1 :, slot] = g_sem[i + 1 :, i]
                s_traj[i + 1 :, slot] = g_traj[i + 1 :, i]
        return slots

    def _write(self, slot: int, m: np.ndarray, e: np.ndarray | None) -> int:
        self.maps[:, slot] = m
        cum = np.cumsum(np.einsum("lj,lj->l", m, m))
        self.cumsq[:, slot] = cum
        self.inv_prefix[:, slot] = np.divide(
            1.0, np.sqrt(cum), out=np.zeros_like(cum), where=cum > _EPS
        )
        if self.embed_width:
            self.emb[slot] = 0.0 if e is None else e
        self.version += 1
        self.row_version[slot] = self.version
        return slot

    # -- size and IO -----------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held by the preallocated arrays (maps, prefix norms, embeddings, projection)."""
        extra = 0 if self._proj is None else self._proj.nbytes
        arrays = (self.maps, self.cumsq, self.inv_prefix, self.emb, self.row_version)
        return int(sum(a.nbytes for a in arrays) + extra)

    def stored_maps(self) -> np.ndarray:
        """The stored maps as [size, L, J] (a copy)."""
        return np.ascontiguousarray(self.maps[:, : self.size].transpose(1, 0, 2))

    def save(self, path: str | Path) -> None:
        """Write the store to ``path`` (.npz, no pickle) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "format": np.array(FORMAT),
            "format_version": np.array(FORMAT_VERSION),
            "capacity": np.array(self.capacity),
            "num_layers": np.array(self.num_layers),
            "num_experts": np.array(self.num_experts),
            "prefetch_distance": np.array(self.prefetch_distance),
            "input_dim": np.array(-1 if self.input_dim is None else self.input_dim),
            "project_dim": np.array(-1 if self.project_dim is None else self.project_dim),
            "project_seed": np.array(self.project_seed),
            "maps": self.stored_maps(),
            "emb": self.emb[: self.size],
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, capacity: int | None = None) -> ExpertMapStore:
        """Read a store written by :meth:`save`; ``capacity`` None keeps the file's.

        Raises InputError naming the file and field when it is missing, malformed, or its
        rows exceed ``capacity``.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise InputError(
                f"{path}: not an expert map store ({exc.__class__.__name__})"
            ) from None
        need = ["format", "format_version", "capacity", "num_layers", "num_experts", "prefetch_distance",
                "input_dim", "project_dim", "project_seed", "maps", "emb"]  # fmt: skip
        missing = [k for k in need if k not in data]
        if missing:
            raise InputError(f"{path}: not an expert map store (missing field {missing[0]!r})")
        if str(data["format"]) != FORMAT or int(data["format_version"]) != FORMAT_VERSION:
            raise InputError(
                f"{path}: format {str(data['format'])!r} v{int(data['format_version'])} is not {FORMAT} v{FORMAT_VERSION}"
            )
        L, J = int(data["num_layers"]), int(data["num_experts"])
        maps, emb = data["maps"], data["emb"]
        if maps.ndim != 3 or maps.shape[1:] != (L, J):
            raise InputError(
                f"{path}: field 'maps' has shape {maps.shape}, expected [rows, {L}, {J}]"
            )
        if emb.ndim != 2 or (emb.shape[0] != maps.shape[0] and emb.shape[1] > 0):
            raise InputError(
                f"{path}: field 'emb' has shape {emb.shape}, expected [{maps.shape[0]}, width]"
            )
        if not (np.isfinite(maps).all() and np.isfinite(emb).all()):
            raise InputError(f"{path}: the store holds a non-finite value")
        cap = int(data["capacity"]) if capacity is None else int(capacity)
        if maps.shape[0] > cap:
            raise InputError(f"{path}: {maps.shape[0]} stored rows exceed capacity {cap}")
        pdim = int(data["project_dim"])
        store = cls(
            cap,
            L,
            J,
            int(data["prefetch_distance"]),
            None if pdim < 0 else pdim,
            int(data["project_seed"]),
        )
        if int(data["input_dim"]) >= 0:
            store._fix_input_dim(int(data["input_dim"]))
            if emb.shape[0] and emb.shape[1] != store.embed_width:
                raise InputError(
                    f"{path}: field 'emb' width {emb.shape[1]} differs from {store.embed_width}"
                )
        for i in range(maps.shape[0]):
            store._write(
                i,
                maps[i].astype(np.float32),
                emb[i].astype(np.float32) if store.embed_width else None,
            )
            store.size += 1
        return store
