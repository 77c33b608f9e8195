"""fMoE's deadline-aware prefetch admission and its learned eviction (issue 20, items 1-2)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import (
    CpuState,
    GateOutput,
    IterationStart,
    LinkState,
    PolicyContext,
    PrefetchDecision,
)
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from policies.registry import make_policy
from policies.replay import replay
from tests.strategies import random_workload, small_spec


class FakeView:
    """An ExecutorView with fixed figures: ``queued_s`` on every link, one copy ``copy_s``,
    one layer step ``layer_s``."""

    def __init__(self, copy_s: float, layer_s: float, queued_s: float = 0.0):
        self.copy_s, self.layer_s, self.queued_s = copy_s, layer_s, queued_s

    def link_state(self, device: int) -> LinkState:
        return LinkState(self.queued_s, 1e9, self.copy_s)

    def layer_time_s(self, tokens: int) -> float:
        return self.layer_s

    def cpu_state(self) -> CpuState | None:
        return None


L, J = 6, 4
SPEC = small_spec(layers=L, experts=J, top_k=1, hidden=3)


def _bound(view: FakeView | None, capacity: int = 64, **opts) -> tuple[FmoePolicy, ExpertCache]:
    opts.setdefault("admission", "deadline")  # the rule under test (not the default)
    pol = FmoePolicy(store_capacity=4, **opts)
    cache = ExpertCache(capacity=capacity, expert_bytes=1)
    ctx = PolicyContext(SPEC, Placement(L, J), [cache], executor=view)
    pol.bind(ctx)
    # one stored map: expert (layer % J) at every layer, with its embedding
    m = np.full((1, L, J), 0.02, np.float32)
    m[0, np.arange(L), np.arange(L) % J] = 0.94
    pol.store.add_batch(m, np.eye(3, dtype=np.float32)[:1])
    return pol, cache


def _start(pol: FmoePolicy, it: int = 0) -> None:
    emb = np.eye(3, dtype=np.float32)[:1]
    pol.on_iteration_start(IterationStart(it, ("r0",), np.zeros(1, int), np.zeros(1, bool), emb))


def _gate(pol: FmoePolicy, layer: int, it: int = 0, now: float = 0.0) -> None:
    probs = np.full((1, J), 0.02, np.float32)
    probs[0, layer % J] = 0.94
    ids = np.array([[layer % J]])
    pol.on_gate(GateOutput(it, layer, ids, np.ones((1, 1), np.float32), probs, None, now))


def test_distance_follows_copy_time_over_layer_time():
    pol, _ = _bound(FakeView(copy_s=2.5e-3, layer_s=1e-3))
    assert (
        pol.distance == 3 and pol.metadata()["prefetch_distance_source"] == "copy time / layer time"
    )
    pol, _ = _bound(FakeView(copy_s=1.0, layer_s=1e-3))  # capped at L - 1
    assert pol.distance == L - 1
    pol, _ = _bound(None)  # no view: the model family's constant
    assert pol.metadata()["prefetch_distance_source"] == "model family"
    pol, _ = _bound(FakeView(copy_s=1e-4, layer_s=1e-3))  # a copy within one layer step
    assert pol.distance == 1


def _busy(pol: FmoePolicy, interval: float, demand_s: float) -> None:
    """Pretend the last decode iteration ran at ``interval`` per gate with ``demand_s`` of
    demand loads per layer step on the link (the estimates a decode iteration starts from)."""
    pol._by_kind[False] = (interval, [demand_s], demand_s)  # one link: the largest is its


def test_a_copy_forecast_to_start_after_its_layer_is_queued_only_where_links_have_slack():
    # a full layer step of copies queued ahead: layer 0 (one step away) gets nothing done
    # before its layer. With no demand loads measured (rho = 0) it is queued anyway: the
    # link drops it unstarted if the forecast holds, so it costs nothing
    idle, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3, queued_s=1e-3), prefetch_distance=1)
    _start(idle)
    assert [(o.layer, o.expert) for o in idle.decide_prefetch().enqueue] == [(0, 0)]
    assert idle.metadata()["orders_queued_none_done"] == 1
    # demand loads took 90% of the link: one layer step's prefetch time (0.1 ms) done at
    # the prior chance (1/4) does not pay for the unused rest (0.75 x 0.5 ms x 0.9)
    busy, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3, queued_s=1e-3), prefetch_distance=1)
    _busy(busy, 1e-3, 9e-4)
    _start(busy)
    assert busy.decide_prefetch().enqueue == []
    assert busy.metadata()["orders_rejected_late"] == 1
    # a copy takes half a layer step: both semantic orders (layers 0 and 1) fit
    fast, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3), prefetch_distance=2)
    _start(fast)
    assert {(o.layer, o.expert) for o in fast.decide_prefetch().enqueue} == {(0, 0), (1, 1)}
    assert fast.metadata()["orders_admitted_late"] == 0


def test_a_late_copy_is_ordered_when_its_partial_saving_beats_the_delay_of_its_unused_rest():
    # a copy takes 10 layer steps, distance 2: layer 0's copy is 1/10 done when it runs
    view = FakeView(copy_s=1e-2, layer_s=1e-3)
    idle, _ = _bound(view, prefetch_distance=2)
    _start(idle)  # nothing measured yet: no demand loads assumed (rho = 0), any part saves;
    assert [(o.layer, o.expert) for o in idle.decide_prefetch().enqueue][0] == (0, 0)
    assert idle.metadata()["orders_admitted_late"] == 1
    # demand loads took half the link (rho = 0.5) over the last decode iteration: at the
    # learned chance's prior (K/J = 1/4) a copy 1/20 done saves 0.25 x 0.5 ms, and its
    # unused rest costs 0.75 x 9.5 ms x 0.5: rejected
    busy, _ = _bound(view, prefetch_distance=2)
    _busy(busy, 1e-3, 5e-4)
    _start(busy)
    assert busy.decide_prefetch().enqueue == []
    assert busy._rho(0) == 0.5


def test_a_prompt_counts_the_chance_that_any_of_its_rows_chooses_the_expert():
    # the same busy link as above, but a prompt of 32 rows: 1 - (3/4)^32 ~ 1, the copy's
    # part done is worth its unused rest
    view = FakeView(copy_s=1e-2, layer_s=1e-3)
    pol, _ = _bound(view, prefetch_distance=2)
    pol._by_kind[True] = (1e-3, [5e-4], 5e-4)  # the last prompt's pace
    emb = np.tile(np.eye(3, dtype=np.float32)[:1], (32, 1))
    pol.on_iteration_start(IterationStart(0, ("r0",) * 32, np.arange(32), np.ones(32, bool), emb))
    assert (0, 0) in {(o.layer, o.expert) for o in pol.decide_prefetch().enqueue}
    assert pol._iteration_chance(0, 0) > 0.99
    assert pol._rho(0) == 0.5


def test_estimates_are_kept_apart_for_prompts_and_decode_steps():
    pol, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3), prefetch_distance=2)
    pol._by_kind[True] = (3e-2, [2e-2], 2e-2)
    _busy(pol, 1e-3, 5e-4)
    _start(pol)  # a decode step: the decode estimates
    assert pol._interval == 1e-3 and pol._rho(0) == 0.5


def test_queued_link_time_delays_admission():
    # half the link's time goes to demand loads (0.5 ms of prefetch time per layer step)
    # and 0.6 ms of copies are queued: layer 0 (1 step away) would start after its layer
    # (and 0.1 ms done at the prior chance 1/4 does not pay for 0.75 x 0.4 ms x 0.5 of an
    # unused copy: not queued); layer 1 (2 steps) fits
    pol, _ = _bound(FakeView(copy_s=4e-4, layer_s=1e-3, queued_s=6e-4), prefetch_distance=2)
    _busy(pol, 1e-3, 5e-4)
    _start(pol)
    assert [(o.layer, o.expert) for o in pol.decide_prefetch().enqueue] == [(1, 1)]


def test_orders_are_reranked_at_each_gate_and_stale_ones_cancelled():
    pol, _ = _bound(FakeView(copy_s=5e-4, layer_s=1e-3), prefetch_distance=3)
    _start(pol)
    first = {o.key: o.priority for o in pol.decide_prefetch().enqueue}
    assert set(first) == {(0, 0), (1, 1), (2, 2)}
    _gate(pol, 0, now=1e-3)
    dec = pol.decide_prefetch()
    again = {o.key: o.priority for o in dec.enqueue}
    # layer 2 is now 2 steps away (was 3): the same order at p / 2 instead of p / 3
    assert again[(2, 2)] > first[(2, 2)]
    assert (0, 0) in dec.cancel  # its layer ran before its copy started


def test_without_a_view_every_selected_expert_is_ordered():
    pol, _ = _bound(None, prefetch_distance=2)
    _start(pol)
    assert {(o.layer, o.expert) for o in pol.decide_prefetch().enqueue} == {(0, 0), (1, 1)}
    assert pol.metadata()["admission"] == "all"


def test_predicted_resident_experts_are_protected_until_their_layer_ran():
    pol, cache = _bound(None, capacity=3, prefetch_distance=2)
    cache.preload([(1, 1), (5, 0), (5, 3)])
    _start(pol)  # predicts (0, 0) and (1, 1): (1, 1) is resident
    assert pol.expected_next_use(1, 1) == 0.0
    assert cache.choose_victim(pol.eviction_scores) != (1, 1)
    _gate(pol, 0)
    _gate(pol, 1)
    assert pol.expected_next_use(1, 1) > 0.0  # its layer ran: no longer protected


def _no_prefetch(name: str, **opts):
    pol = make_policy(name, **opts)
    pol.decide_prefetch = PrefetchDecision  # evictions only: an empty decision each time
    return pol


# routing without structure (the maps' predictions carry no information): the draws of
# the "not worse than LRU" properties (here and tests/test_fmoe_duel.py)
STRUCTURELESS = dict(
    seed=st.integers(0, 10_000),
    layers=st.integers(2, 5),
    experts=st.integers(4, 9),
    top_k=st.integers(1, 2),
    share=st.floats(0.15, 0.9),
)


def structureless_vs_lru(seed, layers, experts, top_k, share, **fmoe_opts):
    """fMoE without prefetches (options ``fmoe_opts``) and LRU replayed on random routing:
    (fMoE's policy, its result, LRU's result, the noise allowed between their hit rates)."""
    spec = small_spec(layers=layers, experts=experts, top_k=top_k, hidden=4)
    cap = max(top_k, int(share * layers * experts))
    work = random_workload(spec, num_requests=6, seed=seed, max_prompt=8, max_output=60)
    train = random_workload(spec, num_requests=4, seed=seed + 1, max_prompt=8, max_output=30)
    pol = _no_prefetch("fmoe", store_capacity=50, **fmoe_opts)
    fmoe = replay(work, pol, capacity_experts=cap, training=train)
    lru = replay(work, _no_prefetch("lru"), capacity_experts=cap)
    # "within the noise": three standard errors of a hit rate over this many demands (at
    # least 0.02), a one-sided false alarm of about 0.1% a draw (two gave 2.3%, too many
    # for 15-25 draws a run); a 2-layer, 9-expert, top-1 trace of 351 demands drew fmoe
    # 0.054 below LRU, while 12 seeds of that setting ranged -0.022..+0.049 (mean +0.013)
    noise = max(0.02, 3 * (0.25 / lru.counters["demands"]) ** 0.5)
    return pol, fmoe, lru, noise


@settings(max_examples=15, deadline=None)
@given(**STRUCTURELESS)
def test_eviction_is_never_worse_than_lru_on_random_routing(seed, layers, experts, top_k, share):
    """Routing without structure: the maps' predictions carry no information, and the
    learned eviction must still match LRU (within the noise of a finite trace)."""
    _, fmoe, lru, noise = structureless_vs_lru(seed, layers, experts, top_k, share)
    assert fmoe.hit_rate >= lru.hit_rate - noise, (fmoe.hit_rate, lru.hit_rate, noise)


def test_eviction_beats_lru_when_recency_and_layer_order_matter():
    """Temporal locality (a token re-uses its predecessor's experts at some layers): the
    learned eviction keeps what comes back soonest and wins clearly over LRU."""
    from traces.synth import SynthConfig, generate

    spec = small_spec(layers=8, experts=8, top_k=2, hidden=8)
    w = generate(spec, SynthConfig(num_requests=12, seed=1, prompt_len_mean=6, output_len_mean=40))
    fmoe = replay(w, _no_prefetch("fmoe", store_capacity=50), capacity_experts=20)
    lru = replay(w, _no_prefetch("lru"), capacity_experts=20)
    assert fmoe.hit_rate > lru.hit_rate + 0.02, (fmoe.hit_rate, lru.hit_rate)
