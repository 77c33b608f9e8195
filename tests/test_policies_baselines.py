"""Behaviour of each baseline on hand-made traces whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from policies.base import GateOutput, IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.placement import Placement
from policies.registry import make_policy
from policies.replay import ReplayResult, replay
from specs.errors import InputError
from specs.model_spec import ModelSpec
from tests.strategies import random_workload, small_spec
from tests.test_policies_replay import hand_request, hand_workload


def evictions(res: ReplayResult) -> list[tuple[int, int]]:
    return [(d[3], d[4]) for d in res.decisions if d[0] == "evict"]


def orders(res: ReplayResult) -> list[tuple[int, int]]:
    return [(d[3], d[4]) for d in res.decisions if d[0] == "order"]


def context(spec: ModelSpec, capacity: int, devices: int = 1) -> PolicyContext:
    placement = Placement(spec.num_moe_layers, spec.num_experts, devices)
    caches = [
        ExpertCache(c, spec.expert_bytes, d)
        for d, c in enumerate(placement.split_budget(capacity, spec.top_k))
    ]
    return PolicyContext(spec, placement, caches)


# -- lru / lfu ------------------------------------------------------------------------------
SPEC1 = small_spec(layers=1, experts=4, top_k=1)


def test_lru_evicts_the_least_recent() -> None:
    req = hand_request(SPEC1, [[0], [0], [1], [2], [0]])
    res = replay(
        hand_workload(SPEC1, req), make_policy("lru"), capacity_experts=2, record_decisions=True
    )
    assert evictions(res) == [(0, 0), (0, 1)]  # 2 evicts 0 (older than 1); 0 evicts 1
    assert res.counters["hits"] == 1


def test_lfu_evicts_the_least_frequent() -> None:
    req = hand_request(SPEC1, [[0], [0], [1], [2], [0]])
    res = replay(
        hand_workload(SPEC1, req), make_policy("lfu"), capacity_experts=2, record_decisions=True
    )
    assert evictions(res) == [(0, 1)]  # 2 evicts 1 (1 use) although 0 is less recent
    assert res.counters["hits"] == 2


def test_lfu_ties_go_to_the_least_recent_and_scope_run_remembers() -> None:
    ctx = context(SPEC1, 3)
    in_cache, run_long = make_policy("lfu"), make_policy("lfu", scope="run")
    in_cache.bind(ctx)
    run_long.bind(ctx)
    cache = ctx.caches[0]
    for t, key in enumerate([(0, 0), (0, 1), (0, 2)]):
        cache.begin_load(key, float(t), prefetch=False)
        cache.finish_load(key, float(t))
    cache.use((0, 0), 6.0)  # in-cache uses: 0 -> 1, 1 -> 0, 2 -> 0
    for key, n in [
        ((0, 1), 2),
        ((0, 2), 3),
    ]:  # uses before earlier evictions: only the run scope sees them
        for _ in range(n):
            run_long.on_expert_used(key, 1, 5.0)
    assert cache.choose_victim(in_cache.eviction_scores) == (0, 1)  # ties with 2 at 0 uses, older
    assert cache.choose_victim(run_long.eviction_scores) == (0, 0)  # run counts 0, 2, 3


# -- no-offload -------------------------------------------------------------------------------
def test_no_offload_hits_everything_and_refuses_a_small_budget() -> None:
    spec = small_spec(layers=2, experts=4, top_k=2)
    wl = random_workload(spec, num_requests=3, seed=5)
    res = replay(wl, make_policy("no-offload"), capacity_experts=spec.total_experts, num_devices=2)
    assert res.hit_rate == 1.0 and res.counters["loads"] == 0
    with pytest.raises(InputError, match="no-offload.*needs all 8 experts"):
        replay(wl, make_policy("no-offload"), capacity_experts=7)


# -- deepspeed --------------------------------------------------------------------------------
def test_deepspeed_fetches_the_whole_running_layer() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    req = hand_request(
        spec, [[1, 0], [2, 3]]
    )  # the second iteration routes to experts never used before
    wl = hand_workload(spec, req)
    res = replay(wl, make_policy("deepspeed"), capacity_experts=8, record_decisions=True)
    assert sorted(orders(res)) == [
        (0, 0),
        (0, 2),
        (0, 3),
        (1, 1),
        (1, 2),
        (1, 3),
    ]  # the unrouted rest
    assert res.counters["prefetches_issued"] == 6 and res.prefetches_deferred == 0
    assert res.counters["hits"] == 2 and res.counters["misses"] == 2
    on_demand = replay(wl, make_policy("deepspeed", whole_layer=False), capacity_experts=8)
    assert on_demand.counters["hits"] == 0 and on_demand.counters["prefetches_issued"] == 0


def test_deepspeed_fetch_fits_next_to_the_routed_experts() -> None:
    spec = small_spec(layers=1, experts=8, top_k=2)
    pol = make_policy("deepspeed")
    ctx = context(spec, 5)
    pol.bind(ctx)
    pol.on_gate(GateOutput(0, 0, np.array([[3, 6]]), np.ones((1, 2), np.float32)))
    got = [(o.layer, o.expert) for o in pol.decide_prefetch().enqueue]
    assert got == [(0, 0), (0, 1), (0, 2)]  # 5 slots: 2 for the routed experts, 3 for the rest


# -- mixtral-offloading ------------------------------------------------------------------------
def test_mixtral_prefetches_the_lookaheads_top_experts() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    look = np.zeros((1, 2, 4), np.float32)
    look[0, 0] = [0.1, 0.2, 0.6, 0.1]  # layer 1's gate on layer 0's hidden state points at expert 2
    req = hand_request(spec, [[0, 2]], lookahead=look)
    res = replay(
        hand_workload(spec, req),
        make_policy("mixtral-offloading"),
        capacity_experts=4,
        record_decisions=True,
    )
    assert orders(res) == [(1, 2)]
    assert res.counters["hits"] == 1 and res.counters["prefetches_used"] == 1
    two = replay(
        hand_workload(spec, req),
        make_policy("mixtral-offloading", prefetch_top_k=2),
        capacity_experts=4,
        record_decisions=True,
    )
    assert orders(two) == [(1, 2), (1, 1)]  # most probable first
    assert "lookahead" in res.metadata["speculation"]


def test_mixtral_without_lookahead_is_on_demand_lru() -> None:
    spec = small_spec(layers=3, experts=6, top_k=2)
    wl = random_workload(spec, num_requests=3, seed=4, with_lookahead=False)
    mix = replay(
        wl,
        make_policy("mixtral-offloading", per_layer_share=False),
        capacity_experts=7,
        record_decisions=True,
    )
    lru = replay(wl, make_policy("lru"), capacity_experts=7, record_decisions=True)
    assert mix.counters["prefetches_issued"] == 0
    assert mix.decisions == lru.decisions
    assert mix.metadata["speculation"].startswith("none: no lookahead rows")


def test_mixtral_evicts_from_layers_over_their_share_first() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    pol = make_policy("mixtral-offloading")
    ctx = context(spec, 4)  # share: 2 slots per layer
    pol.bind(ctx)
    cache = ctx.caches[0]
    for t, key in enumerate([(1, 0), (0, 0), (0, 1), (0, 2)]):  # layer 1's expert is the oldest
        cache.begin_load(key, float(t), prefetch=False, scores=pol.eviction_scores)
        cache.finish_load(key, float(t))
    assert cache.choose_victim(pol.eviction_scores) == (0, 0)  # layer 0 holds 3 > 2
    plain = make_policy("mixtral-offloading", per_layer_share=False)
    plain.bind(ctx)
    assert cache.choose_victim(plain.eviction_scores) == (1, 0)


# -- moe-infinity ------------------------------------------------------------------------------
SPEC3 = small_spec(layers=3, experts=4, top_k=1)
PATTERN_A = [[0, 3, 1]] * 4
PATTERN_B = [[2, 1, 0]] * 4


def test_moe_infinity_matches_the_closest_stored_request() -> None:
    train = hand_workload(
        SPEC3, hand_request(SPEC3, PATTERN_A, rid="a"), hand_request(SPEC3, PATTERN_B, rid="b")
    )
    pol = make_policy("moe-infinity")
    pol.bind(context(SPEC3, 12))
    pol.fit(train)
    pol.on_iteration_start(IterationStart(0, ("x",), np.array([0]), np.array([True])))
    assert not pol.decide_prefetch()  # a new request has no matrix yet
    pol.on_gate(GateOutput(0, 0, np.array([[0]]), np.ones((1, 1), np.float32)))  # follows pattern A
    got = pol.decide_prefetch().enqueue
    assert [(o.layer, o.expert) for o in got] == [(1, 3), (2, 1)]  # A's next layers, nearer first
    assert got[0].priority > got[1].priority


def test_moe_infinity_learns_online_and_evicts_least_visits() -> None:
    wl = hand_workload(
        SPEC3, hand_request(SPEC3, PATTERN_A, rid="a"), hand_request(SPEC3, PATTERN_A, rid="a2")
    )
    res = replay(wl, make_policy("moe-infinity"), capacity_experts=2, record_decisions=True)
    assert res.metadata["added_online"] == 2 and res.metadata["store_rows"] == 2
    lru = replay(wl, make_policy("lru"), capacity_experts=2)
    assert lru.counters["hits"] == 0  # 3 experts cycling through 2 slots
    assert res.per_request["a"].hits == 0  # nothing stored while the first request runs
    assert res.per_request["a2"].hit_rate >= 0.75  # predicted from the first request's matrix
    pol = make_policy("moe-infinity")
    ctx = context(SPEC3, 2)
    pol.bind(ctx)
    cache = ctx.caches[0]
    for t, key in enumerate([(0, 0), (0, 1)]):
        cache.begin_load(key, float(t), prefetch=False)
        cache.finish_load(key, float(t))
    cache.use((0, 0), 3.0)
    cache.use((0, 0), 4.0)
    cache.use((0, 1), 5.0)
    assert cache.choose_victim(pol.eviction_scores) == (
        0,
        1,
    )  # fewer in-cache visits, though more recent


def test_moe_infinity_rejects_a_training_set_for_another_model() -> None:
    pol = make_policy("moe-infinity")
    pol.bind(context(SPEC3, 4))
    other = random_workload(small_spec(layers=2, experts=4, top_k=1), num_requests=1)
    with pytest.raises(InputError, match="training workload is for"):
        pol.fit(other)


# -- promoe ------------------------------------------------------------------------------------
def shifted(spec: ModelSpec, tokens: int, start: int = 0) -> list:
    """Token rows where layer l+1 uses expert (e + 1) % J after layer l used e."""
    J = spec.num_experts
    return [
        [[(start + t + layer) % J] for layer in range(spec.num_moe_layers)] for t in range(tokens)
    ]


def test_promoe_predicts_layer_l_plus_stride_from_training() -> None:
    spec = small_spec(layers=4, experts=6, top_k=1)
    train = hand_workload(spec, hand_request(spec, shifted(spec, 12), prompt_len=12))
    pol = make_policy("promoe", first_layers=False)
    ctx = context(spec, 24)
    ctx.prefetch_distance = 2
    pol.bind(ctx)
    pol.fit(train)
    assert pol.metadata()["stride_layers"] == 2 and pol.metadata()["trained_tokens"] == 12
    pol.on_iteration_start(IterationStart(0, ("x",), np.array([0]), np.array([True])))
    pol.on_gate(GateOutput(0, 1, np.array([[4]]), np.ones((1, 1), np.float32)))
    got = pol.decide_prefetch().enqueue
    assert [(o.layer, o.expert) for o in got] == [(3, 0)]  # (4 + 2) % 6 at layer 1 + 2
    pol.on_gate(GateOutput(0, 2, np.array([[5]]), np.ones((1, 1), np.float32)))
    assert not pol.decide_prefetch()  # layer 4 does not exist


def test_promoe_trains_online_and_beats_lru_on_repeated_routing() -> None:
    spec = small_spec(layers=4, experts=6, top_k=1)
    reqs = [hand_request(spec, shifted(spec, 6, start=i), rid=f"r{i}") for i in range(3)]
    wl = hand_workload(spec, *reqs)
    res = replay(wl, make_policy("promoe", stride=1), capacity_experts=6)
    lru = replay(wl, make_policy("lru"), capacity_experts=6)
    assert res.metadata["online_tokens"] > 0 and res.metadata["trained_tokens"] == 0
    assert res.hit_rate > lru.hit_rate
    fitted = replay(wl, make_policy("promoe", stride=1), capacity_experts=6, training=wl)
    assert fitted.hit_rate >= res.hit_rate


# -- oracle ------------------------------------------------------------------------------------
def test_oracle_is_perfect_where_lru_is_not() -> None:
    req = hand_request(SPEC1, [[0], [1], [2], [0], [1], [2]])
    wl = hand_workload(SPEC1, req)
    assert replay(wl, make_policy("oracle"), capacity_experts=2).hit_rate == 1.0
    assert replay(wl, make_policy("lru"), capacity_experts=2).hit_rate == 0.0


def test_oracle_evicts_the_expert_used_farthest_in_future() -> None:
    req = hand_request(SPEC1, [[0], [1], [2], [1], [0]])
    pol = make_policy("oracle", lookahead_layers=3)
    ctx = context(SPEC1, 3)
    pol.bind(ctx)
    pol.bind_future(hand_workload(SPEC1, req))
    cache = ctx.caches[0]
    for t, key in enumerate([(0, 0), (0, 1), (0, 3)]):
        cache.begin_load(key, float(t), prefetch=False)
        cache.finish_load(key, float(t))
    pol.on_iteration_start(IterationStart(0, ("r0",), np.array([0]), np.array([True])))
    # next uses: expert 0 now, 1 in one iteration, 3 never -> 3 first, then 1, then 0
    assert cache.choose_victim(pol.eviction_scores) == (0, 3)
    cache.evict((0, 3))
    assert cache.choose_victim(pol.eviction_scores) == (0, 1)
    # three steps ahead: expert 0 (cached), 1 (cached), 2 -> the free slot
    assert [(o.layer, o.expert) for o in pol.decide_prefetch().enqueue] == [(0, 2)]


def test_oracle_needs_the_future() -> None:
    pol = make_policy("oracle")
    pol.bind(context(SPEC1, 2))
    with pytest.raises(InputError, match="bind_future"):
        pol.on_iteration_start(IterationStart(0, ("r0",), np.array([0]), np.array([True])))
    assert type(pol).reads_future
    with pytest.raises(InputError, match="does not read the future"):
        make_policy("lru").bind_future(hand_workload(SPEC1))


def test_moe_infinity_defaults_follow_the_fmoe_artifact_window_and_top_quarter() -> None:
    spec = small_spec(layers=10, experts=8, top_k=2)
    pol = make_policy("moe-infinity")
    pol.bind(context(spec, 80))
    assert pol.metadata()["prefetch_layers"] == 6 and pol.metadata()["top_experts"] == 2
    train = random_workload(spec, num_requests=3, seed=1)
    pol.fit(train)
    pol.on_iteration_start(IterationStart(0, ("x",), np.array([0]), np.array([True])))
    pol.on_gate(GateOutput(0, 0, np.array([[0, 1]]), np.full((1, 2), 0.5, np.float32)))
    orders = pol.decide_prefetch().enqueue
    layers = [o.layer for o in orders]
    assert orders and min(layers) >= 1 and max(layers) <= 6  # the 6 layers after layer 0
    per_layer = np.bincount(layers)
    assert per_layer.max() <= 2  # the top J/4 experts of each predicted layer
    wide = make_policy("moe-infinity", prefetch_layers=100, top_experts=8)
    wide.bind(context(spec, 80))
    wide.fit(train)
    wide.on_iteration_start(IterationStart(0, ("x",), np.array([0]), np.array([True])))
    wide.on_gate(GateOutput(0, 0, np.array([[0, 1]]), np.full((1, 2), 0.5, np.float32)))
    assert len(wide.decide_prefetch().enqueue) > len(orders)
