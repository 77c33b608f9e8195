"""Importers of public routing-trace formats into a :class:`Workload`.

``IMPORTERS`` maps a format name to ``fn(path, **options) -> Workload``;
:func:`import_trace` looks the format up. Every importer raises InputError naming the
file, the field and the row (or line) for malformed input, and records in
``workload.provenance`` where the data came from and what it had to drop.

switch-json
    The router traces of the stratamoe-lab capture (keys ``expertsPerLayer``, ``layers``,
    ``topK``, ``tokens``, ``selections[token][layer] = [expert ids]``, ``source``), e.g.
    shared/data/switch_base_8_router_trace.json from google/switch-base-8. The model is
    the ``switch-base-8`` preset (6 sparse encoder layers, 8 experts, top-1).
    Request boundaries are not in the trace itself: they come from the capture metadata's
    ``prompt_spans`` (``metadata=``; by default a sibling file whose name ends in
    ``capture_metadata.json`` or ``capture-metadata.json``), one request per prompt with
    prompt_len = its tokens and output_len = 1 (an encoder runs one forward pass, the
    prefill). Prompt texts come from the prompt manifest (``manifest=``, found the same
    way). Without metadata the whole trace is one request. Only the selected expert is
    recorded, not its router probability, so top-K weights are set to 1/K (noted in the
    provenance).

routing-jsonl
    One JSON object per line and per (request, layer, token) with top-K ids and weights,
    the format vLLM routing loggers write. Field spellings accepted by default (first
    found wins): request ``req_id``/``request_id``/``problem_id``/``prompt_id``;
    layer ``layer``/``layer_id``/``layer_idx``; token ``token_idx``/``token_pos``/
    ``token_id``/``token_index``/``position``; ids ``topk_ids``/``experts``/
    ``expert_ids``/``topk_experts``; weights ``topk_weights``/``gating_probs``/
    ``weights``/``probs``. Name fields explicitly with ``fields={"request": "...",
    "layer": ..., "token": ..., "ids": ..., "weights": ...}``. A first line with
    ``"type": "meta"`` (model_id, layers_logged, top_k) is used when present; rows with a
    ``type`` other than ``route`` are skipped.
    Missing rows are reported, never invented: a token that lacks some layer's row is
    dropped (its request keeps the tokens before and after it, in order), and a truncated
    last line (a log cut while being written) is dropped; the counts go to
    ``provenance["import_report"]``. A log that covers only some MoE layers (loggers often
    record layer 0 only) yields a workload whose spec keeps just those layers.
    Without prompt lengths (``prompt_lens`` or ``prompt_len``) the first token row of a
    request is its prompt (prompt_len = 1) and every later row a decode iteration.
    Requests come in numeric order when every request id is a JSON integer, else in
    order of first appearance; tokens in order of their token index.

Over 450 lines on purpose: a registry of format importers, each short; they share the
row-level validation helpers at the bottom.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec
from specs.presets import load_model, model_preset_names
from traces.types import Request, Routing, Workload

Importer = Callable[..., Workload]


def _read_json(path: Path, what: str = "") -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such file{what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _sibling(path: Path, suffixes: tuple[str, ...]) -> Path | None:
    for cand in sorted(path.parent.iterdir()):
        if cand != path and cand.name.endswith(suffixes):
            return cand
    return None


def _resolve_spec(model: str | ModelSpec | None, default: str | None, path: Path) -> ModelSpec:
    if isinstance(model, ModelSpec):
        return model
    if model is None and default is None:
        raise InputError(f"{path}: the file does not name a known model; pass model= (--model)")
    return load_model(model or default)  # type: ignore[arg-type]


# -- switch-json -------------------------------------------------------------------------
def import_switch_json(
    path: str | Path,
    model: str | ModelSpec | None = None,
    metadata: str | Path | None = None,
    manifest: str | Path | None = None,
) -> Workload:
    """Import a switch-base-8 style JSON router trace (see the module docstring)."""
    path = Path(path)
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object with a 'selections' field")
    for key in ("selections", "layers", "expertsPerLayer", "topK"):
        if key not in raw:
            raise InputError(f"{path}: field {key!r} missing")
    spec = _resolve_spec(model, "switch-base-8", path)
    L, J, K = int(raw["layers"]), int(raw["expertsPerLayer"]), int(raw["topK"])
    for name, got, want in (
        ("layers", L, spec.num_moe_layers),
        ("expertsPerLayer", J, spec.num_experts),
        ("topK", K, spec.top_k),
    ):
        if got != want:
            raise InputError(f"{path}: field {name} is {got} but model {spec.name!r} has {want}")
    sel = raw["selections"]
    if not isinstance(sel, list):
        raise InputError(f"{path}: field selections must be a list of tokens")
    if "tokens" in raw and raw["tokens"] != len(sel):
        raise InputError(
            f"{path}: field tokens says {raw['tokens']} but selections has {len(sel)} rows"
        )
    for t, row in enumerate(sel):
        if not isinstance(row, list) or len(row) != L:
            n = len(row) if isinstance(row, list) else "no"
            raise InputError(
                f"{path}: field selections row {t}: has {n} layers, expected {L} (ragged rows)"
            )
        for layer, experts in enumerate(row):
            if not isinstance(experts, list) or len(experts) != K:
                raise InputError(
                    f"{path}: field selections row {t} layer {layer}: expected {K} expert ids, got {experts!r}"
                )
            for e in experts:
                if not isinstance(e, int) or not 0 <= e < J:
                    raise InputError(
                        f"{path}: field selections row {t} layer {layer}: expert {e!r} not in [0, {J})"
                    )
    ids = np.asarray(sel, dtype=np.int16).reshape(len(sel), L, K)
    weights = np.full(ids.shape, 1.0 / K, dtype=np.float32)

    meta_path = (
        Path(metadata)
        if metadata
        else _sibling(path, ("capture_metadata.json", "capture-metadata.json"))
    )
    man_path = (
        Path(manifest)
        if manifest
        else _sibling(path, ("prompt_manifest.json", "prompt-manifest.json"))
    )
    spans: list[tuple[str, int, int]] = [("trace", 0, len(sel))]
    notes: dict[str, Any] = {}
    if meta_path is not None:
        meta = _read_json(meta_path, " (capture metadata)")
        raw_spans = meta.get("prompt_spans") if isinstance(meta, dict) else None
        if not isinstance(raw_spans, list) or not raw_spans:
            raise InputError(f"{meta_path}: field prompt_spans missing or empty")
        spans, expect = [], 0
        for i, s in enumerate(raw_spans):
            try:
                sid, a, b = str(s["id"]), int(s["token_start"]), int(s["token_end_exclusive"])
            except (KeyError, TypeError, ValueError):
                raise InputError(
                    f"{meta_path}: field prompt_spans row {i}: needs id, token_start, token_end_exclusive"
                ) from None
            if a != expect or b <= a:
                raise InputError(
                    f"{meta_path}: field prompt_spans row {i}: span {a}..{b} does not continue at token {expect}"
                )
            spans.append((sid, a, b))
            expect = b
        if expect != len(sel):
            raise InputError(
                f"{meta_path}: field prompt_spans covers {expect} tokens but {path.name} has {len(sel)}"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if meta.get("trace_sha256"):
            notes["trace_sha256_verified"] = meta["trace_sha256"] == digest
        notes["metadata_file"] = meta_path.name
        notes["capture_environment"] = meta.get("environment")
    texts: dict[str, str] = {}
    if man_path is not None:
        man = _read_json(man_path, " (prompt manifest)")
        for i, p in enumerate(man.get("prompts", []) if isinstance(man, dict) else []):
            if not isinstance(p, dict) or "id" not in p or "text" not in p:
                raise InputError(f"{man_path}: field prompts row {i}: needs id and text")
            texts[str(p["id"])] = str(p["text"])
        notes["manifest_file"] = man_path.name

    reqs = [
        Request(
            request_id=sid,
            arrival_s=0.0,
            prompt_len=b - a,
            output_len=1,
            routing=Routing(ids[a:b], weights[a:b]),
            prompt_text=texts.get(sid),
            tags={"topic": sid.rsplit("-", 1)[0]} if "-" in sid else {},
        )
        for sid, a, b in spans
    ]
    source = raw.get("source") if isinstance(raw.get("source"), dict) else {}
    prov = {
        "source": "switch-json",
        "file": path.name,
        "model": (source.get("model") or {}).get("id", spec.name),
        "model_revision": (source.get("model") or {}).get("revision"),
        "software": source.get("software"),
        "scenario": raw.get("scenario"),
        "trace_version": raw.get("version"),
        "topk_weights": f"not recorded by the source; set to 1/{K}",
        **notes,
    }
    w = Workload(spec, reqs, prov)
    w.validate(f"{path}: ")
    return w


# -- routing-jsonl -----------------------------------------------------------------------
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "request": ("req_id", "request_id", "problem_id", "prompt_id", "seq_id"),
    "layer": ("layer", "layer_id", "layer_idx"),
    "token": ("token_idx", "token_pos", "token_id", "token_index", "position"),
    "ids": ("topk_ids", "experts", "expert_ids", "topk_experts"),
    "weights": ("topk_weights", "gating_probs", "weights", "probs"),
}

# Hugging Face model ids that vLLM loggers write, mapped to our presets.
_MODEL_IDS = {
    "mistralai/mixtral-8x7b": "mixtral-8x7b",
    "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "microsoft/phi-3.5-moe": "phi-3.5-moe",
    "allenai/olmoe-1b-7b": "olmoe-1b-7b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "deepseek-ai/deepseek-v2-lite": "deepseek-v2-lite",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
    "google/switch-base-8": "switch-base-8",
}


def preset_for_model_id(model_id: str) -> str | None:
    """Our preset for a Hugging Face model id (prefix match, case-insensitive), else None."""
    low = model_id.lower()
    for prefix, preset in _MODEL_IDS.items():
        if low.startswith(prefix) and preset in model_preset_names():
            return preset
    return None


def _pick(row: dict, names: tuple[str, ...]) -> Any:
    for n in names:
        if n in row:
            return row[n]
    return None


def _layer_subset_spec(spec: ModelSpec, layers: list[int]) -> ModelSpec:
    """The spec restricted to the MoE layers a log covers (layer indices are MoE-layer ids)."""
    if layers == list(range(spec.num_moe_layers)):
        return spec
    return spec.model_copy(
        update={
            "name": f"{spec.name}[moe layers {','.join(map(str, layers))}]",
            "num_layers": len(layers),
            "dense_layers": [],
            "sources": [
                *spec.sources,
                f"restricted to the MoE layers {layers} covered by an imported log",
            ],
        }
    )


def import_routing_jsonl(
    path: str | Path,
    model: str | ModelSpec | None = None,
    fields: dict[str, str] | None = None,
    layers: list[int] | None = None,
    prompt_len: int | None = None,
    prompt_lens: dict[str, int] | None = None,
) -> Workload:
    """Import a JSONL routing log (see the module docstring for the accepted fields)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    names = {
        k: ((fields or {})[k],) if k in (fields or {}) else v for k, v in FIELD_ALIASES.items()
    }
    unknown = set(fields or {}) - set(FIELD_ALIASES)
    if unknown:
        raise InputError(
            f"fields: unknown key(s) {sorted(unknown)} (known: {', '.join(FIELD_ALIASES)})"
        )

    meta: dict[str, Any] = {}
    rows: list[tuple[str, int, int, list, list | None, int]] = []
    truncated_tail = skipped = 0
    numeric_ids: list[bool] = []
    with path.open("r", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    last = len(lines)
    while last and not lines[last - 1].strip():
        last -= 1
    for lineno, line in enumerate(lines[:last], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if lineno == last:  # a log cut while being written: drop the partial line
                truncated_tail = 1
                continue
            raise InputError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {lineno}: expected a JSON object")
        kind = row.get("type")
        if kind == "meta":
            meta = row
            continue
        if kind is not None and kind != "route":
            skipped += 1
            continue
        vals = {k: _pick(row, names[k]) for k in FIELD_ALIASES}
        for k in ("request", "layer", "token", "ids"):
            if vals[k] is None:
                raise InputError(
                    f"{path}: line {lineno}: no {k} field (looked for {', '.join(names[k])})"
                )
        ids, wts = vals["ids"], vals["weights"]
        if not isinstance(ids, list) or not ids:
            raise InputError(
                f"{path}: line {lineno}: field {names['ids'][0]} must be a non-empty list"
            )
        if wts is not None and (not isinstance(wts, list) or len(wts) != len(ids)):
            raise InputError(
                f"{path}: line {lineno}: weights have {len(wts) if isinstance(wts, list) else 'no'} entries for {len(ids)} expert ids"
            )
        try:
            layer, token = int(vals["layer"]), int(vals["token"])
        except (TypeError, ValueError):
            raise InputError(f"{path}: line {lineno}: layer and token must be integers") from None
        numeric_ids.append(isinstance(vals["request"], int))
        rows.append((str(vals["request"]), layer, token, ids, wts, lineno))
    if not rows:
        raise InputError(f"{path}: no routing rows found")

    default_model = preset_for_model_id(str(meta["model_id"])) if meta.get("model_id") else None
    spec = _resolve_spec(model, default_model, path)
    K = len(rows[0][3])
    for *_, ids, _w, lineno in rows:
        if len(ids) != K:
            raise InputError(
                f"{path}: line {lineno}: {len(ids)} expert ids, but earlier rows have top_k {K}"
            )
    if K != spec.top_k:
        raise InputError(
            f"{path}: rows hold top_k {K} expert ids but model {spec.name!r} has top_k {spec.top_k}"
        )
    seen_layers = sorted({r[1] for r in rows})
    if layers is None:
        logged = meta.get("layers_logged")
        layers = (
            sorted(int(x) for x in logged) if isinstance(logged, list) and logged else seen_layers
        )
    extra = sorted(set(seen_layers) - set(layers))
    if extra:
        raise InputError(f"{path}: rows name layer(s) {extra} outside the covered layers {layers}")
    bad = [x for x in layers if not 0 <= x < spec.num_moe_layers]
    if bad:
        raise InputError(
            f"{path}: layer(s) {bad} outside the model's MoE layers [0, {spec.num_moe_layers})"
        )
    spec = _layer_subset_spec(spec, layers)
    L, J = len(layers), spec.num_experts
    col = {x: i for i, x in enumerate(layers)}

    # one array pass: (request, token) -> row; layer slots filled, missing ones counted
    req_names = list(dict.fromkeys(r[0] for r in rows))
    if all(numeric_ids):  # integer ids (problem numbers): numeric order, else order of appearance
        req_names.sort(key=int)
    req_index = {r: i for i, r in enumerate(req_names)}
    keys = np.array([(req_index[r[0]], r[2]) for r in rows], dtype=np.int64)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    T = len(uniq)
    ids_arr = np.full((T, L, K), -1, dtype=np.int64)
    w_arr = np.zeros((T, L, K), dtype=np.float32)
    filled = np.zeros((T, L), dtype=bool)
    for n, (req, layer, token, ids, wts, lineno) in enumerate(rows):
        t, c = inverse[n], col[layer]
        if filled[t, c]:
            raise InputError(
                f"{path}: line {lineno}: duplicate row for request {req!r} layer {layer} token {token}"
            )
        for e in ids:
            if not isinstance(e, int) or not 0 <= e < J:
                raise InputError(
                    f"{path}: line {lineno}: expert id {e!r} not in [0, {J}) for model {spec.name!r}"
                )
        if len(set(ids)) != K:
            raise InputError(f"{path}: line {lineno}: expert ids {ids} repeat an expert")
        ids_arr[t, c] = ids
        if wts is not None:
            w_arr[t, c] = wts
        filled[t, c] = True
    has_weights = all(r[4] is not None for r in rows)
    if not has_weights:
        w_arr[:] = 1.0 / K
    complete = filled.all(axis=1)
    rows_missing = int((~filled).sum())
    tokens_dropped = int((~complete).sum())

    reqs: list[Request] = []
    req_of_token = uniq[:, 0]
    gaps = 0
    for i, name in enumerate(req_names):
        sel = np.flatnonzero((req_of_token == i) & complete)
        if len(sel) == 0:
            continue
        tok = uniq[sel, 1]
        gaps += int((np.diff(tok) - 1).clip(min=0).sum())
        n = len(sel)
        p = (prompt_lens or {}).get(name, prompt_len or 1)
        if not 1 <= p <= n:
            raise InputError(
                f"{path}: request {name!r}: prompt length {p} but only {n} complete token rows"
            )
        reqs.append(
            Request(
                request_id=name,
                arrival_s=0.0,
                prompt_len=p,
                output_len=n - p + 1,
                routing=Routing(ids_arr[sel].astype(np.int16), w_arr[sel]),
            )
        )
    report = {
        "lines_read": len(rows),
        "rows_missing": rows_missing,
        "tokens_dropped": tokens_dropped,
        "token_index_gaps": gaps,
        "truncated_last_line": truncated_tail,
        "rows_skipped_other_type": skipped,
        "requests_dropped": len(req_names) - len(reqs),
    }
    prov = {
        "source": "routing-jsonl",
        "file": path.name,
        "model": meta.get("model_id", spec.name),
        "software": {k: meta[k] for k in ("vllm_version", "torch_version") if k in meta} or None,
        "layers_logged": layers,
        "topk_weights": "from the log" if has_weights else f"not in the log; set to 1/{K}",
        "import_report": report,
    }
    if not reqs:
        raise InputError(
            f"{path}: no request has a complete token row ({rows_missing} layer rows missing)"
        )
    w = Workload(spec, reqs, prov)
    w.validate(f"{path}: ")
    return w


IMPORTERS: dict[str, Importer] = {
    "switch-json": import_switch_json,
    "routing-jsonl": import_routing_jsonl,
}


def import_trace(fmt: str, path: str | Path, **options: Any) -> Workload:
    """Import ``path`` in format ``fmt`` (a key of IMPORTERS); options go to the importer."""
    if fmt not in IMPORTERS:
        raise InputError(f"unknown trace format {fmt!r} (known: {', '.join(sorted(IMPORTERS))})")
    try:
        return IMPORTERS[fmt](path, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise InputError(f"format {fmt!r}: {exc}") from None
        raise
