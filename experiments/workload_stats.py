"""Statistics of routing that decide how well fMoE's predictions and eviction can work,
measured on real traces and on the synthetic generator's defaults, side by side.

    python experiments/workload_stats.py [--capture TRACE ...] [--out DIR]
        [--defaults current|fmoe-era|original ...]

The synthetic rows are drawn with the current defaults (fitted to measured routing by
experiments/synth_defaults_fit.py), the fMoE-era defaults (chosen with policy results in
view, kept to compare) and the generator's first defaults; docs/workloads.md has the
history.

Per workload (each figure a mean over MoE layers; "chance" is what independent uniform
routing would give):

- entropy: per-layer popularity entropy / log2(J) (1 = every expert equally used);
- reuse: share of a token's K experts at a layer that the previous token of the same
  request also chose there (chance K/J); reuse_decode: the same over decode tokens only
  (each against the token before it; n/a for a prefill-only trace);
- next-layer top-1: P(the most likely successor of a chosen expert is chosen at the next
  layer), affinity over the trace itself (an optimistic, in-sample figure);
- next-layer MI: mutual information in bits between an expert chosen at l and at l+1;
- semantic recall: recall@K of the experts of the stored token whose embedding is
  nearest a measured token's (first 70% of requests stored, last 30% measured; n/a
  without embeddings);
- trajectory recall: recall@K at layer l of the stored token whose gate rows over layers
  0..l-d best match (cosine) the measured token's, d = min(3, L - 1) (fMoE step 2).

The real traces shipped with the project are small (tests/fixtures: switch-base-8's
encoder routing over 215 tokens; the vLLM Qwen1.5-MoE excerpt, one layer of one request
whose rows repeat; the decode routing of a tiny byte-level Mixtral-shaped MoE trained on
this machine's CPU by experiments/train_tiny_moe.py, a trained router but not Mixtral);
a trace captured with ``fmoe trace capture`` from a tiny preset runs random weights, so
it shows routing mechanics, not a trained model's. The figures are measured; none of
them is chosen.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from specs.errors import InputError  # noqa: E402
from traces import stats  # noqa: E402
from traces.types import Workload  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TRAINED_TRACE = FIXTURES / "tiny_byte_moe_decode.trace"
TRAINED_QWEN_TRACE = FIXTURES / "tiny_byte_qwen_moe_decode.trace"


def _rows(w: Workload) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids [N, L, K], request index [N], embeddings [N, H] or None) over all tokens."""
    ids, req = stats._flat_ids(w)
    embs = [r.routing.embeddings for r in w.requests]
    emb = np.concatenate(embs).astype(np.float64) if all(e is not None for e in embs) else None
    return ids, req, emb


def _recall(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean recall@K of predicted id sets [M, K] against actual [M, K]."""
    hit = (pred[:, :, None] == actual[:, None, :]).any(axis=2)
    return float(hit.mean()) if len(hit) else float("nan")


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def measure(w: Workload, max_tokens: int = 4000) -> dict[str, float | int | str | None]:
    """The module doc's figures for ``w``."""
    spec = w.spec
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    ids, req, emb = _rows(w)
    pop = stats.popularity(w)
    ent = -(pop * np.log2(np.where(pop > 0, pop, 1.0))).sum(axis=1) / np.log2(J)
    same = req[1:] == req[:-1]
    pos = np.concatenate([np.arange(r.routing.num_tokens) for r in w.requests] or [[]])
    decode = pos >= np.repeat(
        [r.prompt_len for r in w.requests], [len(r.routing.topk_ids) for r in w.requests]
    )
    reuse = reuse_decode = float("nan")
    if same.any():
        overlap = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=3).mean(axis=2)
        reuse = float(overlap[same].mean())
        dec = same & decode[1:]
        reuse_decode = float(overlap[dec].mean()) if dec.any() else float("nan")
    top1 = stats.affinity_top1(w)
    mi = stats.affinity_mi(w)
    out: dict[str, float | int | str | None] = {
        "model": spec.name,
        "layers x experts, top-K": f"{L} x {J}, {K}",
        "requests": len(w.requests),
        "tokens": int(len(ids)),
        "entropy": float(ent.mean()),
        "reuse": reuse,
        "reuse_decode": reuse_decode,
        "reuse_chance": K / J,
        "next_layer_top1": float(top1.mean()) if len(top1) else None,
        "next_layer_mi_bits": float(mi.mean()) if len(mi) else None,
    }
    # store = first 70% of requests, measured = the rest (capped for time)
    n_req = len(w.requests)
    cut = int(round(n_req * 0.7)) if n_req > 1 else 0
    train, test = req < cut, req >= cut
    if cut == 0 or not test.any():
        out["semantic_recall"] = out["trajectory_recall"] = None
        return out
    tr_ids, te_ids = ids[train], ids[test][:max_tokens]
    if emb is not None:
        s = _unit(emb[test][:max_tokens]) @ _unit(emb[train]).T
        best = s.argmax(axis=1)
        out["semantic_recall"] = float(
            np.mean([_recall(tr_ids[best, layer], te_ids[:, layer]) for layer in range(L)])
        )
    else:
        out["semantic_recall"] = None
    d = min(3, L - 1)
    if d < 1:
        out["trajectory_recall"] = None
        return out
    one_tr = np.zeros((len(tr_ids), L, J))
    one_te = np.zeros((len(te_ids), L, J))
    np.put_along_axis(one_tr, tr_ids, 1.0, axis=2)
    np.put_along_axis(one_te, te_ids, 1.0, axis=2)
    recalls = []
    for layer in range(d, L):
        a = one_te[:, : layer - d + 1].reshape(len(te_ids), -1)
        b = one_tr[:, : layer - d + 1].reshape(len(tr_ids), -1)
        best = (_unit(a) @ _unit(b).T).argmax(axis=1)
        recalls.append(_recall(tr_ids[best, layer], te_ids[:, layer]))
    out["trajectory_recall"] = float(np.mean(recalls))
    return out


def _kind(w: Workload) -> str:
    """How a captured trace's weights came about: a tiny preset's are random."""
    from specs.presets import load_model, model_preset_names

    name = w.provenance.get("model")
    if name in model_preset_names() and load_model(name).hf_recipe is not None:
        return "captured, random weights"
    return "captured, trained here" if "training" in w.provenance else "captured"


def default_sets() -> dict[str, dict[str, object]]:
    """Synthetic knob sets to measure: the current defaults, the fMoE-era ones (chosen with
    policy results in view) and the generator's first ones (experiments/synth_defaults_fit.py)."""
    from experiments.synth_defaults_fit import FMOE_ERA, ORIGINAL

    return {"current": {}, "fmoe-era": FMOE_ERA, "original": ORIGINAL}


def workloads(captures: list[str], sets: list[str] | None = None) -> dict[str, Workload]:
    """The real traces the project ships, any captured ones, and the synthetic knob sets
    ``sets`` of :func:`default_sets` (all when None)."""
    from specs.presets import load_model
    from traces.importers import import_trace
    from traces.io import load_workload
    from traces.synth import SynthConfig, generate

    out: dict[str, Workload] = {
        "switch-base-8 (real, fixture)": import_trace(
            "switch-json", FIXTURES / "switch_base_8_router_trace.json"
        ),
        "qwen1.5-moe vLLM excerpt (real, 1 layer)": import_trace(
            "routing-jsonl", FIXTURES / "vllm_qwen1.5_moe_routes_excerpt.jsonl"
        ),
        "tiny byte-level MoE trained here (real decode, fixture)": load_workload(TRAINED_TRACE),
        "tiny byte-level Qwen-shaped MoE trained here (real decode, fixture)": load_workload(
            TRAINED_QWEN_TRACE
        ),
    }
    for path in captures:
        w = load_workload(path)
        out[f"{Path(path).stem} ({_kind(w)})"] = w
    known = default_sets()
    for name in known if sets is None else sets:
        if name not in known:
            raise InputError(f"--defaults: unknown set {name!r} (known: {', '.join(known)})")
        for model in ("switch-base-8", "mixtral-8x7b"):
            cfg = SynthConfig(num_requests=40, seed=0, **known[name])
            out[f"synthetic, {name} defaults ({model})"] = generate(load_model(model), cfg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--capture", action="append", default=[], help="a captured trace file")
    p.add_argument("--out", default="experiments_out")
    p.add_argument(
        "--defaults",
        action="append",
        default=None,
        help="synthetic defaults to measure (repeatable): current, fmoe-era, original; "
        "default all three",
    )
    a = p.parse_args()
    rows = []
    for name, w in workloads(a.capture, a.defaults).items():
        rows.append({"workload": name, **measure(w)})
    import pandas as pd

    from sim.paper import save_csv

    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_csv(df, out / "workload_stats.csv")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(df.to_string(index=False, float_format="{:.3f}".format))
    print(json.dumps({"wrote": str(out / "workload_stats.csv")}))


if __name__ == "__main__":
    main()
