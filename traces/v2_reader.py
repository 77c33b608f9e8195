"""Reading format version 2: check everything, then hand out requests lazily.

:func:`open_v2` checks, in this order and before allocating anything sized from the
file: the trailer (footer offset and length inside the file, below
``MAX_FOOTER_BYTES``), the footer's CRC-32, its JSON schema and version, the ModelSpec
(expert bytes > 0, ids fit), the request table (lengths >= 1, arrivals finite, in range,
sorted or sorted here with a note in ``provenance["load_notes"]``, texts strings, tags
objects, field masks booleans of the right length, widths > 0), and the chunk layout
(contiguous requests, arrays inside their chunk and ordered, chunks ordered and inside
the data region, every array's shape and dtype exactly what the request table implies;
all arithmetic on Python integers, so a header claiming 10^12 rows is refused without
reading further). Then it reads every chunk once (one chunk in memory at a time),
checks its CRC-32 and its values (ids in [0, J) and not repeated, weights finite, >= 0
and <= MAX_WEIGHT, probabilities in [0, 1], embeddings finite).

The workload it returns holds the request table and a :class:`traces.v2_lazy.TraceSource`; each
request's routing arrays are read from the file when first used (the chunk's CRC is
checked again) and kept in a bounded cache, so a simulation's memory does not grow with
the number of requests. Arrays handed out are read-only.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from specs.errors import InputError
from specs.jsonio import validation_message
from specs.model_spec import ModelSpec
from traces import integrity as ig
from traces import v2_format as fmt
from traces.v2_lazy import LazyRouting, StreamedWorkload, TraceSource, _LazyRequest, _read_at


def _fail_in(path: Path):
    def fail(field: str, msg: str) -> None:
        raise InputError(f"{path}: field {field}: {msg}")

    return fail


def read_footer(path: Path) -> tuple[fmt.Footer, int]:
    """The checked footer and its offset (where the data region ends)."""
    size = path.stat().st_size
    if size < len(fmt.MAGIC) + fmt.TRAILER_BYTES:
        raise InputError(f"{path}: truncated ({size} bytes is shorter than an empty trace)")
    trailer = _read_at(path, size - fmt.TRAILER_BYTES, fmt.TRAILER_BYTES)
    at, n, crc = struct.unpack("<QQI", trailer[:20])
    if trailer[20:] != fmt.TRAILER_MAGIC:
        raise InputError(f"{path}: truncated or corrupt (no trailer at the end of the file)")
    end = size - fmt.TRAILER_BYTES
    if at < len(fmt.MAGIC) or at + n != end:
        raise InputError(
            f"{path}: header: footer at {at} + {n} bytes does not end where the trailer starts "
            f"({end}); the file is truncated or corrupt"
        )
    if n > fmt.MAX_FOOTER_BYTES:
        raise InputError(f"{path}: header: footer of {n} bytes exceeds {fmt.MAX_FOOTER_BYTES}")
    raw = _read_at(path, at, n)
    if zlib.crc32(raw) != crc:
        raise InputError(f"{path}: footer checksum mismatch (the metadata is corrupt)")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: footer is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: footer is not a JSON object")
    version = data.get("schema_version")
    if version != fmt.SCHEMA_VERSION or data.get("format") != "fmoe-trace":
        raise InputError(
            f"{path}: field schema_version: unknown schema version {version!r} "
            "(this version of fmoe reads versions 1 and 2)"
        )
    try:
        return fmt.Footer.model_validate(data), at
    except ValidationError as exc:
        raise InputError(f"{path}: footer: {validation_message(exc)}") from None


@dataclass
class _Layout:
    """Row offsets implied by the request table (int64 [R+1] each)."""

    tokens: np.ndarray
    fields: dict[str, np.ndarray]  # rows of each optional field (prompt_embeddings: per request)
    masks: dict[str, np.ndarray]


def _expected_arrays(
    footer: fmt.Footer, spec: ModelSpec, lay: _Layout, a: int, b: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype str, shape) the chunk of requests [a, b) must hold."""
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    ids_dt = fmt.id_dtype(J).str
    T = int(lay.tokens[b] - lay.tokens[a])
    want = {"topk_ids": (ids_dt, (T, L, K)), "topk_weights": (fmt.F16.str, (T, L, K))}
    for name, info in footer.fields.items():
        n = int(lay.fields[name][b] - lay.fields[name][a])
        if n == 0:
            continue
        if name in fmt.PROB_FIELDS:
            if info.storage == "dense":
                want[name] = (fmt.F16.str, (n, L, J))
            else:
                N = info.top_n
                want[f"{name}.ids"] = (ids_dt, (n, L, N))
                want[f"{name}.probs"] = (fmt.F16.str, (n, L, N))
                want[f"{name}.rest"] = (fmt.F16.str, (n, L))
        else:
            want[name] = (fmt.F16.str, (n, info.width))
    return want


def _check_layout(path: Path, footer: fmt.Footer, spec: ModelSpec, data_end: int) -> _Layout:
    fail = _fail_in(path)
    t = footer.requests
    R = len(t.ids)
    for name in ("arrival_s", "prompt_len", "output_len"):
        if len(getattr(t, name)) != R:
            fail(f"requests.{name}", f"has {len(getattr(t, name))} entries for {R} requests")
    if len(set(t.ids)) != R:
        seen: set[str] = set()
        dup = next(x for x in t.ids if x in seen or seen.add(x))
        fail("requests.ids", f"request id {dup!r} appears twice")
    ig.check_texts(fail, t.prompt_texts, R)
    ig.check_tags(fail, t.tags, R)
    plen = np.array(t.prompt_len, dtype=object)
    olen = np.array(t.output_len, dtype=object)
    ig.check_lengths(fail, plen, olen)
    counts = [p + o - 1 for p, o in zip(t.prompt_len, t.output_len, strict=True)]
    tokens = np.array([0, *np.cumsum(counts, dtype=object)], dtype=object)
    fields, masks = {}, {}
    for name, info in footer.fields.items():
        if info.mask is not None and len(info.mask) != R:
            fail(f"fields.{name}.mask", f"has {len(info.mask)} entries for {R} requests")
        mask = np.ones(R, bool) if info.mask is None else np.array(info.mask, bool)
        per = [1] * R if name == "prompt_embeddings" else counts
        rows = [c if m else 0 for c, m in zip(per, mask.tolist(), strict=True)]
        fields[name] = np.array([0, *np.cumsum(rows, dtype=object)], dtype=object)
        masks[name] = mask
        if name in fmt.PROB_FIELDS:
            if info.storage == "sparse" and not 0 < info.top_n < spec.num_experts:
                fail(f"fields.{name}.top_n", f"{info.top_n} is not in [1, {spec.num_experts})")
        elif info.width < 1:
            fail(f"fields.{name}.width", "must be > 0 (an embedding needs at least one value)")
    lay = _Layout(tokens, fields, masks)
    # chunks: contiguous requests, ordered, inside the data region, arrays as implied
    nxt_req, nxt_byte = 0, len(fmt.MAGIC)
    for ci, ch in enumerate(footer.chunks):
        where = f"chunks.{ci}"
        if ch.first_request != nxt_req or ch.first_request + ch.num_requests > R:
            fail(where, f"requests {ch.first_request}+{ch.num_requests} do not follow {nxt_req}")
        if ch.offset < nxt_byte or ch.offset + ch.nbytes > data_end:
            fail(where, f"bytes {ch.offset}+{ch.nbytes} overlap or leave the data region")
        if ch.nbytes > fmt.MAX_CHUNK_BYTES:
            fail(where, f"{ch.nbytes} bytes exceeds {fmt.MAX_CHUNK_BYTES}")
        a, b = ch.first_request, ch.first_request + ch.num_requests
        want = _expected_arrays(footer, spec, lay, a, b)
        if set(ch.arrays) != set(want):
            fail(
                where, f"holds arrays {sorted(ch.arrays)}, the request table implies {sorted(want)}"
            )
        pos = ch.offset
        for name, ref in sorted(ch.arrays.items(), key=lambda kv: kv[1].offset):
            dt, shape = want[name]
            if ref.dtype != dt or tuple(ref.shape) != shape:
                fail(
                    f"{where}.{name}",
                    f"is {ref.dtype} {ref.shape}, the request table implies {dt} {list(shape)}",
                )
            size = int(np.prod(shape, dtype=object)) * np.dtype(dt).itemsize
            if ref.nbytes != size or ref.offset < pos or ref.offset + size > ch.offset + ch.nbytes:
                fail(f"{where}.{name}", f"bytes {ref.offset}+{ref.nbytes} are not inside its chunk")
            pos = ref.offset + size
        nxt_req, nxt_byte = b, ch.offset + ch.nbytes
    if nxt_req != R:
        fail("chunks", f"cover {nxt_req} of the {R} requests")
    return lay


# -- values -------------------------------------------------------------------------------
_F16_INF = 0x7C00


def _f16_bits_of(x: float) -> int:
    return int(np.array(x, dtype=fmt.F16).view(np.uint16))


def _check_f16(fail, field: str, a: np.ndarray, hi: float | None, where) -> None:
    """float16 values finite, and (hi given) >= 0 and <= hi, on their bit patterns (fast)."""
    u = a.view(np.uint16)
    bad = (u & _F16_INF) == _F16_INF
    if bad.any():
        fail(field, f"{where(int(np.argwhere(bad)[0][0]))} holds a non-finite value")
    if hi is None:
        return
    neg = u > 0x8000  # sign set and a non-zero magnitude (-0.0 is fine)
    if neg.any():
        fail(field, f"{where(int(np.argwhere(neg)[0][0]))} holds a negative value")
    over = u > _f16_bits_of(hi)
    if over.any():
        fail(field, f"{where(int(np.argwhere(over)[0][0]))} holds a value above {hi:g}")


def _views(buf: bytes, ch: fmt.Chunk) -> dict[str, np.ndarray]:
    return {
        name: np.frombuffer(
            buf, np.dtype(ref.dtype), int(np.prod(ref.shape)), ref.offset - ch.offset
        ).reshape(ref.shape)
        for name, ref in ch.arrays.items()
    }


def _check_chunk(path: Path, ci: int, ch: fmt.Chunk, buf: bytes, spec: ModelSpec) -> None:
    fail = _fail_in(path)
    if zlib.crc32(buf) != ch.crc32:
        raise InputError(
            f"{path}: chunk {ci} (requests {ch.first_request}..{ch.first_request + ch.num_requests - 1})"
            ": checksum mismatch (the data is corrupt)"
        )
    v = _views(buf, ch)
    J = spec.num_experts

    def where(n: int, _ci: int = ci) -> str:
        return f"chunk {_ci} row {n}"

    ig.check_ids(fail, v["topk_ids"], J, where)
    _check_f16(fail, "topk_weights", v["topk_weights"], ig.MAX_WEIGHT, where)
    for name, arr in v.items():
        if name.endswith(".ids"):
            if arr.size and int(arr.max()) >= J:
                fail(name, f"{where(int(np.argwhere(arr >= J)[0][0]))} holds an id not in [0, {J})")
        elif name.split(".")[0] in fmt.PROB_FIELDS:
            _check_f16(fail, name, arr, 1 + ig.PROB_TOL, where)
        elif name in ("embeddings", "prompt_embeddings"):
            _check_f16(fail, name, arr, None, where)


def open_v2(path: Path, spec: ModelSpec | None = None, verify: bool = True) -> StreamedWorkload:
    """Check a version-2 file (see the module doc) and return its lazy workload."""
    footer, data_end = read_footer(path)
    fail = _fail_in(path)
    ig.check_raw_spec(fail, footer.spec)
    try:
        file_spec = ModelSpec.model_validate(footer.spec)
    except ValidationError as exc:
        raise InputError(f"{path}: field spec: {validation_message(exc)}") from None
    ig.check_spec(fail, file_spec)
    spec = ig.check_spec_match(path, file_spec, spec)
    if footer.id_dtype != fmt.id_dtype(spec.num_experts).name:
        fail("id_dtype", f"{footer.id_dtype} is not the id type of {spec.num_experts} experts")
    arrivals = np.array(footer.requests.arrival_s, dtype=np.float64)
    order = ig.check_arrivals(fail, arrivals)
    lay = _check_layout(path, footer, spec, data_end)
    if verify:
        for ci, ch in enumerate(footer.chunks):
            _check_chunk(path, ci, ch, _read_at(path, ch.offset, ch.nbytes), spec)
    src = TraceSource(path, footer, spec, lay)
    t = footer.requests
    texts, tags = t.prompt_texts, t.tags
    reqs = [
        _LazyRequest(
            request_id=rid,
            arrival_s=float(arrivals[i]),
            prompt_len=int(t.prompt_len[i]),
            output_len=int(t.output_len[i]),
            routing=LazyRouting(src, i),
            prompt_text=texts[i] if texts is not None else None,
            tags=dict(tags[i]) if tags is not None and tags[i] else {},
        )
        for i, rid in enumerate(t.ids)
    ]
    prov = dict(footer.provenance)
    if order is not None:
        reqs = [reqs[i] for i in order.tolist()]
        prov["load_notes"] = [*prov.get("load_notes", []), ig.SORT_NOTE]
    return StreamedWorkload(spec, reqs, prov, src)
