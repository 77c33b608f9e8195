"""fMoE's per-layer chance table (``layer_table=True``): each layer's cells shrunk toward
the pooled ones by empirical Bayes, so a layer whose tokens re-use their experts keeps
its just-used expert over one of a layer at chance; identical layers pool completely."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_fmoe_deadline import L, _bound
from tests.test_fmoe_rows import _gate, _it_start

STICKY, AT_CHANCE = 4, 1  # layer 4 re-uses its previous expert, layer 1 draws uniformly


def _history(pol, seed: int, iterations: int = 200) -> tuple[int, int]:
    """One-row decode steps of request r0: layer STICKY keeps its previous expert with
    chance 0.9, every other layer draws uniformly. Returns the last iteration's experts
    of layers AT_CHANCE and STICKY (all layers have run: both are passed layers)."""
    rng = np.random.default_rng(seed)
    J = pol._last_it.shape[1]
    prev = [0] * L
    for it in range(iterations):
        _it_start(pol, it, 1, "r0")
        for lay in range(L):
            stay = 0.9 if lay == STICKY else 0.0
            j = prev[lay] if rng.random() < stay else int(rng.integers(0, J))
            prev[lay] = j
            _gate(pol, it, lay, [j])
    return prev[AT_CHANCE], prev[STICKY]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_sticky_layers_just_used_expert_stays(seed: int) -> None:
    """At the end of an iteration both experts were just chosen; the one of the layer at
    chance is used again next iteration with chance K/J, the sticky layer's with about
    0.9, so the per-layer table evicts the former (the pooled table prices both at one
    age-1 chance, and the sooner layer's expert then looks sooner)."""
    pol, cache = _bound(None, capacity=2, prefetch_distance=1, admission="none", layer_table=True)
    a, b = _history(pol, seed)
    cache.preload([(AT_CHANCE, a), (STICKY, b)], now=1000.0)
    assert cache.choose_victim(pol.eviction_scores) == (AT_CHANCE, a)
    e_chance, e_sticky = pol.expected_next_use(AT_CHANCE, a), pol.expected_next_use(STICKY, b)
    assert e_sticky < e_chance


def test_the_pooled_table_keeps_the_sooner_layers_expert() -> None:
    """The same history with one pooled table (the default): the other choice."""
    pol, cache = _bound(None, capacity=2, prefetch_distance=1, admission="none", layer_table=False)
    a, b = _history(pol, 0)
    cache.preload([(AT_CHANCE, a), (STICKY, b)], now=1000.0)
    assert cache.choose_victim(pol.eviction_scores) == (STICKY, b)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    layers=st.integers(1, 5),
    visits=st.integers(1, 400),
)
def test_identical_layers_pool_completely(seed: int, layers: int, visits: int) -> None:
    """Every layer with the same counts: no variance between layers beyond sampling's,
    so every layer's block is exactly the pooled table."""
    from policies import fmoe_jit

    rng = np.random.default_rng(seed)
    R, A = fmoe_jit.CAL_ROWS, 16
    n = rng.integers(0, visits + 1, size=(R, A)).astype(float)
    h = np.floor(n * rng.random((R, A)))
    fl = np.zeros((3, R * (1 + layers), A))
    fl[0, :R], fl[1, :R] = h * layers, n * layers
    for lay in range(layers):
        o = (1 + lay) * R
        fl[0, o : o + R], fl[1, o : o + R] = h, n
    fmoe_jit.decreasing_rows(fl, 0.25, 10)
    for lay in range(layers):
        o = (1 + lay) * R
        assert np.array_equal(fl[2, o : o + R], fl[2, :R])
    # and the pooled block is what the pooled table alone gives
    flat = fl[:, :R].copy()
    fmoe_jit.decreasing_rows(flat, 0.25, 10)
    assert np.array_equal(flat[2], fl[2, :R])


def test_a_layer_that_differs_gets_its_own_chances() -> None:
    from policies import fmoe_jit

    R, A = fmoe_jit.CAL_ROWS, 16
    fl = np.zeros((3, R * 3, A))
    # request row 5, age bucket 0: layer 0 chose 900 of 1000 visits, layer 1 100 of 1000
    for lay, hits in ((0, 900.0), (1, 100.0)):
        o = (1 + lay) * R
        fl[0, o + 5, 0], fl[1, o + 5, 0] = hits, 1000.0
    fl[0, 5, 0], fl[1, 5, 0] = 1000.0, 2000.0
    fmoe_jit.decreasing_rows(fl, 0.25, 10)
    p0, p1 = fl[2, R + 5, 0], fl[2, 2 * R + 5, 0]
    assert p0 > 0.8 and p1 < 0.2  # far apart: the counts outweigh the prior
    assert p0 > fl[2, 5, 0] > p1
