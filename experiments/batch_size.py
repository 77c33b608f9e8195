"""Batch size 1..8 (continuous batching): latency and hit rate per policy."""

import time

from experiments._common import parse, report
from sim.paper import study_batch_size
from sim.paper_plots import lines

if __name__ == "__main__":
    setup, out = parse(__doc__)
    t0 = time.perf_counter()
    df = study_batch_size(setup)
    df = df.groupby(["policy", "batch"], as_index=False, sort=False)[
        ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
    ].mean()
    png = lines(
        df,
        "batch",
        [("tpot_mean_s", "TPOT mean (s)"), ("hit_rate", "hit rate")],
        out / "batch_size.png",
        "Batch size",
    )
    report(
        df,
        ["policy", "batch", "ttft_mean_s", "tpot_mean_s", "hit_rate"],
        out / "batch_size.csv",
        [png],
        t0,
    )
