"""When fMoE's similarity-aware threshold (step 3, delta = 1 - score) matters: the three
prediction variants (traj / traj+sem / traj+sem+delta) under match quality from strong
(the default synthetic workload and a 1000-row store) to weak (noisier routing, flatter
gate rows, a small store), offline 70/30 as in the quality table.

    python experiments/delta_regimes.py [--num-requests 30] [--workloads lmsys] [--out DIR]

Delta takes more than the top-K only when the predicted row's top-K mass is below
1 - score, i.e. when the best stored match is weak; ``widened`` counts such predictions
(of ``searches``, semantic + trajectory). Prints one row per (regime, variant) and writes
delta_regimes.csv into --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments._common import parse, report  # noqa: E402
from sim.paper import PaperSetup, run_quality, workloads_for  # noqa: E402

# regime -> (generator knobs, store capacity C)
REGIMES: dict[str, tuple[dict[str, Any], int]] = {
    "default (C=1000)": ({}, 1000),
    "small store (C=20)": ({}, 20),
    "noisy routing (noise 3)": ({"routing_noise": 3.0}, 1000),
    "noisy, flat gates (noise 3, T 3)": ({"routing_noise": 3.0, "gate_temperature": 3.0}, 1000),
    "noisy, flat, tiny store (T 5, C=5)": ({"routing_noise": 3.0, "gate_temperature": 5.0}, 5),
}
PREDICTIONS = ("traj", "traj+sem", "traj+sem+delta")


def study_delta_regimes(setup: PaperSetup) -> pd.DataFrame:
    """One row per (regime, prediction variant), means over the setup's workloads."""
    rows = []
    for regime, (knobs, capacity) in REGIMES.items():
        variants = {
            p: ("ablation: prediction", "fmoe", {"prediction": p, "store_capacity": capacity})
            for p in PREDICTIONS
        }
        df = run_quality(setup, variants, workloads=workloads_for(setup, **knobs), progress=False)
        for variant, part in df.groupby("variant", sort=False):
            meta = _counters(part)
            rows.append(
                {
                    "regime": regime,
                    "prediction": variant,
                    "hit_rate": part["hit_rate"].mean(),
                    "tpot_mean_s": part["tpot_mean_s"].mean(),
                    "widened": sum(m["predictions_widened_by_delta"] for m in meta),
                    "searches": sum(
                        m["semantic_searches"] + m["trajectory_searches"] for m in meta
                    ),
                    "orders": sum(m["orders_issued"] for m in meta),
                }
            )
        sys.stderr.write(f"delta_regimes: {regime} done\n")
    return pd.DataFrame(rows)


def _counters(part: pd.DataFrame) -> list[dict[str, int]]:
    """The fmoe counters of each run (run_quality's ``policy_metadata.*`` columns)."""
    return [
        {
            k: int(r[f"policy_metadata.{k}"])
            for k in (
                "predictions_widened_by_delta",
                "semantic_searches",
                "trajectory_searches",
                "orders_issued",
            )
        }
        for _, r in part.iterrows()
    ]


def main() -> int:
    setup, out = parse(__doc__.split("\n")[0], default_requests=30)
    t0 = time.perf_counter()
    df = study_delta_regimes(setup)
    cols = ["regime", "prediction", "hit_rate", "tpot_mean_s", "widened", "searches", "orders"]
    report(df, cols, out / "delta_regimes.csv", [], t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
