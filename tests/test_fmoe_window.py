"""fMoE's characteristic-time eviction order (``eviction_order=window``,
policies/fmoe_window.py, kernels policies/fmoe_window_jit.py): the chance of use within
the cache's measured residence time, against a direct computation; the compiled victim
is the Python scorer's lowest; never worse than LRU where routing has no structure."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_window_jit
from policies.fmoe_eviction import AGE_BUCKETS, age_bucket
from tests.test_fmoe_deadline import STRUCTURELESS, structureless_vs_lru
from tests.test_fmoe_shadow import _bound, _random_gates_then_preload


def _direct_chance(chance, g, it, rows, horizon, L, lay, last, fc_row, fresh, freq):
    """-log(1 - P) of the window's P, walking the visits one by one (the module doc's
    formula; 1 - P as the product of the visits' chances of missing, in logs)."""
    age = it - last
    if lay > g:
        t = lay - g
        p1 = chance[fc_row if fresh else freq, int(age_bucket(np.array(age)))]
        p1 = 1.0 - (1.0 - p1) ** rows if rows > 1 else p1
        a = age + 1
    else:
        t = L - g + lay
        a = max(age, 0) + 1
        p1 = chance[freq, int(age_bucket(np.array(a)))]
        a += 1
    if t > horizon:
        return 0.0
    log_miss = math.log(1.0 - p1)
    t += L
    while t <= horizon:
        log_miss += math.log(1.0 - chance[freq, int(age_bucket(np.array(a)))])
        a += 1
        t += L
    return -log_miss


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    L=st.integers(1, 6),
    g=st.integers(0, 5),
    age=st.integers(0, 40),
    rows=st.integers(1, 4),
    horizon=st.floats(0.5, 400.0),
    fresh=st.booleans(),
)
def test_window_chance_is_one_minus_every_visit_in_the_window_missing(
    seed, L, g, age, rows, horizon, fresh
):
    """-log(1 - P) of the kernel equals the visit-by-visit product of the chances of
    missing, each later visit at the age it will have then (ages cross buckets)."""
    g = min(g, L - 1)
    rng = np.random.default_rng(seed)
    J, it = 3, 50
    fl = np.zeros((3, 30, AGE_BUCKETS))
    fl[2] = rng.uniform(0.01, 0.9, (30, AGE_BUCKETS))
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = it - age
    ist[1] = 12
    ist[2, :, 0] = it if fresh else -1
    ist[3] = 3
    prot = np.zeros((L, J), np.bool_)
    for lay in range(L):
        got = fmoe_window_jit.window_chance(ist, fl, prot, g, it, rows, horizon, L, lay, 0)
        want = _direct_chance(fl[2], g, it, rows, horizon, L, lay, it - age, 12, fresh, 3)
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    prot[0, 0] = True
    assert fmoe_window_jit.window_chance(ist, fl, prot, g, it, rows, horizon, L, 0, 0) == np.inf


def test_a_visit_beyond_the_window_counts_nothing():
    """An expert whose layer comes back only after the window has chance 0, however likely
    it is then; one inside the window keeps its chance."""
    L, J, it = 4, 2, 10
    fl = np.zeros((3, 30, AGE_BUCKETS))
    fl[2] = 0.5
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = it - 1
    ist[2] = -1
    prot = np.zeros((L, J), np.bool_)
    # gate 1: layer 3 is 2 steps ahead, layer 0 comes back in 3 steps
    assert fmoe_window_jit.window_chance(ist, fl, prot, 1, it, 1, 2.0, L, 0, 0) == 0.0
    near = fmoe_window_jit.window_chance(ist, fl, prot, 1, it, 1, 2.0, L, 3, 0)
    assert math.isclose(near, -math.log(0.5))


@settings(max_examples=15, deadline=None)
@given(
    layers=st.integers(2, 6),
    experts=st.integers(3, 8),
    seed=st.integers(0, 10_000),
    gates=st.integers(1, 40),
)
def test_window_kernel_picks_the_scorers_lowest(layers, experts, seed, gates):
    """``eviction_order=window``: the kernel's victim over the cache's candidate arrays is
    the entry the Python scorer ranks lowest (ties to the lower key)."""
    rng = np.random.default_rng(seed)
    pol, cache = _bound(layers, experts, layers * experts, "window")
    keys = _random_gates_then_preload(pol, cache, rng, layers, experts, gates)
    if not keys:
        return
    for i, k in enumerate(keys):
        cache.entries[k].last_used = float(rng.integers(0, 100)) + i * 1e-3
    arr = cache.candidate_arrays()
    entries = [arr.entries[s] for s in range(arr.n)]
    scores = pol.eviction_scores(entries)  # before victim_index: it measures its victim
    i = pol.victim_index(arr)
    free = [(sc, e.key) for sc, e in zip(scores, entries, strict=True) if sc != float("inf")]
    if not free:
        assert i < 0
        return
    assert arr.entries[i].key == min(free)[1]


@settings(max_examples=10, deadline=None)
@given(**STRUCTURELESS)
def test_window_order_is_never_worse_than_lru_on_random_routing(
    seed, layers, experts, top_k, share
):
    """Routing without structure: the window order matches LRU within the noise, with
    either measured window."""
    for wt in ("age", "residence"):
        _, fmoe, lru, noise = structureless_vs_lru(
            seed, layers, experts, top_k, share, eviction_order="window", window_time=wt
        )
        assert fmoe.hit_rate >= lru.hit_rate - noise, (wt, fmoe.hit_rate, lru.hit_rate, noise)
