"""fMoE's prefetch distance study: hit rate and latency as d grows."""

import time

from experiments._common import parse, report
from sim.paper import study_prefetch_distance
from sim.paper_plots import lines

if __name__ == "__main__":
    setup, out = parse(__doc__)
    t0 = time.perf_counter()
    df = study_prefetch_distance(setup)
    df = df.groupby(["policy", "prefetch_distance"], as_index=False)[
        ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
    ].mean()
    png = lines(
        df,
        "prefetch_distance",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        out / "prefetch_distance.png",
        "Prefetch distance",
    )
    report(
        df,
        ["prefetch_distance", "ttft_mean_s", "tpot_mean_s", "hit_rate"],
        out / "prefetch_distance.csv",
        [png],
        t0,
    )
