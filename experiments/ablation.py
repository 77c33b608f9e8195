"""The paper's ablations: prediction (Speculate < hit count < Map(T) < Map(T+S) < Map(T+S+delta)),
caching (LRU < LFU < fMoE), prefetch admission, and lookahead (never / where measured right /
always)."""

from experiments._common import line_study
from sim.paper import study_ablation


def _indexed(setup):
    df = study_ablation(setup)
    # x axis: the variant's position within its part, in the paper's order
    order = {
        v: i
        for part in df["part"].unique()
        for i, v in enumerate(df[df["part"] == part]["variant"].unique())
    }
    return df.assign(variant_index=df["variant"].map(order))


if __name__ == "__main__":
    line_study(
        "ablation",
        __doc__,
        _indexed,
        ["part", "variant", "variant_index"],
        "variant_index",
        [("hit_rate", "hit rate"), ("tpot_mean_s", "TPOT mean (s)")],
        "Ablation (x: variant, in the table's order)",
    )
