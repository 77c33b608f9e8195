"""Belady's MIN and the TPOT floor (sim.bounds, traces.cachesim.min_run).

MIN is checked against a brute-force optimum over every cache choice on tiny sequences;
the run bounds against the simulator itself: no demand-only policy beats MIN's hit rate,
no policy moves fewer copies than MIN's misses, and no policy's mean TPOT is below the
floor.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.registry import policy_names
from sim.bounds import demand_sequence_for, plan_iterations
from sim.config import SimConfig
from sim.run import simulate
from tests.strategies import random_workload, small_spec
from tests.test_sim_kit import exact_profile
from tests.test_sim_properties import scenarios
from traces.cachesim import hits_by_capacity, min_run
from traces.demand import DemandSequence, demand_sequence


def seq_of(steps: list[list[int]], num_keys: int) -> DemandSequence:
    keys = np.array([k for s in steps for k in sorted(s)], dtype=np.int32)
    start = np.concatenate([[0], np.cumsum([len(s) for s in steps])]).astype(np.int64)
    return DemandSequence(keys, start, num_keys)


@st.composite
def tiny_sequences(
    draw: st.DrawFn, max_keys: int = 5, max_steps: int = 7, waves: bool = False
) -> tuple:
    """(steps, num_keys, capacity); ``waves``: steps may be larger than the capacity."""
    u = draw(st.integers(2, max_keys))
    cap = draw(st.integers(1, u))
    big = u if waves else min(cap, 3)
    step = st.sets(st.integers(0, u - 1), min_size=1, max_size=big).map(sorted)
    steps = draw(st.lists(step, min_size=1, max_size=max_steps))
    return steps, u, cap


def brute_force_hits(steps: list[list[int]], cap: int, start: frozenset = frozenset()) -> int:
    """The most hits of any cache schedule: after each step the cache may become any set
    of at most ``cap`` keys drawn from what it held and the step's keys, holding the
    whole step when it fits (it was resident at once; a larger step ran in waves)."""

    @cache
    def best(t: int, cached: frozenset) -> int:
        if t == len(steps):
            return 0
        s = frozenset(steps[t])
        hits = len(s & cached)
        fits = len(s) <= cap
        base = s if fits else frozenset()
        pool = sorted((cached | s) - base)
        room = cap - len(base)
        top = 0
        for r in range(0, min(room, len(pool)) + 1):
            for keep in itertools.combinations(pool, r):
                top = max(top, best(t + 1, base | frozenset(keep)))
        return hits + top

    return best(0, start)


@settings(max_examples=40, deadline=None)
@given(tiny_sequences(waves=True))
def test_min_equals_the_brute_force_optimum(case: tuple) -> None:
    steps, u, cap = case
    seq = seq_of(steps, u)
    hits, misses = min_run(seq, cap)
    assert hits == brute_force_hits(steps, cap)
    assert hits + misses == seq.num_demands


@settings(max_examples=30, deadline=None)
@given(tiny_sequences(waves=True), st.data())
def test_min_from_a_warm_cache_equals_the_brute_force_optimum(case: tuple, data) -> None:
    steps, u, cap = case
    start = data.draw(st.sets(st.integers(0, u - 1), max_size=cap))
    hits, _ = min_run(seq_of(steps, u), cap, initial=np.array(sorted(start)))
    assert hits == brute_force_hits(steps, cap, frozenset(start))


@settings(max_examples=30, deadline=None)
@given(tiny_sequences(max_keys=6, max_steps=12, waves=True), st.data())
def test_free_start_window_gives_the_fewest_loads_inside_it(case: tuple, data) -> None:
    """With a free start, MIN's misses in a window are the fewest loads any cache makes
    there, whatever it held before: the brute force over every start set agrees."""
    steps, u, cap = case
    lo = data.draw(st.integers(0, len(steps) - 1))
    hi = data.draw(st.integers(lo + 1, len(steps)))
    _, misses = min_run(seq_of(steps, u), cap, steps=(lo, hi), free_start=True)
    window = steps[lo:hi]
    demands = sum(len(s) for s in window)
    best = max(
        brute_force_hits(window, cap, frozenset(c))
        for r in range(cap + 1)
        for c in itertools.combinations(range(u), r)
    )
    assert misses == demands - best


@settings(max_examples=40, deadline=None)
@given(tiny_sequences(max_keys=9, max_steps=40, waves=True), st.data())
def test_python_and_numba_min_agree(case: tuple, data) -> None:
    """The two implementations of min_run (pure Python below JIT_MIN_DEMANDS demands,
    numba above) give the same result in every mode."""
    steps, u, cap = case
    seq = seq_of(steps, u)
    lo = data.draw(st.integers(0, len(steps) - 1))
    hi = data.draw(st.integers(lo + 1, len(steps)))
    start = np.array(sorted(data.draw(st.sets(st.integers(0, u - 1), max_size=cap))))
    for kw in ({}, {"initial": start}, {"steps": (lo, hi), "free_start": True}):
        assert min_run(seq, cap, jit=False, **kw) == min_run(seq, cap, jit=True, **kw)


@settings(max_examples=40, deadline=None)
@given(tiny_sequences(max_keys=8, max_steps=30))
def test_min_hits_at_least_lru_and_lfu_at_every_size(case: tuple) -> None:
    steps, u, _ = case
    seq = seq_of(steps, u)
    h = {p: hits_by_capacity(seq, p) for p in ("lru", "lfu", "min")}
    biggest = max(len(s) for s in steps)
    for cap in range(biggest, u + 1):  # sizes that hold a whole step
        assert h["min"][cap] >= h["lru"][cap] and h["min"][cap] >= h["lfu"][cap]
        assert h["min"][cap] == min_run(seq, cap)[0]


# -- against the simulator --------------------------------------------------------------------
DEMAND_ONLY = ["lru", "lfu"]  # policies that load only on demand (MIN bounds their hit rate)


def _holds_steps(sc: dict) -> bool:
    """Whether every GPU's cache holds a layer step's experts at once (no waves)."""
    cfg = sc["config"]
    spec = cfg.model
    rows = cfg.batch_size * max(r.prompt_len for r in sc["workload"].requests)
    return cfg.cache_experts >= cfg.hardware.num_gpus * min(spec.num_experts, rows * spec.top_k)


@pytest.mark.parametrize("name", DEMAND_ONLY)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_no_demand_only_policy_beats_min(name: str, data) -> None:
    sc = data.draw(scenarios(policy=name))
    m = simulate(sc["workload"], sc["config"].model_copy(update={"record_events": False})).metrics
    if m["bound_hit_belady"] is None:  # a time-dependent schedule: no bound, said so
        assert "bound_note" in m
        return
    assert m["hit_rate"] <= m["bound_hit_belady"] + 1e-12


@pytest.mark.parametrize("name", policy_names())
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_no_policy_loads_fewer_than_min_nor_beats_the_tpot_floor(name: str, data) -> None:
    sc = data.draw(scenarios(policy=name))
    m = simulate(sc["workload"], sc["config"].model_copy(update={"record_events": False})).metrics
    if m["bound_loads_min"] is None:
        return
    if _holds_steps(sc):  # with waves MIN's choice inside a step is not proven optimal
        assert m["loads"] >= m["bound_loads_min"]
    if m["tpot_mean_s"] is not None:
        assert m["bound_tpot_s"] <= m["tpot_mean_s"] * (1 + 1e-9)


def test_a_prefetching_policy_can_beat_min_hit_rate_but_not_its_loads() -> None:
    """Why the hit bound is for demand loading: the oracle prefetches exactly, so on a
    slow-enough compute its copies land before demand and count as hits."""
    spec = small_spec(layers=2, experts=4, top_k=1)
    w = random_workload(spec, num_requests=3, seed=5, max_prompt=1, max_output=12)
    hw = exact_profile(expert_s=1e-2, dense_s=1e-2, head_s=1e-3, bandwidth_Bps=1e9, latency_s=0.0)
    cfg = SimConfig(model=spec, hardware=hw, policy="oracle", cache_experts=2)
    m = simulate(w, cfg).metrics
    assert m["loads"] >= m["bound_loads_min"]
    assert m["hit_rate"] > m["bound_hit_belady"]


def test_bounds_need_a_timing_free_schedule() -> None:
    spec = small_spec()
    w = random_workload(spec, num_requests=4, seed=1, arrival_gap_s=1e-3)
    hw = exact_profile(expert_s=1e-4, dense_s=1e-4, head_s=1e-4, bandwidth_Bps=1e7)
    base = SimConfig(model=spec, hardware=hw, cache_experts=6, batch_size=2)
    assert plan_iterations(w, base, closed=False) is None  # continuous, trace arrivals
    assert plan_iterations(w, base, closed=True) is not None
    static = base.model_copy(update={"batching": "static"})
    plan = plan_iterations(w, static, closed=False)
    assert plan is not None and [len(it) for it in plan.schedule][0] == 2
    m = simulate(w, base).metrics
    assert m["bound_hit_belady"] is None and "timing" in m["bound_note"]


def test_batch_schedule_demands_match_the_simulator() -> None:
    """The replayed schedule demands what the simulator demands, step for step."""
    spec = small_spec(layers=3, experts=6, top_k=2)
    hw = exact_profile(expert_s=1e-4, dense_s=1e-4, head_s=1e-4, bandwidth_Bps=1e7)
    w = random_workload(spec, num_requests=5, seed=3, arrival_gap_s=2e-4)
    cases = [("continuous", 1, "closed"), ("continuous", 3, "closed"), ("static", 2, "closed")]
    cases += [("continuous", 1, "trace"), ("static", 2, "trace")]  # timing-free too
    for r, it in zip(w.requests, [0, 0, 2, 3, 9], strict=True):  # a served trace's admissions
        r.tags["served_iteration"] = it
    cases += [("continuous", 1, "schedule")]
    for batching, bs, arrivals in cases:
        cfg = SimConfig(
            model=spec,
            hardware=hw,
            cache_experts=36,
            batch_size=bs,
            batching=batching,
            arrivals=arrivals,
        )
        m = simulate(w, cfg).metrics
        plan = plan_iterations(w, cfg, closed=arrivals != "trace")
        assert plan is not None
        seq = demand_sequence_for(w, plan)
        assert seq.num_demands == m["demands"]
        assert seq.num_steps == m["layer_steps"]
        # the whole model fits: MIN misses each expert once, as LRU does
        assert m["bound_loads_min"] == m["loads"] == len(set(seq.keys.tolist()))
        # a smaller cache: the simulator's LRU hits exactly what the LRU stack finds on
        # the replayed sequence, so the sequence matches step for step, in order
        small = simulate(w, cfg.model_copy(update={"cache_experts": 8})).metrics
        assert small["hits"] == hits_by_capacity(seq, "lru")[8]
        assert small["hits"] <= min_run(seq, 8)[0]


def test_sequential_demands_are_the_distinct_experts_per_layer_step() -> None:
    spec = small_spec(layers=2, experts=4, top_k=2)
    w = random_workload(spec, num_requests=2, seed=0)
    seq = demand_sequence(w)
    steps = seq.steps()
    i = 0
    for r in w.requests:
        for it in range(r.num_iterations):
            ids = r.routing.topk_ids[r.iteration_rows(it)]
            for layer in range(2):
                want = sorted({layer * 4 + int(e) for e in ids[:, layer].ravel()})
                assert steps[i] == want
                i += 1
    assert i == len(steps)
    assert math.isclose(seq.num_demands, sum(len(s) for s in steps))


@settings(max_examples=20, deadline=None)
@given(tiny_sequences(max_keys=9, max_steps=40))
def test_next_use_numpy_and_numba_agree(case: tuple) -> None:
    from traces.cachesim_jit import _next_use
    from traces.demand import next_use

    steps, u, _ = case
    seq = seq_of(steps, u)
    nxt = next_use(seq)  # numpy below JIT_MIN_DEMANDS
    assert np.array_equal(nxt, _next_use(seq.keys, u))
    for i, k in enumerate(seq.keys.tolist()):  # the next position of the same key
        later = [j for j in range(i + 1, seq.num_demands) if seq.keys[j] == k]
        assert nxt[i] == (later[0] if later else np.iinfo(np.int64).max)
