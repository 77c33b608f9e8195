"""fMoE's prefetch distance study: hit rate and latency as d grows."""

from experiments._common import line_study
from sim.paper import study_prefetch_distance

if __name__ == "__main__":
    line_study(
        "prefetch_distance",
        __doc__,
        study_prefetch_distance,
        ["policy", "prefetch_distance"],
        "prefetch_distance",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        "Prefetch distance",
    )
