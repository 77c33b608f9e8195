"""fMoE's expert map store capacity study: hit rate and latency as C grows."""

import time

from experiments._common import parse, report
from sim.paper import study_store_capacity
from sim.paper_plots import lines

if __name__ == "__main__":
    setup, out = parse(__doc__)
    t0 = time.perf_counter()
    df = study_store_capacity(setup)
    df = df.groupby(["policy", "store_capacity"], as_index=False)[
        ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
    ].mean()
    png = lines(
        df,
        "store_capacity",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        out / "store_capacity.png",
        "Expert map store capacity",
    )
    report(
        df,
        ["store_capacity", "ttft_mean_s", "tpot_mean_s", "hit_rate"],
        out / "store_capacity.csv",
        [png],
        t0,
    )
