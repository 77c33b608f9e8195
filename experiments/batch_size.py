"""Batch size 1..8 (continuous batching): latency and hit rate per policy."""

from experiments._common import line_study
from sim.paper import study_batch_size

if __name__ == "__main__":
    line_study(
        "batch_size",
        __doc__,
        study_batch_size,
        ["policy", "batch_size"],
        "batch_size",
        [("tpot_mean_s", "TPOT mean (s)"), ("hit_rate", "hit rate")],
        "Batch size",
    )
