"""Format version 2, lazily: a checked file's request rows on demand, in bounded memory.

:class:`TraceSource` reads a chunk when one of its requests' arrays is first used (and
checks the chunk's CRC-32 again: a file changed after it was opened is caught), decodes
the request's rows (ids to int16, weights to float32, sparse probability rows to dense
float16) and keeps raw chunks and decoded arrays in two LRU caches bounded in bytes.
:class:`StreamedWorkload` is a :class:`traces.types.Workload` whose requests read their
routing through it. :func:`traces.v2_reader.open_v2` builds both after its checks.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec
from traces import v2_format as fmt
from traces.types import Request, Routing, Workload

if TYPE_CHECKING:
    from traces.v2_reader import _Layout

# Decoded arrays live for two generations of accesses (see TraceSource.get); this cap
# only ends a generation early when one holds this much.
DECODED_CACHE_BYTES = 1024 * 2**20
# Raw chunks kept: the running requests are neighbours in the file (arrival order), and a
# chunk is read only when a request's rows are first decoded in a generation.
CHUNK_CACHE_COUNT = 2
# A generation ends after this many accesses, or twice the entries it holds if more.
MIN_GENERATION = 64
# ... or once it holds this many arrays: a pass that reads each request once (the bounds'
# demand file, `trace stats`) never reaches twice its entries in accesses, so without this
# every decoded array would stay (memory growing with the number of requests). A running
# batch re-reads its few hundred arrays every iteration, well within one generation.
MAX_GENERATION_ENTRIES = 1024


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(n)
    if len(data) != n:
        raise InputError(f"{path}: truncated (wanted {n} bytes at {offset}, got {len(data)})")
    return data


class TraceSource:
    """A checked version-2 file: request rows on demand, through two bounded caches.

    Decoded arrays are kept by generations, not by a fixed budget: an array survives
    while it is used at least once per generation (a generation ends after
    max(MIN_GENERATION, 2 x its entries) accesses), so the arrays of the running
    requests, which the executor reads every iteration, stay decoded, and a finished
    request's are dropped within two generations. Memory follows the working set, not
    the number of requests. Raw chunks: the last CHUNK_CACHE_COUNT read."""

    def __init__(self, path: Path, footer: fmt.Footer, spec: ModelSpec, lay: _Layout) -> None:
        self.path, self.footer, self.spec, self.lay = path, footer, spec, lay
        self.chunk_of = np.zeros(len(footer.requests.ids), dtype=np.int64)
        for ci, ch in enumerate(footer.chunks):
            self.chunk_of[ch.first_request : ch.first_request + ch.num_requests] = ci
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        self._young: dict[tuple[int, str], np.ndarray] = {}
        self._old: dict[tuple[int, str], np.ndarray] = {}
        self._young_bytes = 0
        self._accesses = 0

    @property
    def decoded_bytes(self) -> int:
        """Bytes of decoded arrays held now (both generations)."""
        return self._young_bytes + sum(a.nbytes for a in self._old.values())

    def has(self, name: str, i: int) -> bool:
        mask = self.lay.masks.get(name)
        return mask is not None and bool(mask[i])

    def tokens(self, i: int) -> int:
        return int(self.lay.tokens[i + 1] - self.lay.tokens[i])

    def _chunk(self, ci: int) -> bytes:
        buf = self._chunks.get(ci)
        if buf is not None:
            self._chunks.move_to_end(ci)
            return buf
        ch = self.footer.chunks[ci]
        try:
            buf = _read_at(self.path, ch.offset, ch.nbytes)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read chunk {ci} ({exc})") from None
        if zlib.crc32(buf) != ch.crc32:  # the file changed since it was opened
            raise InputError(f"{self.path}: chunk {ci}: checksum mismatch (the data is corrupt)")
        self._chunks[ci] = buf
        while len(self._chunks) > CHUNK_CACHE_COUNT:
            self._chunks.popitem(last=False)
        return buf

    def get(self, i: int, name: str) -> np.ndarray | None:
        """Request ``i``'s rows of ``name`` (read-only), None when it does not carry it."""
        key = (i, name)
        self._accesses += 1
        young = self._young
        arr = young.get(key)
        if arr is None:
            arr = self._old.pop(key, None)
            if arr is None:
                if name not in ("topk_ids", "topk_weights") and not self.has(name, i):
                    return None
                arr = self._decode(i, name)
                arr.flags.writeable = False
            young[key] = arr
            self._young_bytes += arr.nbytes
        if (
            self._accesses >= max(MIN_GENERATION, 2 * len(young))
            or len(young) >= MAX_GENERATION_ENTRIES
            or self._young_bytes > DECODED_CACHE_BYTES
        ):
            self._old, self._young = young, {}
            self._young_bytes, self._accesses = 0, 0
        return arr

    def _decode(self, i: int, name: str) -> np.ndarray:
        ci = int(self.chunk_of[i])
        ch = self.footer.chunks[ci]
        buf = self._chunk(ci)
        a = ch.first_request
        offs = self.lay.tokens if name.startswith("topk") else self.lay.fields[name]
        lo, hi = int(offs[i] - offs[a]), int(offs[i + 1] - offs[a])

        def part(key: str) -> np.ndarray:
            ref = ch.arrays[key]
            row = int(np.prod(ref.shape[1:], dtype=np.int64))
            dt = np.dtype(ref.dtype)
            start = ref.offset - ch.offset + lo * row * dt.itemsize
            flat = np.frombuffer(buf, dt, (hi - lo) * row, start)
            return flat.reshape((hi - lo, *ref.shape[1:]))

        if name == "topk_ids":
            return part(name).astype(np.int16)
        if name == "topk_weights":
            return part(name).astype(np.float32)
        info = self.footer.fields[name]
        if name in fmt.PROB_FIELDS and info.storage == "sparse":
            return fmt.decode_sparse(
                part(f"{name}.ids"), part(f"{name}.probs"), part(f"{name}.rest"),
                self.spec.num_experts,
            )  # fmt: skip
        out = part(name).copy()
        return out[0] if name == "prompt_embeddings" else out


class LazyRouting(Routing):
    """A request's routing, read from its trace file when an array is first used."""

    def __init__(self, source: TraceSource, index: int) -> None:  # no dataclass fields set
        self._src, self._i = source, index

    topk_ids = property(lambda self: self._src.get(self._i, "topk_ids"))  # type: ignore[assignment]
    topk_weights = property(lambda self: self._src.get(self._i, "topk_weights"))  # type: ignore[assignment]
    gate_probs = property(lambda self: self._src.get(self._i, "gate_probs"))  # type: ignore[assignment]
    embeddings = property(lambda self: self._src.get(self._i, "embeddings"))  # type: ignore[assignment]
    lookahead = property(lambda self: self._src.get(self._i, "lookahead"))  # type: ignore[assignment]

    @property
    def num_tokens(self) -> int:
        return self._src.tokens(self._i)

    def __repr__(self) -> str:
        return f"LazyRouting({self._src.path.name!r}, request {self._i})"


class _LazyRequest(Request):
    """A Request whose prompt embedding is read on demand too."""

    @property  # type: ignore[override]
    def prompt_embedding(self) -> np.ndarray | None:
        return self.routing._src.get(self.routing._i, "prompt_embeddings")

    @prompt_embedding.setter
    def prompt_embedding(self, value: Any) -> None:  # the dataclass __init__ assigns None
        if value is not None:
            raise AttributeError("a streamed request's prompt_embedding is read-only")


@dataclass
class StreamedWorkload(Workload):
    """A Workload read lazily from a version-2 file (same interface as Workload).

    ``validate`` only re-checks the request table: the rows were checked when the file
    was opened and each chunk's checksum is checked again whenever it is read.
    """

    source: TraceSource | None = None

    def _src_all(self, name: str) -> bool:
        src = self.source
        return bool(self.requests) and all(src.has(name, r.routing._i) for r in self.requests)

    @property
    def has_gate_probs(self) -> bool:
        return self._src_all("gate_probs")

    @property
    def has_embeddings(self) -> bool:
        return self._src_all("embeddings")

    @property
    def has_lookahead(self) -> bool:
        return self._src_all("lookahead")

    @property
    def has_prompt_embeddings(self) -> bool:
        return self._src_all("prompt_embeddings")

    def validate(self, where: str = "") -> None:
        ids = [r.request_id for r in self.requests]
        if len(set(ids)) != len(ids):
            raise InputError(f"{where}a request id appears twice")

    def info(self) -> dict[str, Any]:
        out = super().info()
        assert self.source is not None
        fields = self.source.footer.fields
        out["format"] = {
            "schema_version": fmt.SCHEMA_VERSION,
            "file_bytes": self.source.path.stat().st_size,
            "chunks": len(self.source.footer.chunks),
            "probability_rows": {
                k: (f"sparse top-{v.top_n}" if v.storage == "sparse" else "dense")
                for k, v in fields.items()
                if k in fmt.PROB_FIELDS
            },
        }
        return out

    def split(self, train_fraction: float = 0.7, seed: int = 0):
        train, test = super().split(train_fraction, seed)
        return (
            StreamedWorkload(train.spec, train.requests, train.provenance, self.source),
            StreamedWorkload(test.spec, test.requests, test.provenance, self.source),
        )
