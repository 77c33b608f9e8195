"""Trace format version 1 (read, and written only by ``trace convert`` tests and fixtures).

Version 2 (:mod:`traces.v2_writer`, :mod:`traces.v2_reader`) is what the project writes;
v1 files still load through :func:`load_v1` and ``fmoe trace convert`` upgrades them. v1
has no checksum: flipped data bytes that stay in range cannot be detected (convert the
file to get one). Every structural and value check of the integrity layer
(:mod:`traces.integrity`) still runs.

Layout (schema version 1): safetensors arrays + JSON metadata, no pickle. All requests' token rows are concatenated; request ``i`` owns
rows ``offsets[i]:offsets[i+1]``.

tensors
    ``offsets`` int64 [R+1]; ``arrival_s`` float64 [R]; ``prompt_len``/``output_len``
    int64 [R]; ``topk_ids`` int16 [N, L, K]; ``topk_weights`` float32 [N, L, K].
    Optional per-token fields ``gate_probs`` [Ng, L, J], ``lookahead`` [Nl, L, J] and
    ``embeddings`` [Ne, H], and per-request ``prompt_embeddings`` [Rp, H'], stored at
    float16 or float32. An optional field held by only some requests also has a mask
    ``<field>_mask`` uint8 [R]; its rows are those requests' rows, in request order.
metadata key ``fmoe_trace`` (one JSON string)
    ``schema_version``, ``spec`` (the ModelSpec), ``provenance`` (source, model,
    software versions, ...), ``written_by`` (versions of the writer), ``request_ids``,
    ``prompt_texts`` (list or null) and ``tags`` (list of dicts or null).

Dtypes (what the round trip preserves): expert ids are stored as int16 (J <= 32767) and
loaded as int16; top-K weights as float32; float arrays given as float16 or float32
keep their dtype (float64 is narrowed to float32, the only lossy step); when requests
mix float16 and float32 for one field the field is stored as float32 (exact). So values
read back equal the values written, compared at the stored dtype.

Loading is vectorized: every check runs on the flat arrays, and each Request's routing
arrays are numpy views into them (no per-token Python work). The views share memory:
copy before mutating one request's arrays.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from specs.errors import InputError
from specs.jsonio import validation_message
from specs.model_spec import ModelSpec
from traces import integrity as ig
from traces.types import Request, Routing, Workload
from traces.v2_writer import json_or_error, software_versions

SCHEMA_VERSION = 1
V1_SCHEMA_VERSION = SCHEMA_VERSION
META_KEY = "fmoe_trace"
TOKEN_FIELDS = ("gate_probs", "lookahead", "embeddings")
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_MAX_EXPERTS = int(np.iinfo(np.int16).max)


# -- writing -------------------------------------------------------------------------------
def _float_dtype(arrays: list[np.ndarray]) -> np.dtype:
    """Stored dtype of a float field: float16 only when every part is float16."""
    if all(a.dtype == np.float16 for a in arrays):
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def _concat(arrays: list[np.ndarray], dtype: np.dtype, tail: tuple[int, ...]) -> np.ndarray:
    if not arrays:
        return np.zeros((0, *tail), dtype=dtype)
    return np.ascontiguousarray(np.concatenate([np.asarray(a, dtype=dtype) for a in arrays]))


def _software_versions() -> dict[str, str]:
    import safetensors

    return {**software_versions(), "safetensors": getattr(safetensors, "__version__", "unknown")}


def _tensors_and_meta(w: Workload) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    spec, reqs = w.spec, w.requests
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    if J > _MAX_EXPERTS:
        raise InputError(
            f"num_experts {J} exceeds {_MAX_EXPERTS}, the int16 id range of the format"
        )
    lengths = np.array([r.routing.num_tokens for r in reqs], dtype=np.int64)
    t: dict[str, np.ndarray] = {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "arrival_s": np.array([r.arrival_s for r in reqs], dtype=np.float64),
        "prompt_len": np.array([r.prompt_len for r in reqs], dtype=np.int64),
        "output_len": np.array([r.output_len for r in reqs], dtype=np.int64),
        "topk_ids": _concat([r.routing.topk_ids for r in reqs], np.dtype(np.int16), (L, K)),
        "topk_weights": _concat(
            [r.routing.topk_weights for r in reqs], np.dtype(np.float32), (L, K)
        ),
    }
    optional: dict[str, list[np.ndarray | None]] = {
        name: [getattr(r.routing, name) for r in reqs] for name in TOKEN_FIELDS
    }
    optional["prompt_embeddings"] = [r.prompt_embedding for r in reqs]
    for name, parts in optional.items():
        present = [p for p in parts if p is not None]
        if not present:
            continue
        if name == "prompt_embeddings" and len({p.shape for p in present}) > 1:
            raise InputError("prompt_embedding vectors have different lengths across requests")
        tail = present[0].shape[1:] if name != "prompt_embeddings" else present[0].shape
        stacked = [p if name != "prompt_embeddings" else p[None, :] for p in present]
        t[name] = _concat(stacked, _float_dtype(present), tail)
        if len(present) < len(parts):
            t[f"{name}_mask"] = np.array([p is not None for p in parts], dtype=np.uint8)
    texts = [r.prompt_text for r in reqs]
    tags = [r.tags for r in reqs]
    for r in reqs:
        json_or_error(r.tags, f"request {r.request_id!r}: tags")
    meta = {
        "schema_version": SCHEMA_VERSION,
        "format": "fmoe-trace",
        "spec": spec.model_dump(mode="json"),
        "provenance": json_or_error(w.provenance, "workload provenance"),
        "written_by": _software_versions(),
        "request_ids": [r.request_id for r in reqs],
        "prompt_texts": texts if any(x is not None for x in texts) else None,
        "tags": tags if any(tags) else None,
    }
    return t, meta


def save_v1(workload: Workload, path: str | Path) -> None:
    """Validate ``workload`` and write it as a version-1 file, atomically (temp file + rename).

    Raises InputError for an invalid workload (nothing is written). On any failure the
    temporary file is removed and an existing file at ``path`` is left untouched.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    workload.validate()
    tensors, meta = _tensors_and_meta(workload)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- reading -------------------------------------------------------------------------------
class _Checker:
    """Raises InputError messages that name the file, the field and the row."""

    def __init__(self, path: Path, offsets: np.ndarray, ids: list[str]):
        self.path, self.offsets, self.ids = path, offsets, ids

    def fail(self, field: str, msg: str) -> None:
        raise InputError(f"{self.path}: field {field}: {msg}")

    def where(self, flat_row: int, field_offsets: np.ndarray | None = None) -> str:
        offs = self.offsets if field_offsets is None else field_offsets
        req = int(np.searchsorted(offs, flat_row, side="right") - 1)
        req = min(max(req, 0), len(self.ids) - 1)
        return f"row {flat_row} (request {self.ids[req]!r} token {flat_row - int(offs[req])})"


def _read_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a readable trace file, truncated or corrupt ({exc})"
        ) from None
    return tensors, metadata


def _parse_meta(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if META_KEY not in metadata:
        raise InputError(f"{path}: not an fmoe trace file (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(metadata[META_KEY])
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: metadata {META_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: metadata {META_KEY!r} is not a JSON object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{path}: field schema_version: unknown schema version {version!r} "
            "(this version of fmoe reads versions 1 and 2)"
        )
    for key in ("spec", "request_ids"):
        if key not in meta:
            raise InputError(f"{path}: metadata lacks field {key!r}")
    return meta


def _need(path: Path, t: dict[str, np.ndarray], name: str, ndim: int, kinds: str) -> np.ndarray:
    if name not in t:
        raise InputError(f"{path}: field {name}: missing")
    arr = t[name]
    if arr.ndim != ndim:
        raise InputError(f"{path}: field {name}: has {arr.ndim} dimensions, expected {ndim}")
    if arr.dtype.kind not in kinds:
        raise InputError(f"{path}: field {name}: dtype {arr.dtype} is not allowed here")
    return arr


def _optional_rows(
    chk: _Checker, t: dict[str, np.ndarray], name: str, counts: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(present mask [R] bool, row offsets [R+1]) of an optional field, or (None, None)."""
    if name not in t:
        if f"{name}_mask" in t:
            chk.fail(f"{name}_mask", f"present without field {name}")
        return None, None
    R = len(counts)
    mask_arr = t.get(f"{name}_mask")
    if mask_arr is None:
        mask = np.ones(R, dtype=bool)
    else:
        if mask_arr.shape != (R,):
            chk.fail(f"{name}_mask", f"has shape {mask_arr.shape}, expected ({R},)")
        if mask_arr.dtype.kind not in "iub" or not np.isin(mask_arr, (0, 1)).all():
            chk.fail(f"{name}_mask", "values must be 0 or 1")
        mask = mask_arr.astype(bool)
    offs = np.concatenate([[0], np.cumsum(np.where(mask, counts, 0))]).astype(np.int64)
    if len(t[name]) != offs[-1]:
        chk.fail(name, f"has {len(t[name])} rows, but the requests holding it need {int(offs[-1])}")
    return mask, offs


def load_v1(path: str | Path, spec: ModelSpec | None = None) -> Workload:
    """Read a version-1 trace file (written by :func:`save_v1` or an older fmoe).

    ``spec``, when given, must have the file's MoE layers, experts and top-K (else
    InputError) and becomes the workload's spec. Any malformed, truncated or mismatched
    file raises InputError naming the file, the field and (where there is one) the row.
    """
    path = Path(path)
    t, metadata = _read_raw(path)
    meta = _parse_meta(path, metadata)
    ig.check_raw_spec(lambda f, m: _fail(path, f, m), meta["spec"])
    try:
        file_spec = ModelSpec.model_validate(meta["spec"])
    except ValidationError as exc:
        raise InputError(f"{path}: field spec: {validation_message(exc)}") from None
    ig.check_spec(lambda f, m: _fail(path, f, m), file_spec)
    spec = ig.check_spec_match(path, file_spec, spec)
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k

    ids_list = meta["request_ids"]
    if not isinstance(ids_list, list) or not all(isinstance(x, str) for x in ids_list):
        raise InputError(f"{path}: field request_ids: must be a list of strings")
    R = len(ids_list)
    offsets = _need(path, t, "offsets", 1, "iu").astype(np.int64)
    chk = _Checker(path, offsets, ids_list)
    if len(offsets) != R + 1:
        chk.fail("offsets", f"has {len(offsets)} entries for {R} requests (expected {R + 1})")
    if len(set(ids_list)) != R:
        dup = next(x for i, x in enumerate(ids_list) if x in ids_list[:i])
        chk.fail("request_ids", f"request id {dup!r} appears twice")
    scalars = {
        "arrival_s": _need(path, t, "arrival_s", 1, "f"),
        "prompt_len": _need(path, t, "prompt_len", 1, "iu").astype(np.int64),
        "output_len": _need(path, t, "output_len", 1, "iu").astype(np.int64),
    }
    for name, arr in scalars.items():
        if arr.shape != (R,):
            chk.fail(name, f"has {arr.shape[0]} entries for {R} requests")
    ids = _need(path, t, "topk_ids", 3, "iu")
    weights = _need(path, t, "topk_weights", 3, "f")
    N = ids.shape[0]

    # request table: ragged offsets, lengths, scalars
    if R == 0 and N:
        chk.fail("offsets", f"no requests own the {N} token rows")
    if R and (offsets[0] != 0 or offsets[-1] != N):
        chk.fail(
            "offsets", f"must run from 0 to the {N} token rows, got {offsets[0]}..{offsets[-1]}"
        )
    counts = np.diff(offsets) if R else np.zeros(0, dtype=np.int64)
    bad = np.flatnonzero(counts < 0)
    if len(bad):
        chk.fail("offsets", f"row {bad[0]}: offsets decrease (ragged or corrupt request table)")
    ig.check_lengths(chk.fail, scalars["prompt_len"], scalars["output_len"])
    expected = scalars["prompt_len"] + scalars["output_len"] - 1
    bad = np.flatnonzero(counts != expected)
    if len(bad):
        i = int(bad[0])
        chk.fail(
            "offsets",
            f"row {i} (request {ids_list[i]!r}): has {counts[i]} token rows, expected "
            f"prompt_len + output_len - 1 = {expected[i]} (ragged rows)",
        )
    arr_s = scalars["arrival_s"]
    order = ig.check_arrivals(chk.fail, arr_s)

    # routing arrays
    if ids.shape[1:] != (L, K):
        if ids.shape[1] != L:
            chk.fail("topk_ids", f"has {ids.shape[1]} layers, the model {spec.name!r} has {L}")
        chk.fail("topk_ids", f"has top_k {ids.shape[2]}, the model {spec.name!r} has top_k {K}")
    if weights.shape != ids.shape:
        chk.fail("topk_weights", f"has shape {weights.shape}, topk_ids has {ids.shape}")
    ig.check_ids(chk.fail, ids, J, chk.where)
    ig.check_weights(chk.fail, weights, chk.where)
    ids = ids.astype(np.int16, copy=False)
    weights = weights.astype(np.float32, copy=False)

    fields: dict[str, tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]] = {}
    for name in (*TOKEN_FIELDS, "prompt_embeddings"):
        unit = np.ones(R, dtype=np.int64) if name == "prompt_embeddings" else counts
        mask, offs = _optional_rows(chk, t, name, unit)
        if mask is None:
            fields[name] = (None, None, None)
            continue
        arr = t[name]
        if arr.dtype not in _FLOAT_DTYPES:
            chk.fail(name, f"dtype {arr.dtype} is not float16 or float32")
        want_ndim = 3 if name in ("gate_probs", "lookahead") else 2
        if arr.ndim != want_ndim:
            chk.fail(name, f"has {arr.ndim} dimensions, expected {want_ndim}")
        if want_ndim == 3 and arr.shape[1:] != (L, J):
            chk.fail(name, f"rows have shape {arr.shape[1:]}, expected (layers={L}, experts={J})")
        if want_ndim == 2 and arr.shape[1] < 1:
            chk.fail(name, "rows have width 0 (an embedding needs at least one value)")

        def where(n: int, _name: str = name, _offs: np.ndarray = offs) -> str:
            return f"row {n}" if _name == "prompt_embeddings" else chk.where(n, _offs)

        if want_ndim == 3:
            ig.check_probs(chk.fail, name, arr, where)
        else:
            ig.check_finite(chk.fail, name, arr, where)
        fields[name] = (mask, offs, arr)

    texts = meta.get("prompt_texts")
    ig.check_texts(chk.fail, texts, R)
    tags = meta.get("tags")
    ig.check_tags(chk.fail, tags, R)

    def view(name: str, i: int) -> np.ndarray | None:
        mask, offs, arr = fields[name]
        if mask is None or not mask[i]:
            return None
        return arr[offs[i] : offs[i + 1]]

    requests = []
    off = offsets.tolist()
    arrivals, plens, olens = (
        arr_s.tolist(),
        scalars["prompt_len"].tolist(),
        scalars["output_len"].tolist(),
    )
    for i, rid in enumerate(ids_list):
        a, b = off[i], off[i + 1]
        pe = view("prompt_embeddings", i)
        requests.append(
            Request(
                request_id=rid,
                arrival_s=float(arrivals[i]),
                prompt_len=int(plens[i]),
                output_len=int(olens[i]),
                routing=Routing(
                    topk_ids=ids[a:b],
                    topk_weights=weights[a:b],
                    gate_probs=view("gate_probs", i),
                    embeddings=view("embeddings", i),
                    lookahead=view("lookahead", i),
                ),
                prompt_text=texts[i] if texts is not None else None,
                prompt_embedding=pe[0] if pe is not None else None,
                tags=dict(tags[i]) if tags is not None and tags[i] else {},
            )
        )
    provenance = meta.get("provenance") or {}
    if not isinstance(provenance, dict):
        chk.fail("provenance", "must be a JSON object")
    provenance = dict(provenance)
    if order is not None:
        requests = [requests[i] for i in order.tolist()]
        provenance["load_notes"] = [*provenance.get("load_notes", []), ig.SORT_NOTE]
    return Workload(spec, requests, provenance)


def _fail(path: Path, field: str, msg: str) -> None:
    raise InputError(f"{path}: field {field}: {msg}")
