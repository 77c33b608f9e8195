"""The paper's ablations: prediction (Speculate < hit count < Map(T) < Map(T+S) < Map(T+S+delta))
and caching (LRU < LFU < fMoE)."""

import time

from experiments._common import parse, report
from sim.paper import study_ablation
from sim.paper_plots import lines

if __name__ == "__main__":
    setup, out = parse(__doc__)
    t0 = time.perf_counter()
    df = study_ablation(setup)
    df = df.groupby(["part", "variant"], as_index=False, sort=False)[
        ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
    ].mean()
    png = lines(
        df.assign(x=df.groupby("part").cumcount()),
        "x",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        out / "ablation.png",
        "Ablation (x: variant index in the table)",
        group="part",
    )
    report(
        df,
        ["part", "variant", "ttft_mean_s", "tpot_mean_s", "hit_rate"],
        out / "ablation.csv",
        [png],
        t0,
    )
