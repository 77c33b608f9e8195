"""fMoE's admission charges a prefetch the measured wait of the demand loads it holds up
(blocking="measured", policies/fmoe_blocking.py)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import IterationStart
from policies.fmoe import FmoePolicy
from policies.fmoe_blocking import gate_crossings
from tests.test_fmoe_deadline import FakeView, _bound, _busy, _gate, _start
from tests.test_fmoe_victim import _gate_wrong


def _chance(pol: FmoePolicy, q: float) -> None:
    """Forecasts right with chance ``q``: every cell of the learned chance table is q."""
    tab = np.full_like(pol._chance(), q)
    pol._chance = lambda: tab  # type: ignore[method-assign]


def _measured(pol: FmoePolicy, wait_s: float) -> None:
    """Pretend every decode gate demanded a load and its loads waited ``wait_s`` behind a
    copy on the link (the estimate a decode iteration starts from)."""
    pol._blk[False][0] = [wait_s, 1.0, 1.0, 1.0]


@settings(max_examples=25, deadline=None)
@given(
    committed=st.floats(0.0, 20.0),
    copy=st.floats(0.01, 20.0),
    avail=st.floats(-1.0, 5.0),
    ahead=st.integers(1, 12),
)
def test_crossings_are_the_gates_a_copy_is_on_the_link_at(committed, copy, avail, ahead):
    """Gate k (k = 1..ahead) comes k layer steps from now; the copy is on the link from
    committed / avail to (committed + copy) / avail steps. The Python rule and the
    compiled one count the same."""
    from policies.fmoe_admit_jit import gate_crossings as compiled

    before, own = gate_crossings(committed, copy, avail, ahead)
    assert (before, own) == tuple(compiled(committed, copy, avail, ahead))
    if not avail > 0:
        assert (before, own) == (0, 0)
        return
    start, end = committed / avail, (committed + copy) / avail
    assert before == sum(1 for k in range(1, ahead) if start < k < end)
    assert own == int(start < ahead < end)
    if committed + copy <= ahead * avail:  # it lands by its gate: not in flight there
        assert own == 0


def test_a_copy_within_one_step_of_an_idle_link_crosses_no_gate():
    assert gate_crossings(0.0, 0.5, 1.0, 3) == (0, 0)
    assert gate_crossings(0.0, 2.5, 1.0, 5) == (2, 0)  # on the link at gates 1 and 2
    assert gate_crossings(0.0, 2.5, 1.0, 2) == (1, 1)  # and in flight at its own (2)
    assert gate_crossings(3.0, 1.0, 1.0, 2) == (0, 0)  # starts after its layer


@settings(max_examples=25, deadline=None)
@given(
    q=st.floats(0.0, 0.5),
    copy_ms=st.floats(0.2, 20.0),
    steps=st.floats(1.05, 30.0),
    wait=st.floats(1.0, 3.0),
    distance=st.integers(1, 5),
    queued=st.floats(0.0, 3.0),
    victim=st.sampled_from(["priced", "ignored"]),
)
def test_no_copy_is_sent_whose_hold_up_outweighs_its_saving(
    q, copy_ms, steps, wait, distance, queued, victim
):
    """A saturated link: a copy needs more than one layer step of the time demand loads
    leave (``steps`` of them), each gate a prefetch is on the link at waits ``wait``
    copies for it (a chunk at least a copy long), and forecasts right at most half the
    time. Any copy then either crosses a gate before its layer (cost >= one copy, its
    saving at most q x copy) or is in flight at its own gate (unused, (1 - q) x wait
    copies against q x the part done), so none is sent, in time, late or queued."""
    copy = copy_ms * 1e-3
    layer = copy  # one layer step; demand loads leave copy / steps of it to prefetches
    view = FakeView(copy_s=copy, layer_s=layer, queued_s=queued * copy)
    pol, _ = _bound(view, prefetch_distance=distance, victim=victim)
    _busy(pol, layer, layer - copy / steps)
    _measured(pol, wait * copy)
    _chance(pol, q)
    _start(pol)
    sent = list(pol.decide_prefetch().enqueue)
    for g in range(3):
        # gates that agree with the forecasts' chance (candidate_chance="measured" counts
        # the candidates' uses: gates choosing every forecast expert would make it 1)
        _gate_wrong(pol, g, now=(g + 1) * layer)
        sent += pol.decide_prefetch().enqueue
    assert sent == []


def test_the_ignored_rule_sends_what_the_measured_wait_refuses():
    """The same saturated link, forecasts right half the time, copies needing five layer
    steps of spare time: the earlier rule (blocking="ignored") sends late copies for their
    partial saving; charged the measured wait per gate crossed, none goes."""
    copy = 1e-3
    sent = {}
    for rule in ("measured", "ignored"):
        pol, _ = _bound(FakeView(copy_s=copy, layer_s=copy), prefetch_distance=3, blocking=rule)
        _busy(pol, copy, 0.8 * copy)  # 0.2 ms of prefetch time per layer step
        _measured(pol, 0.9 * copy)  # the chunk: most of a copy
        _chance(pol, 0.5)
        _start(pol)
        sent[rule] = list(pol.decide_prefetch().enqueue)
    assert sent["ignored"] and not sent["measured"]


def test_the_wait_is_measured_from_when_a_gates_first_demand_load_landed():
    copy = 1e-3
    pol, cache = _bound(FakeView(copy_s=copy, layer_s=copy, queued_s=0.4e-3))
    _start(pol)
    # gate 0 at t = 1 ms: a prefetch on the link, the gate's expert (0, 0) absent; its
    # demand load lands at 2.7 ms, 0.7 ms later than on an idle link
    _gate(pol, 0, now=1e-3)
    cache.begin_load((0, 0), 1e-3, prefetch=False)
    cache.finish_load((0, 0), 2.7e-3)
    _gate(pol, 1, now=3e-3)  # settles gate 0 (gate 1's (1, 1) is absent: noted)
    assert pol._blk[False][0][1] == 1.0 and math.isclose(pol._beta[0], 0.7e-3)
    # gate 1's demand load lands with no wait: the mean over the two gates halves
    cache.begin_load((1, 1), 3e-3, prefetch=False)
    cache.finish_load((1, 1), 4e-3)
    cache.begin_load((2, 2), 0.0, prefetch=True)  # gate 2's expert, a late prefetch
    _gate(pol, 2, now=5e-3)
    assert math.isclose(pol._beta[0], 0.35e-3)
    # gate 2 demanded a late prefetch (its own demand load now): not counted
    cache.finish_load((2, 2), 5.5e-3)
    _gate(pol, 3, now=6e-3)
    assert pol._blk[False][0][1] == 2.0
    # prompts keep their own estimate
    emb = np.eye(3, dtype=np.float32)[:1]
    pol.on_iteration_start(IterationStart(1, ("r0",), np.zeros(1, int), np.ones(1, bool), emb))
    assert pol._beta == [0.0]


def test_an_idle_link_at_the_gate_is_no_crossing():
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3, queued_s=0.0))
    _start(pol)
    _gate(pol, 0, now=1e-3)
    cache.begin_load((0, 0), 1e-3, prefetch=False)
    cache.finish_load((0, 0), 2.5e-3)
    _gate(pol, 1, now=3e-3)
    assert pol._blk[False][0][:2] == [0.0, 0.0] and pol._beta == [0.0]


def test_the_wait_counts_as_often_as_gates_demand_a_load():
    """A device whose gates demand a load one time in four: a wait of 0.8 ms behind a
    copy is expected 0.2 ms per gate a copy is on its link at."""
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3, queued_s=0.5e-3))
    _start(pol)
    _gate(pol, 0, now=1e-3)  # (0, 0) absent behind a copy
    cache.begin_load((0, 0), 1e-3, prefetch=False)
    cache.finish_load((0, 0), 2.8e-3)
    for layer in (1, 2, 3):  # the gates' experts resident: no demand load
        cache.begin_load((layer, layer), 0.0, prefetch=False)
        cache.finish_load((layer, layer), 0.0)
    for layer in (1, 2, 3):
        _gate(pol, layer, now=(2 + layer) * 1e-3)
    wait, waits, demanding, gates = pol._blk[False][0]
    assert math.isclose(wait, 0.8e-3) and (waits, demanding, gates) == (1.0, 1.0, 4.0)
    assert math.isclose(pol._blocking_estimates(False)[0], 0.2e-3)
