"""fMoE's deadline admission: the link time a layer step leaves prefetches, measured over
the span its gate interval covers (issue 20; docs/fmoe.md, "Router-only routing")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput
from tests.test_fmoe_deadline import FakeView, J, L, _bound, _start

COPY, COMPUTE = 1e-2, 1e-3  # one copy, one layer's compute (seconds)


def _gate_at(pol, layer: int, it: int, now: float) -> None:
    """Layer ``layer``'s gate at ``now`` chooses expert (layer + 1) % J: never the stored
    map's pick (layer % J), so the forecasts' learned chance stays low."""
    probs = np.full((1, J), 0.02, np.float32)
    probs[0, (layer + 1) % J] = 0.94
    ids = np.array([[(layer + 1) % J]])
    pol.on_gate(GateOutput(it, layer, ids, np.ones((1, 1), np.float32), probs, None, now))


def _saturated_iteration(loads: list[int]):
    """A policy after one decode iteration on a link demand loads keep busy: gate g demands
    ``loads[g]`` (0 or 1) copies and the next gate comes when they have landed and the layer
    has computed (one GPU: the layer waits for its own loads); then the next iteration
    starts. Returns the policy, the orders that start admitted and its order counts."""
    pol, cache = _bound(FakeView(copy_s=COPY, layer_s=COMPUTE), prefetch_distance=L - 1)
    _start(pol, it=0)
    pol.decide_prefetch()  # the first iteration's orders (nothing measured yet): dropped
    now = 0.0
    for g in range(L):
        if not loads[g]:  # its chosen expert is resident: no demand load at this gate
            cache.preload([(g, (g + 1) % J)], now)
        _gate_at(pol, g, 0, now)
        pol.decide_prefetch()
        now += loads[g] * COPY + COMPUTE
    keys = ("orders_issued", "orders_admitted_late", "orders_queued_none_done")
    before = {k: pol.metadata()[k] for k in keys}
    _start(pol, it=1)
    counts = {k: pol.metadata()[k] - before[k] for k in keys}
    return pol, pol.decide_prefetch().enqueue, counts


def test_the_last_gates_loads_are_outside_the_measured_interval():
    # five gates demand a copy each, the last none: the interval (first gate to last)
    # holds the five loads and five layer computes, so a layer step leaves prefetches
    # one compute of link time; the earlier count (six gates' loads over six steps) gave
    # 2.7 ms and judged a copy five steps ahead in time
    pol, orders, counts = _saturated_iteration([1, 1, 1, 1, 1, 0])
    assert pol._interval == pytest.approx(COPY + COMPUTE)
    assert pol._avail_per_layer(0) == pytest.approx(COMPUTE)
    assert pol._rho(0) == pytest.approx(COPY / (COPY + COMPUTE))
    # no copy can land before its layer (5 steps x 1 ms < 10 ms) and the forecasts'
    # chance is low: nothing is started, so nothing is evicted for it
    assert orders == []
    assert counts["orders_issued"] == 0


@settings(max_examples=20, deadline=None)
@given(loads=st.lists(st.integers(0, 1), min_size=L, max_size=L))
def test_no_copy_is_judged_in_time_on_a_link_demand_loads_fill(loads):
    """Whatever the gates demanded, the link time left per layer step is the compute the
    loads leave between gates: a copy (ten computes) never fits in the distance's five
    steps, so no copy is admitted as in time; and the measured demand share is the loads'
    share of the interval."""
    pol, _, counts = _saturated_iteration(loads)
    spans = L - 1
    n = sum(loads[:spans])
    assert pol._avail_per_layer(0) == pytest.approx(COMPUTE)
    assert pol._demand_s[0] == pytest.approx(n * COPY / spans)
    assert pol._interval == pytest.approx((n * COPY + spans * COMPUTE) / spans)
    c = counts
    assert c["orders_issued"] == c["orders_admitted_late"] + c["orders_queued_none_done"]
