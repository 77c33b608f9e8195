"""Helpers the baselines share: batch votes and fitting orders into the device caches."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from policies.base import PolicyContext
from policies.baseline_common import count_then_recency, layer_reserve, select_orders, union_top
from policies.cache import ExpertCache
from policies.placement import Placement
from tests.strategies import small_spec


@given(
    scores=arrays(
        np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=st.floats(0, 1)
    ),
    n=st.integers(0, 7),
)
def test_union_top_sums_each_rows_top_n(scores: np.ndarray, n: int) -> None:
    expected = np.zeros(scores.shape[1])
    for row in scores:
        for e in sorted(range(row.size), key=lambda i: (-row[i], i))[:n]:
            expected[e] += row[e]
    assert np.allclose(union_top(scores, n), expected)


def ctx_with(capacity: int, devices: int) -> PolicyContext:
    spec = small_spec(layers=2, experts=4, top_k=1)
    placement = Placement(2, 4, devices)
    caches = [
        ExpertCache(c, spec.expert_bytes, d)
        for d, c in enumerate(placement.split_budget(capacity, 1))
    ]
    return PolicyContext(spec, placement, caches)


def test_select_orders_fills_each_device_best_first_and_skips_cached() -> None:
    ctx = ctx_with(4, 2)  # 2 slots per device; device = (layer * 4 + expert) % 2
    ctx.caches[0].preload([(1, 0)])
    pri = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.0])
    lay = np.array([1, 1, 1, 1, 1, 1])
    exp = np.array([0, 2, 1, 3, 3, 2])
    got = [(o.layer, o.expert, o.priority) for o in select_orders(ctx, pri, lay, exp)]
    # device 0: (1,0) cached (takes a slot), (1,2) ordered; device 1: (1,1), (1,3);
    # the duplicate (1,3) is over device 1's budget and the zero priority is dropped
    assert got == [(1, 2, 0.8), (1, 1, 0.7), (1, 3, 0.6)]
    reserve = layer_reserve(ctx, 0, np.array([[0], [2]]))  # both on device 0
    assert reserve.tolist() == [2, 0]
    got = [(o.layer, o.expert) for o in select_orders(ctx, pri, lay, exp, reserve)]
    assert got == [(1, 1), (1, 3)]


def test_count_then_recency_orders_by_count_first() -> None:
    assert count_then_recency(1, 5.0) < count_then_recency(2, 0.0)
    assert count_then_recency(1, 3.0) < count_then_recency(1, 4.0)
