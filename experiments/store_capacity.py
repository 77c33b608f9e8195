"""fMoE's expert map store capacity study: hit rate and latency as C grows."""

from experiments._common import line_study
from sim.paper import study_store_capacity

if __name__ == "__main__":
    line_study(
        "store_capacity",
        __doc__,
        study_store_capacity,
        ["policy", "store_capacity"],
        "store_capacity",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        "Expert map store capacity",
    )
