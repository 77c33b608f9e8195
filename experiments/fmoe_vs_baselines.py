"""fMoE against every baseline on every preset: one A100, one H100, one RTX 3090 and the
paper's 6 x RTX 3090 testbed; Mixtral-8x7B, Qwen1.5-MoE-A2.7B and Phi-3.5-MoE; expert
caches of 25% and 50% of the experts; offline (70% of the requests fill the stores, 30%
are measured), batch 1, on the bundled synthetic workload. Writes one CSV row per run
(hit rates, TPOT, TTFT, prefetch figures) and prints the table.

    python experiments/fmoe_vs_baselines.py --out experiments_out --num-requests 30

``--trace FILE`` runs the same comparison on a given (real) trace instead: its requests,
in file order (the first 70% fill the stores), with the trace's own ModelSpec, or, with
``--trace-dims PRESET``, with that preset's per-layer sizes and costs on the trace's
layers (the routing of one model priced as another's experts; the preset must have the
trace's experts and top-K). ``--models`` is then ignored.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd

MODELS = ["mixtral-8x7b", "qwen1.5-moe-a2.7b", "phi-3.5-moe"]
HARDWARE = ["a100-80gb-pcie4", "h100-pcie5", "rtx3090-pcie4", "paper-6x3090"]
SHARES = [0.25, 0.5]
POLICIES = [
    "fmoe",
    "lru",
    "lfu",
    "deepspeed",
    "mixtral-offloading",
    "promoe",
    "moe-infinity",
    "oracle",
]
KEEP = [
    "hit_rate",
    "hit_rate_routed",
    "tpot_mean_s",
    "ttft_mean_s",
    "prefetches_issued",
    "prefetch_accuracy",
    "prefetch_timely",
    "prefetch_late",
    "prefetch_wasted",
    "evictions_by_prefetch",
    "stall_s",
    "bound_hit_belady",
    "bound_tpot_s",
]


def parse_synth(pairs: list[str]) -> dict[str, Any]:
    """``K=V`` synthetic-generator overrides (SynthConfig fields); each V is read as JSON
    (numbers, ``null``, lists), else kept as a string."""
    import json

    out: dict[str, Any] = {}
    for kv in pairs:
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def trace_workload(path: str, dims: str | None = None) -> Any:
    """The workload of trace ``path``: its own spec, or preset ``dims``'s sizes on the
    trace's MoE layers (experts and top-K must match; InputError otherwise)."""
    from specs.errors import InputError
    from specs.presets import load_model
    from traces.io import load_workload

    w = load_workload(path)
    if dims is None:
        return w
    base, own = load_model(dims), w.spec
    if (base.num_experts, base.top_k) != (own.num_experts, own.top_k):
        raise InputError(
            f"--trace-dims {dims}: {base.num_experts} experts top-{base.top_k}, the trace "
            f"has {own.num_experts} top-{own.top_k}"
        )
    spec = base.model_copy(
        update={
            "name": f"{own.name} routing, {dims} sizes",
            "num_layers": own.num_moe_layers,
            "dense_layers": [],
            "sources": [*base.sources, f"layers: {own.num_moe_layers} of trace {path}"],
        }
    )
    return load_workload(path, spec)


def _job(args: tuple[Any, ...]) -> dict[str, Any]:
    """One run: (model, hardware, cache share, policy, requests, seed, fmoe options[,
    synth overrides[, trace, trace dims]]) -> one CSV row; a trace replaces the model's
    synthetic workload."""
    from sim.config import SimConfig
    from sim.run import simulate
    from sim.sweep import single_thread_blas
    from specs.errors import InputError
    from specs.presets import load_hardware, load_model
    from traces.synth import SynthConfig, generate

    single_thread_blas()
    model, hw, share, policy, n, seed, fmoe_opts = args[:7]
    synth = args[7] if len(args) > 7 else {}
    trace, dims = args[8:10] if len(args) > 8 else (None, None)
    if trace is not None:
        workload = trace_workload(trace, dims)
        spec, model = workload.spec, workload.spec.name
    else:
        spec = load_model(model)
        workload = generate(spec, SynthConfig(num_requests=n, seed=seed, **synth))
    cache = max(spec.top_k, round(share * spec.num_moe_layers * spec.num_experts))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hw),
        policy=policy,
        policy_options=fmoe_opts if policy == "fmoe" else {},
        cache_experts=cache,
        train_fraction=0.7,
        seed=seed,
    )
    t0 = time.perf_counter()
    row: dict[str, Any] = {"model": model, "hardware": hw, "cache_share": share}
    row.update(cache_experts=cache, policy=policy)
    try:
        m = simulate(workload, cfg).metrics
    except InputError as exc:  # e.g. the cache does not fit the GPU: say so in the row
        row["error"] = str(exc)
        return row
    row.update({k: m.get(k) for k in KEEP})
    row["wall_s"] = time.perf_counter() - t0
    return row


def _check_names(p: argparse.ArgumentParser, a: argparse.Namespace, models: list[str]) -> None:
    """Unknown presets, policies or a missing trace: one line and exit status 2 before any
    worker starts (a worker's error would otherwise surface as a traceback)."""
    from policies.registry import policy_class
    from specs.errors import InputError
    from specs.presets import load_hardware, load_model

    try:
        for h in a.hardware.split(","):
            load_hardware(h)
        for pol in a.policies.split(","):
            policy_class(pol)
        if a.trace is None:
            for m in models:
                load_model(m)
        elif not Path(a.trace).is_file():
            raise InputError(f"--trace {a.trace}: no such file")
        if a.trace_dims is not None:
            load_model(a.trace_dims)
    except InputError as e:
        p.error(str(e))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments_out")
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--hardware", default=",".join(HARDWARE))
    p.add_argument("--name", default="fmoe_vs_baselines")
    p.add_argument(
        "--fmoe-opt", action="append", default=[], metavar="K=V", help="an fmoe policy option"
    )
    p.add_argument("--trace", default=None, help="a trace file instead of synthetic workloads")
    p.add_argument("--trace-dims", default=None, help="price the trace as this preset's experts")
    a = p.parse_args()
    fmoe_opts = dict(kv.split("=", 1) for kv in a.fmoe_opt)
    models = [a.trace] if a.trace else a.models.split(",")
    _check_names(p, a, models)
    jobs = [
        (m, h, s, pol, a.num_requests, a.seed, fmoe_opts, {}, a.trace, a.trace_dims)
        for m in models
        for h in a.hardware.split(",")
        for s in SHARES
        for pol in a.policies.split(",")
    ]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sim.paper import save_csv

    rows = []
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=get_context("spawn")) as pool:
        for i, row in enumerate(pool.map(_job, jobs), 1):
            rows.append(row)
            save_csv(pd.DataFrame(rows), out / f"{a.name}.csv")  # so far (atomic)
            sys.stderr.write(f"\r{a.name}: {i}/{len(jobs)} runs")
    sys.stderr.write("\n")
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 220, "display.max_rows", 500):
        print(df.drop(columns=["wall_s"]).to_string(index=False, float_format="{:.4g}".format))


if __name__ == "__main__":
    main()
