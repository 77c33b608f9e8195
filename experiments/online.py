"""The online setup: 256 requests, Poisson arrivals at 2.91 req/s, stores starting empty,
continuous batching; per-policy metrics and the latency CDFs."""

import time

import pandas as pd

from experiments._common import parse, report
from sim.paper import save_csv, study_online
from sim.paper_plots import latency_cdf

if __name__ == "__main__":
    setup, out = parse(__doc__, default_requests=256)
    t0 = time.perf_counter()
    df, per_request = study_online(setup, num_requests=setup.num_requests)
    e2e = latency_cdf(
        {k: v["e2e_s"] for k, v in per_request.items()},
        out / "online_e2e_cdf.png",
        "end-to-end latency (s)",
        "Online: e2e latency CDF",
    )
    ttft = latency_cdf(
        {k: v["ttft_s"] for k, v in per_request.items()},
        out / "online_ttft_cdf.png",
        "TTFT (s)",
        "Online: TTFT CDF",
    )
    save_csv(
        pd.concat([v.assign(policy=k) for k, v in per_request.items()]),
        out / "online_requests.csv",
    )
    report(
        df,
        [
            "policy",
            "ttft_mean_s",
            "ttft_p99_s",
            "tpot_mean_s",
            "e2e_mean_s",
            "e2e_p99_s",
            "hit_rate",
        ],
        out / "online.csv",
        [e2e, ttft],
        t0,
    )
