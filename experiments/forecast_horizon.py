"""How many iterations ahead must an eviction see to close the LRU-to-MIN gap on one GPU?

On one GPU the link has no time for prefetches (docs/fmoe.md), so the hit rate is the
eviction's alone, and the issue's goal (close half of the gap between LRU and the
demand-only MIN bound) asks how well an eviction can foresee demands. This experiment
answers it without any policy: Belady-H (:mod:`traces.horizon`) knows the next H
iterations' demands exactly and nothing beyond, for H from 0 (LRU) to the whole run
(MIN), and for the rest of the current iteration (what a forecast of the running token's
later layers, fMoE's trajectory and lookahead, can know at best). The horizon at which
Belady-H closes half the gap is a floor on how far ahead, and how exactly, a forecast
must see for an eviction driven by it to reach the goal.

Workloads: the real traces the project ships (switch-base-8's encoder routing; the
decode routing of the tiny MoE trained on this machine) and the synthetic workloads of
docs/fmoe.md's table (30 requests, seed 0; current fitted defaults and the fMoE-era
ones), each measured on the test part of the table's 70/30 split, one GPU (one cache of
``share`` x all experts, an empty start), batch 1.

    python experiments/forecast_horizon.py [--out DIR] [--shares 0.25,0.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments._common import write_table  # noqa: E402
from experiments.workload_stats import FIXTURES, TRAINED_TRACE, default_sets  # noqa: E402
from traces.demand import demand_sequence, next_use  # noqa: E402
from traces.horizon import horizon_run  # noqa: E402
from traces.types import Workload  # noqa: E402

HORIZONS = (0, 1, 2, 4, 8, 16, 64)  # iterations; the whole run is added as MIN
MODELS = ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "phi-3.5-moe")


def workloads() -> dict[str, Workload]:
    """Name -> workload (the module doc's list)."""
    from specs.presets import load_model
    from traces.importers import import_trace
    from traces.io import load_workload
    from traces.synth import SynthConfig, generate

    out = {
        "switch-base-8 (real)": import_trace(
            "switch-json", FIXTURES / "switch_base_8_router_trace.json"
        ),
        "tiny MoE trained here (real decode)": load_workload(TRAINED_TRACE),
    }
    sets = default_sets()
    for name in ("current", "fmoe-era"):
        for model in MODELS:
            cfg = SynthConfig(num_requests=30, seed=0, **sets[name])
            out[f"{model}, synthetic ({name})"] = generate(load_model(model), cfg)
    return out


def measure(name: str, w: Workload, share: float) -> dict[str, object]:
    """Belady-H hit rates of ``w``'s test split at every horizon, with the gap closed."""
    test = w.split(0.7, 0)[1] if len(w.requests) > 1 else w
    spec = test.spec
    L = spec.num_moe_layers
    seq = demand_sequence(test)
    nxt = next_use(seq)
    capacity = max(int(seq.step_sizes().max()), round(share * L * spec.num_experts))
    row: dict[str, object] = {"workload": name, "share": share, "slots": capacity}
    n = seq.num_demands
    lru = horizon_run(seq, capacity, 0, nxt)[0] / n
    best = horizon_run(seq, capacity, seq.num_steps, nxt)[0] / n
    row["LRU"], row["MIN"] = round(lru, 3), round(best, 3)
    rest = horizon_run(seq, capacity, 0, nxt, iteration_steps=L)[0] / n
    row["rest of iteration"] = (
        f"{rest:.3f} ({(rest - lru) / (best - lru) if best > lru else 1.0:.0%})"
    )
    half = None
    for h in HORIZONS[1:]:
        hit = horizon_run(seq, capacity, h * L, nxt)[0] / n
        closed = (hit - lru) / (best - lru) if best > lru else 1.0
        row[f"H={h}"] = f"{hit:.3f} ({closed:.0%})"
        if half is None and closed >= 0.5:
            half = h
    row["half gap at H"] = "> 64" if half is None else half
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments_out")
    p.add_argument("--shares", default="0.25,0.5")
    a = p.parse_args()
    shares = [float(s) for s in a.shares.split(",")]
    rows = [measure(name, w, s) for name, w in workloads().items() for s in shares]
    df = pd.DataFrame(rows)
    print(write_table(df, a.out, "forecast_horizon.csv"))


if __name__ == "__main__":
    main()
