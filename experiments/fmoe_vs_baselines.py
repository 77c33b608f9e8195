"""fMoE against every baseline on every preset: one A100, one H100, one RTX 3090 and the
paper's 6 x RTX 3090 testbed; Mixtral-8x7B, Qwen1.5-MoE-A2.7B and Phi-3.5-MoE; expert
caches of 25% and 50% of the experts; offline (70% of the requests fill the stores, 30%
are measured), batch 1, on the bundled synthetic workload. Writes one CSV row per run
(hit rates, TPOT, TTFT, prefetch figures) and prints the table.

    python experiments/fmoe_vs_baselines.py --out experiments_out --num-requests 30
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


def _job(args: tuple[Any, ...]) -> dict[str, Any]:
    from sim.config import SimConfig
    from sim.run import simulate
    from sim.sweep import single_thread_blas
    from specs.errors import InputError
    from specs.presets import load_hardware, load_model
    from traces.synth import SynthConfig, generate

    single_thread_blas()
    model, hw, share, policy, n, seed, fmoe_opts, *rest = args
    knobs = rest[0] if rest else {}  # synthetic knobs over the defaults (workload_stats sets)
    spec = load_model(model)
    workload = generate(spec, SynthConfig(num_requests=n, seed=seed, **knobs))
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
    a = p.parse_args()
    fmoe_opts = dict(kv.split("=", 1) for kv in a.fmoe_opt)
    jobs = [
        (m, h, s, pol, a.num_requests, a.seed, fmoe_opts)
        for m in a.models.split(",")
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
