"""Where the one-GPU LRU-to-MIN gap goes: window-MIN beside LRU, fMoE and MIN.

For each setting of the fMoE table on one GPU (the three one-GPU presets give the same
hit rates; one is enough), it puts fMoE's and LRU's routed hit rates from table runs
(``experiments/fmoe_table.py --out DIR``: DIR/fmoe.csv, DIR/baselines.csv) beside
window-MIN's (:func:`sim.bounds.window_hit_rates`: Belady's choice knowing the next W
iterations' routing exactly, recency beyond) on the same run's demand sequence, cache,
scope and step pinning as the demand-only MIN bound. W = 1 (the current iteration) is
what a perfect per-token forecast can know; the rest of the gap needs knowledge of later
tokens. Each figure is followed by the share of the LRU-to-MIN gap it closes.

    python experiments/window_gap.py --out DIR --table SYN_DIR \\
        [--trace PATH:DIMS:DIR ...] [--hardware a100-80gb-pcie4] [--windows 1,2,4,8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments._common import write_table  # noqa: E402
from experiments.fmoe_vs_baselines import MODELS, SHARES, trace_workload  # noqa: E402


def window_row(workload: Any, hardware: str, share: float, windows: list[int], seed: int = 0):
    """{W: hit rate} of window-MIN (W = 0: LRU) and "MIN" (the bound) for ``workload``
    run as the table runs it (offline 70/30 split, batch 1, a cache of ``share`` of the
    experts on ``hardware``), or None where window-MIN does not apply."""
    from policies.placement import Placement
    from sim.bounds import run_bounds, window_hit_rates
    from sim.config import SimConfig
    from sim.memory import cache_capacities
    from specs.presets import load_hardware

    spec = workload.spec
    cache = max(spec.top_k, round(share * spec.num_moe_layers * spec.num_experts))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="lru",
        cache_experts=cache,
        train_fraction=0.7,
        seed=seed,
    )
    test = workload.split(0.7, seed)[1]
    caps = cache_capacities(
        cfg, Placement(spec.num_moe_layers, spec.num_experts, cfg.hardware.num_gpus)
    )
    closed = cfg.arrivals in ("closed", "schedule", "auto")  # auto with a training split
    rates = window_hit_rates(test, cfg, caps, closed, windows)
    if rates is None:
        return None
    bound = run_bounds(test, cfg, caps, closed, spill=False)["bound_hit_belady"]
    return {**rates, "MIN": bound}


def settings(table: str | None, traces: list[str], num_requests: int, seed: int):
    """(name, workload, runs folder) for the synthetic models and each PATH:DIMS:DIR."""
    from experiments.workload_stats import default_sets
    from specs.presets import load_model
    from traces.synth import SynthConfig, generate

    if table:
        knobs = default_sets()["current"]
        for m in MODELS:
            w = generate(load_model(m), SynthConfig(num_requests=num_requests, seed=seed, **knobs))
            yield f"{m} (synthetic)", m, w, Path(table)
    for t in traces:
        path, dims, folder = t.rsplit(":", 2)
        w = trace_workload(path, dims or None)
        yield f"{Path(path).stem} ({dims or 'own sizes'})", w.spec.name, w, Path(folder)


def _pick(df: pd.DataFrame, model: str, hw: str, share: float, policy: str) -> float | None:
    r = df[
        (df["model"] == model)
        & (df["hardware"] == hw)
        & (df["cache_share"] == share)
        & (df["policy"] == policy)
    ]
    return None if r.empty else float(r["hit_rate_routed"].iloc[0])


def _cell(h: float | None, lru: float | None, best: float) -> str:
    """A hit rate and the share of the LRU-to-MIN gap it closes."""
    if h is None or lru is None:
        return "-"
    return f"{h:.3f} ({(h - lru) / (best - lru):.0%})" if best > lru else f"{h:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments_out")
    p.add_argument("--table", default=None, help="fmoe_table --out folder of the synthetic runs")
    p.add_argument("--trace", action="append", default=[], metavar="PATH:DIMS:DIR")
    p.add_argument("--hardware", default="a100-80gb-pcie4")
    p.add_argument("--windows", default="1,2,4,8")
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    windows = [int(w) for w in a.windows.split(",")]
    rows = []
    for name, model, w, folder in settings(a.table, a.trace, a.num_requests, a.seed):
        runs = pd.concat([pd.read_csv(folder / "fmoe.csv"), pd.read_csv(folder / "baselines.csv")])
        for share in SHARES:
            rates = window_row(w, a.hardware, share, [0, *windows], a.seed)
            if rates is None:
                continue
            lru = _pick(runs, model, a.hardware, share, "lru")
            fmoe = _pick(runs, model, a.hardware, share, "fmoe")
            best = rates["MIN"]

            row: dict[str, Any] = {"workload": name, "cache": f"{share:.0%}"}
            row["LRU (sim)"] = "-" if lru is None else f"{lru:.3f}"
            row["window-MIN W=0"] = f"{rates[0]:.3f}"
            row["fMoE"] = _cell(fmoe, lru, best)
            for wd in windows:
                row[f"W={wd}"] = _cell(rates[wd], lru, best)
            row["MIN"] = f"{best:.3f}"
            rows.append(row)
            sys.stderr.write(f"{name} {share}\n")
    df = pd.DataFrame(rows)
    print(write_table(df, a.out, "window_gap.csv"))


if __name__ == "__main__":
    main()
