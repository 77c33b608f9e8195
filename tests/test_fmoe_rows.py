"""fMoE's expected time to next use in an iteration of many rows (a prompt): an expert of
a layer still ahead is used in it when any of the rows chooses it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationStart
from tests.test_fmoe_deadline import J, L, _bound


def _it_start(pol, it: int, rows: int, rid: str) -> None:
    emb = np.tile(np.eye(3, dtype=np.float32)[:1], (rows, 1))
    pos = np.arange(rows)
    pol.on_iteration_start(IterationStart(it, (rid,) * rows, pos, np.zeros(rows, bool), emb))


def _gate(pol, it: int, layer: int, ids) -> None:
    ids = np.asarray(ids).reshape(-1, 1)
    probs = np.full((len(ids), J), 0.02, np.float32)
    w = np.ones((len(ids), 1), np.float32)
    pol.on_gate(GateOutput(it, layer, ids, w, probs, None, float(it)))


def _decode_history(pol, seed: int, stay: float) -> None:
    """60 one-row decode steps of request r0: each layer re-uses its previous expert with
    chance ``stay``; layer 3 never chooses expert 2 in the last 20 (it grows old)."""
    rng = np.random.default_rng(seed)
    prev = [0] * L
    for it in range(60):
        _it_start(pol, it, 1, "r0")
        for lay in range(L):
            j = prev[lay] if rng.random() < stay else int(rng.integers(0, J))
            while lay == 3 and j == 2 and it >= 40:
                j = int(rng.integers(0, J))
            prev[lay] = j
            _gate(pol, it, lay, [j])
    pol._request_finished("r0")


def test_a_prompt_keeps_the_old_expert_of_a_layer_ahead_over_one_just_used():
    """The expected-time order (``eviction_order=time``, whose expected time the admission
    also prices victims by). Decode routing with recency (a layer re-uses its expert 70% of the time): at one
    row, the old expert (3, 2) of a layer still ahead is the victim; in a 32-row prompt
    (every expert of layer 0 just chosen, (0, 1) among them) (3, 2) is chosen by some row
    almost surely before (0, 1) comes back, so (0, 1) goes. The one-row estimate, used
    for every iteration before, evicted (3, 2)."""
    pol, cache = _prompt_after_decode(eviction_order="time")
    assert pol._ev_rows == 32
    assert cache.choose_victim(pol.eviction_scores) == (0, 1)
    pol._set_rows(1)  # the same state priced for one row: the old answer
    assert cache.choose_victim(pol.eviction_scores) == (3, 2)


def _prompt_after_decode(**opts):
    """A 2-slot cache after decode routing that re-uses a layer's expert 70% of the time,
    then a 32-row prompt's gate at layer 0 (every expert chosen), with (3, 2) and (0, 1)
    resident: (pol, cache)."""
    pol, cache = _bound(None, capacity=2, prefetch_distance=1, admission="none", **opts)
    _decode_history(pol, 0, 0.7)
    _it_start(pol, 60, 32, "r1")
    _gate(pol, 60, 0, np.arange(32) % J)
    cache.preload([(3, 2), (0, 1)], now=60.0)
    return pol, cache


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(2, 64), stay=st.floats(0.0, 0.9))
def test_more_rows_never_lengthen_an_expected_time_and_leave_passed_layers_alone(seed, rows, stay):
    """For every expert: with R rows its expected time is at most the one-row one (more
    rows, more chances to be used before the next iteration) and at least its layer's
    distance; experts of passed layers (next used in a later iteration) are unchanged."""
    pol, _ = _bound(None, capacity=8, prefetch_distance=1, admission="none")
    _decode_history(pol, seed, stay)
    _it_start(pol, 60, rows, "r1")
    _gate(pol, 60, 1, np.arange(rows) % J)
    many = -np.asarray(pol._etnu_table()).copy()
    pol._set_rows(1)
    one = -np.asarray(pol._etnu_table()).copy()
    g = pol._g
    for lay in range(L):
        if lay > g:
            assert (many[lay] <= one[lay] + 1e-9).all()
            prot = pol._prot[lay]
            assert (many[lay][~prot] >= lay - g - 1e-9).all()
        else:
            assert np.array_equal(many[lay], one[lay])


def test_prompt_rows_off_keeps_the_one_row_chance():
    """``prompt_rows=False`` (the earlier rule): a prompt is priced as one row."""
    pol, cache = _prompt_after_decode(prompt_rows=False, eviction_order="time")
    assert pol._ev_rows == 1
    assert cache.choose_victim(pol.eviction_scores) == (3, 2)
