"""Belady-H (traces.horizon): LRU at horizon 0, MIN at a full horizon, between them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.cachesim import hits_by_capacity, min_run
from traces.demand import DemandSequence, next_use
from traces.horizon import horizon_run


def _seq(steps: list[list[int]], num_keys: int) -> DemandSequence:
    keys = [k for s in steps for k in sorted(set(s))]
    start = np.zeros(len(steps) + 1, np.int64)
    np.cumsum([len(set(s)) for s in steps], out=start[1:])
    return DemandSequence(np.asarray(keys, np.int32), start, num_keys)


def _lru(steps: list[list[int]], capacity: int) -> int:
    """Hits of a plain LRU list with the step's keys pinned (the reference)."""
    cache: list[int] = []  # least recent first
    hits = 0
    for step in steps:
        step = sorted(set(step))
        hits += sum(k in cache for k in step)
        for k in step:
            if k in cache:
                cache.remove(k)
            elif len(cache) == capacity:
                victim = next(c for c in cache if c not in step)
                cache.remove(victim)
            cache.append(k)
    return hits


sequences = st.integers(2, 9).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.lists(st.lists(st.integers(0, n - 1), min_size=1, max_size=2), min_size=1, max_size=40),
    )
)


@settings(max_examples=25, deadline=None)
@given(sequences, st.integers(2, 6), st.integers(0, 6))
def test_horizon_lies_between_lru_and_min(data: tuple, capacity: int, horizon: int) -> None:
    n, steps = data
    seq = _seq(steps, n)
    lru_hits = _lru(steps, capacity)
    h0, m0 = horizon_run(seq, capacity, 0)
    assert h0 == lru_hits
    assert h0 + m0 == seq.num_demands
    full, _ = horizon_run(seq, capacity, len(steps))
    assert full == min_run(seq, capacity, jit=False)[0]
    mid, _ = horizon_run(seq, capacity, horizon)
    assert mid <= full


def test_horizon_zero_is_the_lru_stack_on_a_long_sequence() -> None:
    rng = np.random.default_rng(3)
    steps = [rng.choice(16, size=2, replace=False).tolist() for _ in range(400)]
    seq = _seq(steps, 16)
    nxt = next_use(seq)
    for c in (2, 5, 9):
        assert horizon_run(seq, c, 0, nxt)[0] == hits_by_capacity(seq, "lru")[c]
        assert horizon_run(seq, c, 400, nxt)[0] == min_run(seq, c, nxt=nxt)[0]


def test_seeing_the_next_step_avoids_evicting_it() -> None:
    # capacity 2: after a, b the miss on c must evict; the next step uses a again
    steps = [[0], [1], [2], [0], [1]]
    seq = _seq(steps, 3)
    assert horizon_run(seq, 2, 0)[0] == 0  # LRU evicts a, then b
    assert horizon_run(seq, 2, 1)[0] == 1  # keeps a (needed next), evicts b


def test_horizon_rejects_a_cache_below_a_step() -> None:
    with pytest.raises(ValueError, match="largest step"):
        horizon_run(_seq([[0, 1, 2]], 3), 2, 1)


def test_forecast_horizon_experiment_on_the_trained_trace() -> None:
    from experiments.forecast_horizon import HORIZONS, measure
    from experiments.workload_stats import TRAINED_TRACE
    from traces.io import load_workload

    row = measure("trained", load_workload(TRAINED_TRACE), 0.25)
    hits = [float(str(row[f"H={h}"]).split()[0]) for h in HORIZONS[1:]]
    assert row["LRU"] <= hits[0] and hits[-1] <= row["MIN"]
    assert row["half gap at H"] in HORIZONS[1:] or row["half gap at H"] == "> 64"


def test_the_rest_of_the_iteration_is_seen_with_iteration_steps() -> None:
    # iterations of 2 steps: [0], [1] | [2], [0] ... capacity 2
    steps = [[0], [1], [2], [0]]
    seq = _seq(steps, 3)
    # at step 2 (first of its iteration) the rest of the iteration (step 3: key 0) is seen
    assert horizon_run(seq, 2, 0, iteration_steps=2)[0] == 1
    assert horizon_run(seq, 2, 0)[0] == 0
    # at the last step of an iteration nothing more is seen: iteration_steps=1 is horizon 0
    assert horizon_run(seq, 2, 0, iteration_steps=1) == horizon_run(seq, 2, 0)
