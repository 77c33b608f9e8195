"""The issue's quality table: hit rate and mean TPOT of fMoE, every baseline, the bounds and
fMoE's ablation variants (prediction traj / traj+sem / traj+sem+delta; eviction lru / lfu /
fmoe), simulated on Mixtral-8x7B (or --model) / paper-6x3090 with the synthetic LMSYS-like and
ShareGPT-like workloads (offline: 70% of requests fill the stores, 30% are measured).

    python -m experiments.quality [--model mixtral-8x7b] [--num-requests 20] [--cache-gb GiB]
                                  [--workers 2] [--out DIR]

Prints the table as Markdown (the README copies it) and whether each of the issue's claims
holds; writes quality.csv (every run's metrics) into --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from experiments._common import parse  # noqa: E402
from sim.paper import quality_checks, quality_table, run_quality, save_csv  # noqa: E402


def markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: hit rate and TPOT per workload and their means."""
    cols = [c for c in table.columns if c not in ("variant", "group")]
    head = ["variant", "group", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r["variant"]), str(r["group"])]
        # 4 significant digits: a small model's TPOT is ~0.02 s
        cells += [f"{r[c]:.4g}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    setup, out = parse(__doc__.split("\n")[0], default_requests=20)
    t0 = time.perf_counter()
    df = run_quality(setup)
    table = quality_table(df)
    save_csv(df, out / "quality.csv")
    print(
        f"{setup.model} on {setup.hardware}, {setup.cache_gb:g} GiB expert cache, "
        f"{setup.num_requests} requests per workload (70% fill the stores, 30% measured), "
        f"seed {setup.seed}; simulated with published hardware figures and synthetic workloads"
    )
    print()
    print(markdown(table))
    print()
    for c in quality_checks(table):
        print(f"- {'holds' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} ({c['detail']})")
    print(f"\nwrote {out / 'quality.csv'} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
