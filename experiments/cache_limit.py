"""The paper's expert cache limit study: 6..96 GB total, fMoE vs the baselines."""

import time

from experiments._common import parse, report
from sim.paper import study_cache_limit
from sim.paper_plots import lines

if __name__ == "__main__":
    setup, out = parse(__doc__)
    t0 = time.perf_counter()
    df = study_cache_limit(setup)
    df = df.groupby(["policy", "cache_gb"], as_index=False, sort=False)[
        ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
    ].mean()
    png = lines(
        df,
        "cache_gb",
        [("tpot_mean_s", "TPOT mean (s)"), ("hit_rate", "hit rate")],
        out / "cache_limit.png",
        "Expert cache limit",
    )
    report(
        df,
        ["policy", "cache_gb", "ttft_mean_s", "tpot_mean_s", "hit_rate"],
        out / "cache_limit.csv",
        [png],
        t0,
    )
