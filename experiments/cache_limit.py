"""The paper's expert cache limit study: 6..96 GiB total, fMoE vs the baselines."""

from experiments._common import line_study
from sim.paper import study_cache_limit

if __name__ == "__main__":
    line_study(
        "cache_limit",
        __doc__,
        study_cache_limit,
        ["policy", "cache_gb_budget"],
        "cache_gb_budget",
        [("tpot_mean_s", "TPOT mean (s)"), ("hit_rate", "hit rate")],
        "Expert cache limit",
    )
