"""Writing format version 2 (see :mod:`traces.v2_format`) in one streaming pass.

:class:`TraceWriter` takes requests one at a time, keeps at most one chunk's rows in
memory, and writes to a temporary file in the target folder that is renamed onto the
target only when :meth:`TraceWriter.close` succeeds; on any error (or Ctrl-C) inside its
``with`` block the temporary file is removed and an existing target is left untouched.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec
from traces import integrity as ig
from traces import v2_format as fmt
from traces.types import Request


def software_versions() -> dict[str, str]:
    """Versions of what wrote a file (python, numpy, fmoe-sim)."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        from importlib.metadata import version

        versions["fmoe-sim"] = version("fmoe-sim")
    except Exception:  # not installed as a distribution (running from a checkout)
        versions["fmoe-sim"] = "unknown"
    return versions


def json_or_error(value: Any, what: str) -> Any:
    """``value`` unchanged when it is strict JSON (no NaN); else InputError naming ``what``."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} is not JSON-serializable ({exc})") from None
    return value


class TraceWriter:
    """Streams requests into a version-2 trace file (use as a context manager).

    ``gate_top_n``: entries kept per probability row (gate and lookahead); None picks
    :func:`traces.v2_format.default_top_n`, 0 stores dense rows. Every request is
    validated against ``spec`` as it is added (InputError names the request and field).
    """

    def __init__(
        self,
        path: str | Path,
        spec: ModelSpec,
        provenance: dict[str, Any] | None = None,
        *,
        gate_top_n: int | None = None,
        chunk_bytes: int = fmt.CHUNK_TARGET_BYTES,
    ) -> None:
        self.path = Path(path)
        self.spec = spec
        ig.check_spec(lambda f, m: _raise(f"model spec: field {f}: {m}"), spec)
        J, K = spec.num_experts, spec.top_k
        if gate_top_n is None:
            gate_top_n = fmt.default_top_n(J, K)
        if gate_top_n < 0:
            raise InputError(f"gate_top_n must be >= 0, got {gate_top_n}")
        self.top_n = 0 if gate_top_n >= J else gate_top_n
        self.provenance = dict(json_or_error(provenance or {}, "workload provenance"))
        self.ids_dt = fmt.id_dtype(J)
        self.chunk_bytes = chunk_bytes
        self._table: dict[str, list] = {
            k: [] for k in ("ids", "arrival_s", "prompt_len", "output_len", "prompt_texts", "tags")
        }
        self._masks: dict[str, list[bool]] = {f: [] for f in fmt.OPTIONAL_FIELDS}
        self._widths: dict[str, int] = {}
        self._seen: set[str] = set()
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._chunks: list[dict[str, Any]] = []
        self._fh: BinaryIO | None = None
        self._tmp: str | None = None
        self._pos = 0

    # -- lifecycle -----------------------------------------------------------------------
    def __enter__(self) -> TraceWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a trace file path")
        fd, self._tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._fh = os.fdopen(fd, "wb")
        self._write(fmt.MAGIC)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary file; the target path is untouched."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None

    def close(self) -> None:
        """Write the last chunk, the footer and the trailer, then rename onto the target."""
        if self._fh is None:
            return
        try:
            self._flush()
            footer = json.dumps(self._footer(), allow_nan=False).encode()
            at = self._pos
            self._write(footer)
            self._write(struct.pack("<QQI", at, len(footer), zlib.crc32(footer)))
            self._write(fmt.TRAILER_MAGIC)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            assert self._tmp is not None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except BaseException:
            self.abort()
            raise

    # -- adding requests -------------------------------------------------------------------
    def add(self, req: Request) -> None:
        """Validate ``req`` and queue it; a full chunk is written out."""
        if self._fh is None:
            raise RuntimeError("TraceWriter.add outside its with block")
        if req.request_id in self._seen:
            raise InputError(f"request id {req.request_id!r} appears twice")
        self._check(req)
        self._seen.add(req.request_id)
        t = self._table
        t["ids"].append(req.request_id)
        t["arrival_s"].append(float(req.arrival_s))
        t["prompt_len"].append(int(req.prompt_len))
        t["output_len"].append(int(req.output_len))
        t["prompt_texts"].append(req.prompt_text)
        t["tags"].append(json_or_error(dict(req.tags), f"request {req.request_id!r}: tags"))
        r = req.routing
        for name in fmt.OPTIONAL_FIELDS:
            arr = req.prompt_embedding if name == "prompt_embeddings" else getattr(r, name)
            self._masks[name].append(arr is not None)
        # encoded now (compact), so the caller's dense rows can go before the chunk fills
        self._pending.append(self._encode(req))
        self._pending_bytes += self._row_bytes(req)
        if self._pending_bytes >= self.chunk_bytes:
            self._flush()

    def _check(self, req: Request) -> None:
        tag = f"request {req.request_id!r}"
        req.validate(self.spec)
        where = _fail_for(tag)
        ig.check_weights(where, np.asarray(req.routing.topk_weights), lambda n: f"row {n}")
        if not (0 <= req.arrival_s <= ig.MAX_ARRIVAL_S):
            raise InputError(
                f"{tag}: arrival_s {req.arrival_s} is not in [0, {ig.MAX_ARRIVAL_S:g}]"
            )
        if req.prompt_text is not None and not isinstance(req.prompt_text, str):
            raise InputError(f"{tag}: prompt_text must be a string")
        for name in ("gate_probs", "lookahead"):
            arr = getattr(req.routing, name)
            if arr is not None and not _probs_in_range(arr):
                ig.check_probs(where, name, np.asarray(arr), lambda n: f"row {n}")
        for name, arr in (
            ("embeddings", req.routing.embeddings),
            ("prompt_embeddings", req.prompt_embedding),
        ):
            if arr is None:
                continue
            width = int(arr.shape[-1])
            if width < 1:
                raise InputError(f"{tag}: {name} has width 0")
            if self._widths.setdefault(name, width) != width:
                raise InputError(
                    f"{tag}: {name} is {width} wide, earlier requests' are {self._widths[name]}"
                )
            if np.abs(np.asarray(arr, np.float32)).max(initial=0) > np.finfo(np.float16).max:
                raise InputError(f"{tag}: {name} exceeds the float16 range of the format")

    def _row_bytes(self, req: Request) -> int:
        r, spec = req.routing, self.spec
        T, L, K, J = r.num_tokens, spec.num_moe_layers, spec.top_k, spec.num_experts
        n = T * L * K * (self.ids_dt.itemsize + 2)
        prob = L * (self.top_n * (self.ids_dt.itemsize + 2) + 2 if self.top_n else 2 * J)
        n += T * prob * ((r.gate_probs is not None) + (r.lookahead is not None))
        if r.embeddings is not None:
            n += r.embeddings.size * 2
        return n

    # -- chunks ------------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> None:
        assert self._fh is not None
        self._fh.write(data)
        self._pos += len(data)

    def _flush(self) -> None:
        parts = self._pending
        if not parts:
            return
        arrays: dict[str, np.ndarray] = {}
        names = [n for n in _ARRAY_ORDER if any(n in p for p in parts)]
        for name in names:
            have = [p[name] for p in parts if name in p]
            arrays[name] = have[0] if len(have) == 1 else np.concatenate(have)
        start, crc = self._pos, 0
        refs: dict[str, dict[str, Any]] = {}
        for name, arr in arrays.items():
            pad = -self._pos % fmt.ALIGN
            if pad:
                self._write(b"\0" * pad)
                crc = zlib.crc32(b"\0" * pad, crc)
            data = memoryview(np.ascontiguousarray(arr)).cast("B")
            refs[name] = {
                "offset": self._pos,
                "nbytes": len(data),
                "dtype": arr.dtype.str,
                "shape": [int(x) for x in arr.shape],
            }
            self._write(data)
            crc = zlib.crc32(data, crc)
        first = len(self._table["ids"]) - len(parts)
        self._chunks.append(
            {
                "first_request": first,
                "num_requests": len(parts),
                "offset": start,
                "nbytes": self._pos - start,
                "crc32": crc,
                "arrays": refs,
            }
        )
        self._pending, self._pending_bytes = [], 0

    def _encode(self, req: Request) -> dict[str, np.ndarray]:
        """One request's arrays as stored (a chunk concatenates its requests' arrays: every
        encoding is per row, so that equals encoding the concatenated rows)."""
        r = req.routing
        out: dict[str, np.ndarray] = {
            "topk_ids": np.asarray(r.topk_ids).astype(self.ids_dt),
            "topk_weights": np.asarray(r.topk_weights).astype(fmt.F16),
        }
        for name in fmt.PROB_FIELDS:
            rows = getattr(r, name)
            if rows is not None:
                for suffix, arr in fmt.encode_probs(rows, self.top_n, self.ids_dt).items():
                    out[name + suffix] = arr
        if r.embeddings is not None:
            out["embeddings"] = np.asarray(r.embeddings).astype(fmt.F16)
        if req.prompt_embedding is not None:
            out["prompt_embeddings"] = np.asarray(req.prompt_embedding).astype(fmt.F16)[None]
        return out

    def _footer(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name, mask in self._masks.items():
            if not any(mask):
                continue
            info: dict[str, Any] = {"mask": None if all(mask) else mask}
            if name in fmt.PROB_FIELDS:
                info["storage"] = "sparse" if self.top_n else "dense"
                info["top_n"] = self.top_n
            else:
                info["width"] = self._widths[name]
            fields[name] = info
        t = dict(self._table)
        if all(x is None for x in t["prompt_texts"]):
            t["prompt_texts"] = None
        if not any(t["tags"]):
            t["tags"] = None
        return {
            "format": "fmoe-trace",
            "schema_version": fmt.SCHEMA_VERSION,
            "spec": self.spec.model_dump(mode="json"),
            "provenance": self.provenance,
            "written_by": software_versions(),
            "id_dtype": self.ids_dt.name,
            "fields": fields,
            "requests": t,
            "chunks": self._chunks,
        }


# The order of a chunk's arrays in the file (as written before encoding moved per request).
_ARRAY_ORDER = (
    "topk_ids",
    "topk_weights",
    *(f + x for f in fmt.PROB_FIELDS for x in ("", ".ids", ".probs", ".rest")),
    "embeddings",
    "prompt_embeddings",
)


def _probs_in_range(arr: np.ndarray) -> bool:
    """All entries finite and in [0, 1 + PROB_TOL]: two reductions (a NaN fails both
    comparisons), so only a bad array pays for :func:`traces.integrity.check_probs`."""
    a = np.asarray(arr)
    return a.size == 0 or bool(a.min() >= 0 and a.max() <= 1 + ig.PROB_TOL)


def _raise(msg: str) -> None:
    raise InputError(msg)


def _fail_for(tag: str):
    def fail(field: str, msg: str) -> None:
        raise InputError(f"{tag}: {field}: {msg}")

    return fail
