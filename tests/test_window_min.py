"""window-MIN (traces.horizon.window_min_run, sim.bounds.window_hit_rates): Belady's
choice over the next W iterations, recency beyond; checked against an independent
list-based replay and, on tiny inputs, against the exhaustive optimum."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.cachesim import min_run
from traces.demand import DemandSequence
from traces.horizon import window_min_run


def _seq(steps: list[list[int]], num_keys: int) -> DemandSequence:
    keys = [k for s in steps for k in sorted(set(s))]
    start = np.zeros(len(steps) + 1, np.int64)
    np.cumsum([len(set(s)) for s in steps], out=start[1:])
    return DemandSequence(np.asarray(keys, np.int32), start, num_keys)


def _reference(steps: list[list[int]], capacity: int, window: int, per_iter: int) -> int:
    """Hits of window-MIN by its definition, on Python lists (no shared code)."""
    steps = [sorted(set(s)) for s in steps]
    iters = -(-len(steps) // per_iter)
    cache: list[int] = []  # least recently used first
    hits = 0
    for s, step in enumerate(steps):
        it = s // per_iter
        end = s + 1 if window == 0 else min(it + window, iters) * per_iter
        future = steps[s + 1 : end]  # the foreseen steps after this one
        hits += sum(k in cache for k in step)
        for k in step:
            if k in cache:
                cache.remove(k)
                cache.append(k)
                continue
            if len(cache) == capacity:
                free = [c for c in cache if c not in step]
                blind = [c for c in free if not any(c in f for f in future)]
                if blind:
                    victim = blind[0]
                else:  # every one is foreseen: the one demanded furthest ahead
                    victim = max(
                        free, key=lambda c: next(i for i, f in enumerate(future) if c in f)
                    )
                cache.remove(victim)
            cache.append(k)
    return hits


def _optimum(steps: list[list[int]], capacity: int) -> int:
    """The most hits of any demand-only schedule with the step's keys pinned (exhaustive)."""
    steps = [tuple(sorted(set(s))) for s in steps]
    best = {frozenset(): 0}  # cache contents -> most hits so far
    for step in steps:
        nxt: dict[frozenset, int] = {}
        for cache, h in best.items():
            h2 = h + sum(k in cache for k in step)
            states = [set(cache)]
            for k in step:
                if k in cache:
                    continue
                grown = []
                for c in states:
                    if len(c) < capacity:
                        grown.append(c | {k})
                    else:  # any victim not of this step
                        grown += [(c - {v}) | {k} for v in c if v not in step]
                states = grown
            for c in states:
                f = frozenset(c)
                nxt[f] = max(nxt.get(f, -1), h2)
        best = nxt
    return max(best.values())


cases = st.integers(2, 6).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.integers(1, 3),  # steps per iteration
        st.lists(st.lists(st.integers(0, n - 1), min_size=1, max_size=2), min_size=1, max_size=24),
    )
)


def _iters(num_steps: int, per_iter: int) -> np.ndarray:
    return np.unique(np.append(np.arange(0, num_steps, per_iter), num_steps)).astype(np.int64)


@settings(max_examples=30, deadline=None)
@given(cases, st.integers(2, 4), st.integers(0, 5))
def test_window_min_matches_its_definition_and_lies_below_min(
    case: tuple, capacity: int, window: int
) -> None:
    n, per_iter, steps = case
    seq = _seq(steps, n)
    bounds = _iters(len(steps), per_iter)
    hits, misses = window_min_run(seq, capacity, window, bounds)
    assert hits + misses == seq.num_demands
    assert hits == _reference(steps, capacity, window, per_iter)
    best = min_run(seq, capacity, jit=False)[0]
    assert hits <= best  # MIN is the optimum: a theorem, so for every window
    # a window covering the whole run is MIN
    assert window_min_run(seq, capacity, len(bounds), bounds)[0] == best


@settings(max_examples=15, deadline=None)
@given(cases, st.integers(2, 3))
def test_min_and_the_full_window_are_the_exhaustive_optimum(case: tuple, capacity: int) -> None:
    n, per_iter, steps = case
    steps = steps[:10]
    seq = _seq(steps, n)
    opt = _optimum(steps, capacity)
    assert min_run(seq, capacity, jit=False)[0] == opt
    assert window_min_run(seq, capacity, len(steps), _iters(len(steps), per_iter))[0] == opt


def test_window_zero_is_lru_and_one_sees_the_rest_of_the_iteration() -> None:
    # iterations of two steps: [0] [1] | [2] [0]; capacity 2
    steps = [[0], [1], [2], [0]]
    seq = _seq(steps, 3)
    bounds = np.array([0, 2, 4])
    assert window_min_run(seq, 2, 0, bounds)[0] == 0  # LRU evicts 0 for 2
    # W = 1: at step 2 the rest of its iteration (step 3: key 0) is seen, so 1 goes
    assert window_min_run(seq, 2, 1, bounds)[0] == 1
    # an iteration boundary limits the window: [0] [1] [2] | [0], W = 1 sees nothing of 0
    assert window_min_run(seq, 2, 1, np.array([0, 3, 4]))[0] == 0
    assert window_min_run(seq, 2, 2, np.array([0, 3, 4]))[0] == 1


def test_a_warm_start_counts_its_keys_as_least_recent() -> None:
    steps = [[0], [2], [1]]
    seq = _seq(steps, 3)
    bounds = np.arange(4)
    assert window_min_run(seq, 2, 0, bounds, initial=np.array([0, 1]))[0] == 1  # 1 evicted
    assert window_min_run(seq, 2, 3, bounds, initial=np.array([0, 1]))[0] == 2  # MIN keeps it
    assert min_run(seq, 2, initial=np.array([0, 1]), jit=False)[0] == 2


def test_window_min_rejects_bad_arguments() -> None:
    seq = _seq([[0, 1], [2]], 3)
    with pytest.raises(ValueError, match="window"):
        window_min_run(seq, 2, -1, np.array([0, 2]))
    with pytest.raises(ValueError, match="iteration_start"):
        window_min_run(seq, 2, 1, np.array([0, 1]))
    with pytest.raises(ValueError, match="largest step"):
        window_min_run(seq, 1, 1, np.array([0, 2]))


def test_window_hit_rates_reach_the_bound_on_a_simulated_run() -> None:
    from sim.bounds import run_bounds, window_hit_rates
    from sim.config import SimConfig
    from specs.presets import load_hardware, load_model
    from traces.synth import SynthConfig, generate

    spec = load_model("mixtral-8x7b")
    w = generate(spec, SynthConfig(num_requests=3, seed=1, prompt_len_mean=10, output_len_mean=8))
    cfg = SimConfig(model=spec, hardware=load_hardware("a100-80gb-pcie4"), cache_experts=64)
    iters = sum(r.num_iterations for r in w.requests)
    rates = window_hit_rates(w, cfg, [64], True, [0, 1, 2, iters])
    assert rates is not None
    bound = run_bounds(w, cfg, [64], True, spill=False)["bound_hit_belady"]
    assert rates[iters] == pytest.approx(bound, abs=1e-12)
    assert max(rates[0], rates[1], rates[2]) <= bound + 1e-12
    # two GPUs: one cache per device, as the bound
    two = window_hit_rates(w, cfg, [32, 32], True, [iters])
    assert two is not None
    assert two[iters] == pytest.approx(
        run_bounds(w, cfg, [32, 32], True, spill=False)["bound_hit_belady"]
    )


def test_window_zero_is_the_simulators_lru_on_the_trained_trace() -> None:
    """experiments/window_gap.py's window-MIN runs on the simulated run's demands: at
    W = 0 it is the simulator's own LRU hit rate, and its MIN is the run's bound."""
    from experiments.fmoe_vs_baselines import _job
    from experiments.window_gap import window_row
    from experiments.workload_stats import TRAINED_TRACE
    from traces.io import load_workload

    w = load_workload(TRAINED_TRACE)
    rates = window_row(w, "a100-80gb-pcie4", 0.25, [0, 1])
    assert rates is not None
    trace = str(TRAINED_TRACE)
    row = _job((trace, "a100-80gb-pcie4", 0.25, "lru", 30, 0, {}, {}, trace, None))
    assert rates[0] == pytest.approx(row["hit_rate_routed"], abs=1e-12)
    assert rates["MIN"] == pytest.approx(row["bound_hit_belady"], abs=1e-12)
    assert rates[1] <= rates["MIN"]
