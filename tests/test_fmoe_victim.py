"""fMoE's deadline admission prices the expert a prefetch evicts (policies/fmoe_victim.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from tests.test_fmoe_deadline import FakeView, J, _bound, _busy, _gate, _start


def _fill(cache: ExpertCache, keys: list[tuple[int, int]]) -> None:
    for key in keys:
        cache.begin_load(key, 0.0, prefetch=False)
        cache.finish_load(key, 0.0)


def _never_right(pol: FmoePolicy) -> None:
    """Forecasts that are never right: every cell of the learned chance table the
    admission reads is 0."""
    zero = np.zeros_like(pol._chance())
    pol._chance = lambda: zero  # type: ignore[method-assign]


def _gate_wrong(pol: FmoePolicy, layer: int, now: float) -> None:
    """Gate ``layer`` chooses an expert the stored map does not forecast there (the map
    names layer % J): the forecasts' candidates are never used, as the table says."""
    probs = np.full((1, J), 0.02, np.float32)
    probs[0, (layer + 1) % J] = 0.94
    ids = np.array([[(layer + 1) % J]])
    pol.on_gate(GateOutput(0, layer, ids, np.ones((1, 1), np.float32), probs, None, now))


@settings(max_examples=25, deadline=None)
@given(
    copy_ms=st.floats(0.05, 20.0),
    layer_ms=st.floats(0.1, 5.0),
    queued_ms=st.floats(0.0, 10.0),
    distance=st.integers(1, 5),
    full=st.booleans(),
    demand=st.floats(0.0, 1.0),
)
def test_forecasts_that_are_never_right_start_no_prefetch(
    copy_ms, layer_ms, queued_ms, distance, full, demand
):
    view = FakeView(copy_s=copy_ms * 1e-3, layer_s=layer_ms * 1e-3, queued_s=queued_ms * 1e-3)
    pol, cache = _bound(view, capacity=4, prefetch_distance=distance)
    if full:
        _fill(cache, [(5, j) for j in range(4)])
    _busy(pol, layer_ms * 1e-3, demand * layer_ms * 1e-3)
    _never_right(pol)
    _start(pol)
    sent = list(pol.decide_prefetch().enqueue)
    for layer in range(3):
        # the gates agree with the table (candidate_chance="measured" counts the
        # candidates' uses: a gate choosing them would contradict the table)
        _gate_wrong(pol, layer, now=layer * layer_ms * 1e-3)
        sent += pol.decide_prefetch().enqueue
    assert sent == []


def test_the_ignored_rule_sends_timely_copies_whatever_their_chance():
    """The earlier rule (victim="ignored", the ablation) admits a copy that lands in time
    without asking its chance: the new rule's difference."""
    pol, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3), prefetch_distance=2, victim="ignored")
    _never_right(pol)
    _start(pol)
    assert len(pol.decide_prefetch().enqueue) == 2


def test_a_free_slot_costs_nothing_and_a_full_cache_prices_its_victim():
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), capacity=2)
    pol._victims_reset()
    assert pol._victim_price(0, 0.0, 1e-3, 3, 1e-3) == 0.0  # two free slots
    _fill(cache, [(4, 0), (4, 1)])
    pol._victims_reset()
    short = pol._victim_price(0, 0.0, 1e-3, 1, 1e-3)
    long = pol._victim_price(0, 0.0, 1e-3, 50, 1e-3)
    # a longer window (a copy for a layer further away) risks the victim's use more;
    # the price is at most one demand load (one copy time)
    assert 0.0 < short < long <= 1e-3


def test_admission_takes_the_victims_in_eviction_order():
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), capacity=3)
    _fill(cache, [(4, 0), (4, 1)])
    pol._victims_reset()
    assert pol._victim_use_chance(0, 5.0) == 0.0  # one free slot first
    pol._victim_take(0)
    first = pol._vq[0][-1][1].key
    assert first == cache.choose_victim(pol.eviction_scores)
    pol._victim_take(0)
    assert pol._vq[0][-1][1].key != first  # the next cheapest


def test_a_copy_whose_victim_is_likelier_used_than_itself_is_rejected():
    """A full cache whose victim comes back next layer (its layer is the next one) and a
    copy at the uninformed chance for a layer far ahead: the copy would cost its victim's
    use more often than it saves one, so the priced rule rejects it; the ignored one
    sends it."""
    view = FakeView(copy_s=5e-4, layer_s=1e-3)
    sent = {}
    for rule in ("priced", "ignored"):
        pol, cache = _bound(view, capacity=1, prefetch_distance=4, victim=rule)
        _fill(cache, [(0, 0)])  # layer 0's expert: used at the next gate
        low = np.full_like(pol._chance(), 0.05)
        pol._chance = lambda low=low: low  # type: ignore[method-assign]
        _start(pol)
        sent[rule] = [(o.layer, o.expert) for o in pol.decide_prefetch().enqueue]
    assert sent["ignored"] and not sent["priced"]


def test_a_demanded_copy_still_loading_counts_as_link_time_the_gate_waited_for():
    """A late prefetch demanded at its gate is a demand load's worth of link time (its
    stall is in the measured interval); a resident expert is not."""
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3))
    _start(pol)
    cache.begin_load((0, 0), 0.0, prefetch=True)  # layer 0's choice, still loading
    _gate(pol, 0)
    assert pol._demand_now == [1]
    _fill(cache, [(1, 1)])  # layer 1's choice, resident
    _gate(pol, 1)
    assert pol._demand_now == [1]
    _gate(pol, 2)  # layer 2's choice absent: a demand load
    assert pol._demand_now == [2]
