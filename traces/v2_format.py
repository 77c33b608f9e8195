"""Trace format version 2: the layout, the footer schema and the field encodings.

One file, written front to back in one pass (so a generator can stream into it)::

    b"FMOETRC2"                      8 bytes, the magic
    chunk 0, chunk 1, ...            each: its arrays, every one 8-byte aligned
    footer                           UTF-8 JSON (:class:`Footer`)
    trailer                          24 bytes: footer offset (u64), footer length (u64),
                                     CRC-32 of the footer (u32), b"FMT2"

A chunk holds consecutive requests (a few MiB of compact rows); its arrays are the rows
of those requests concatenated, and its CRC-32 (over the chunk's whole byte range) is in
the footer. The footer holds the request table (ids, arrivals, lengths, texts, tags,
which requests carry each optional field), the ModelSpec and provenance, and where each
chunk's arrays lie. Arrays (little-endian, C order):

``topk_ids`` [T, L, K] uint8 when J <= 256 else uint16; ``topk_weights`` [T, L, K] float16;
``gate_probs`` / ``lookahead``: ``dense`` [T', L, J] float16, or ``sparse`` top-N:
``<f>.ids`` [T', L, N] (id dtype), ``<f>.probs`` [T', L, N] float16 and ``<f>.rest``
[T', L] float16, the probability mass of the other J - N experts, spread evenly over
them when the row is read back; ``embeddings`` [T'', H] float16;
``prompt_embeddings`` [R', H'] float16. T' counts only the rows of requests that carry
the field (``fields[f].mask``; no mask: every request).

What a round trip keeps: ids, lengths, arrivals, texts and tags exactly; weights,
probabilities and embeddings at float16 (relative error <= 2^-11); sparse rows keep their
top-N exactly at float16 and the rest as its mean.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from traces.topk import top_k_values

MAGIC = b"FMOETRC2"
TRAILER_MAGIC = b"FMT2"
TRAILER_BYTES = 24
SCHEMA_VERSION = 2
ALIGN = 8
# A chunk is closed once its compact rows pass this size: large enough that per-chunk
# overheads (a read, a CRC, a few numpy calls) vanish, small enough that the reader's
# last two chunks are a few MiB next to the simulator's own memory.
CHUNK_TARGET_BYTES = 4 * 2**20
# Readers refuse chunks and footers above these before reading them (a corrupt header
# must not make the reader allocate what the file claims). A writer never makes a chunk
# larger than one request's rows plus the target; one request's rows of a 384-expert,
# 61-layer model with dense rows at the longest synthetic lengths (4096 tokens) is ~400 MiB.
MAX_CHUNK_BYTES = 2**30
MAX_FOOTER_BYTES = 2**30
PROB_FIELDS = ("gate_probs", "lookahead")
OPTIONAL_FIELDS = ("gate_probs", "lookahead", "embeddings", "prompt_embeddings")
F16 = np.dtype("<f2")


def id_dtype(num_experts: int) -> np.dtype:
    """The smallest unsigned type holding every expert id."""
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype("<u2")


def default_top_n(num_experts: int, top_k: int) -> int:
    """Sparse probability rows keep 2 x top-K entries: the chosen experts and as many
    runners-up (what a predictor ranks by); 0 (dense) unless sparse takes at most half
    the bytes (for few experts the saving is not worth losing the tail's shape)."""
    n = 2 * top_k
    if n >= num_experts:
        return 0
    per_sparse = n * (id_dtype(num_experts).itemsize + 2) + 2
    return n if 2 * per_sparse <= 2 * num_experts else 0


class ArrayRef(BaseModel):
    """Where one array of a chunk lies in the file."""

    model_config = ConfigDict(extra="forbid", strict=True)
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    dtype: str
    shape: list[int]


class Chunk(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    first_request: int = Field(ge=0)
    num_requests: int = Field(ge=1)
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)
    crc32: int = Field(ge=0, lt=2**32)
    arrays: dict[str, ArrayRef]


class FieldInfo(BaseModel):
    """An optional field: how it is stored and which requests carry it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    storage: Literal["dense", "sparse"] = "dense"
    top_n: int = Field(0, ge=0)
    width: int = Field(0, ge=0)
    mask: list[bool] | None = None


class RequestTable(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    ids: list[str]
    arrival_s: list[float]
    prompt_len: list[int]
    output_len: list[int]
    prompt_texts: list[str | None] | None = None
    tags: list[dict] | None = None


class Footer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["fmoe-trace"]
    schema_version: Literal[2]
    spec: dict
    provenance: dict
    written_by: dict
    id_dtype: Literal["uint8", "uint16"]
    fields: dict[Literal["gate_probs", "lookahead", "embeddings", "prompt_embeddings"], FieldInfo]
    requests: RequestTable
    chunks: list[Chunk]


# -- probability rows: dense or sparse top-N ----------------------------------------------
def encode_probs(rows: np.ndarray, top_n: int, ids_dt: np.dtype) -> dict[str, np.ndarray]:
    """[T, L, J] rows as stored: dense float16, or top-N ids/probs plus the rest's mass."""
    if top_n == 0:
        return {"": np.ascontiguousarray(rows, dtype=F16)}
    p = np.asarray(rows, dtype=np.float32)
    top, vals = top_k_values(p, top_n)  # argpartition's ids, in a stable descending sort
    rest = np.maximum(p.sum(axis=-1) - vals.sum(axis=-1), 0.0)
    return {
        ".ids": np.ascontiguousarray(top, dtype=ids_dt),
        ".probs": np.ascontiguousarray(vals, dtype=F16),
        ".rest": np.ascontiguousarray(rest, dtype=F16),
    }


def decode_sparse(ids: np.ndarray, probs: np.ndarray, rest: np.ndarray, J: int) -> np.ndarray:
    """Dense float16 [T, L, J] rows: the top-N values in place, the rest's mass spread evenly."""
    T, L, N = ids.shape
    fill = rest.astype(np.float32) / max(J - N, 1)
    out = np.broadcast_to(fill[..., None], (T, L, J)).astype(np.float16)
    np.put_along_axis(out, ids.astype(np.int64), probs, axis=-1)
    return out
