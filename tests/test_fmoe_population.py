"""fMoE's population prior and odds bins (policies/fmoe_jit.request_bins) on the shipped
fine-grained trained trace: experts popular across requests are ranked as such before a
request has chosen them, which is where frequency-based caching wins on real routing."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN_TRACE = ROOT / "tests" / "fixtures" / "tiny_byte_qwen_moe_decode.trace"
sys.path.insert(0, str(ROOT))


@cache
def _routed_hit(policy: str, share: float, **opts: object) -> float:
    from experiments.fmoe_vs_baselines import trace_workload
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware

    w = trace_workload(str(QWEN_TRACE), "qwen1.5-moe-a2.7b")
    cfg = SimConfig(
        model=w.spec,
        hardware=load_hardware("a100-80gb-pcie4"),
        policy=policy,
        policy_options=dict(opts),
        cache_experts=int(w.spec.num_moe_layers * w.spec.num_experts * share),
        train_fraction=0.7,
    )
    return float(simulate(w, cfg).metrics["hit_rate_routed"])


def test_population_prior_keeps_popular_experts_on_real_fine_grained_routing() -> None:
    with_prior = _routed_hit("fmoe", 0.25)
    without = _routed_hit("fmoe", 0.25, population_prior=False)
    assert with_prior > without


def test_fmoe_is_not_beaten_by_lfu_where_frequency_matters() -> None:
    assert _routed_hit("fmoe", 0.5) >= _routed_hit("lfu", 0.5)
