"""``fmoe`` through the timing-free replay (policies/replay.py) on a trace with semantic structure."""

from __future__ import annotations

import pytest

from policies.registry import make_policy
from policies.replay import replay
from tests.strategies import small_spec
from tests.test_fmoe_policy import _topic_workload

SPEC = small_spec(layers=6, experts=16, top_k=2, hidden=12)
TRAIN, TEST = _topic_workload(SPEC, 40, seed=7).split(0.7, seed=1)


def _rate(name: str, batch_size: int, capacity: int, **opts) -> float:
    result = replay(
        TEST,
        make_policy(name, **opts),
        capacity_experts=capacity,
        batch_size=batch_size,
        training=TRAIN,
    )
    return result.hit_rate


@pytest.mark.parametrize("batch_size, capacity", [(1, 16), (4, 32)])
def test_fmoe_hit_rate_beats_lru_in_replay(batch_size, capacity):
    fmoe = _rate("fmoe", batch_size, capacity, prefetch_distance=2)
    lru = _rate("lru", batch_size, capacity)
    assert fmoe > lru + 0.1, (fmoe, lru)


def test_prediction_weighted_eviction_beats_plain_lfu_eviction():
    """The paper's caching ablation (LFU < fMoE) with the same predictions."""
    weighted = _rate("fmoe", 1, 24, prefetch_distance=2)
    lfu = _rate("fmoe", 1, 24, prefetch_distance=2, eviction="lfu")
    assert weighted > lfu, (weighted, lfu)


def test_replay_metadata_reports_the_store_and_sources():
    result = replay(
        TEST, make_policy("fmoe", store_capacity=50), capacity_experts=16, training=TRAIN
    )
    md = result.metadata
    assert md["policy"] == "fmoe" and md["prefetch_distance_used"] == 3  # family "test": default 3
    assert md["embedding_source"] == "token" and md["gate_rows_source"]["topk_weights"] == 0
    assert (
        md["store_rows"] == 50
        and md["store_writes"] == TRAIN.num_tokens + md["embedding_rows"]["token"]
    )
