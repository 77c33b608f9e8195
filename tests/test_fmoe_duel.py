"""fMoE's eviction order learned against recency from counterfactual regrets
(policies/fmoe_duel.py, ``eviction_order="switch"`` / ``"blend"``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput
from policies.registry import make_policy
from tests.strategies import small_spec
from tests.test_fmoe_deadline import (
    STRUCTURELESS,
    J,
    _bound,
    _start,
    structureless_vs_lru,
)


def _gate_ids(pol, layer: int, ids: list[int], it: int = 0, now: float = 0.0) -> None:
    arr = np.array([ids])
    probs = np.full((1, J), 0.02, np.float32)
    pol.on_gate(GateOutput(it, layer, arr, np.ones(arr.shape, np.float32), probs, None, now))


def test_a_disagreement_charges_the_order_whose_victim_comes_back():
    """A full cache of two: (4, 0) loaded first (LRU's victim), (1, 0) later; the learned
    order would evict (1, 0) (its layer's forecast named expert 1). Layer 1 then chooses
    (1, 0): the learned order would have missed it, so its regret rises, not recency's."""
    pol, cache = _bound(None, capacity=2, prefetch_distance=2, eviction_order="switch")
    cache.preload([(4, 0)], now=0.0)
    cache.preload([(1, 0)], now=1.0)
    _start(pol)
    _gate_ids(pol, 0, [0])  # the duel samples the full cache here
    assert pol.duel_pairs == 1
    assert pol.duel_regret == [0.0, 0.0]
    _gate_ids(pol, 1, [0])
    assert pol.duel_regret == [1.0, 0.0]
    assert 0.0 <= pol.duel_weight < 0.5
    assert not pol._duel_recency  # one regret is noise: the cache keeps the learned order


def test_a_clear_lead_of_recency_switches_the_cache_to_lru_scores_and_back():
    pol, cache = _bound(None, capacity=2, prefetch_distance=2, eviction_order="switch")
    cache.preload([(1, 0), (4, 0)])
    _start(pol)
    pol.duel_regret[:] = [30.0, 5.0]  # beyond 2 sqrt(35) ~ 11.8
    pol._duel_apply()
    assert pol._duel_recency and not pol._scores_fast
    assert pol.eviction_scores(list(cache.entries.values())) == [0.0, 0.0]  # last use
    pol.duel_regret[:] = [30.0, 25.0]  # within the noise: back to the learned order
    pol._duel_apply()
    assert not pol._duel_recency and pol._scores_fast


@settings(max_examples=12, deadline=None)
@given(**STRUCTURELESS, order=st.sampled_from(["switch", "blend", "uses"]))
def test_without_information_the_duel_stays_near_lru_and_its_weight_in_0_1(
    seed, layers, experts, top_k, share, order
):
    """Routing without structure (the maps' predictions carry no information): hits within
    the noise of LRU's (as the expected-time order's own property in
    test_fmoe_deadline.py), the regrets non-negative and the weight in [0, 1]."""
    pol, got, lru, noise = structureless_vs_lru(
        seed, layers, experts, top_k, share, eviction_order=order
    )
    assert got.hit_rate >= lru.hit_rate - noise, (got.hit_rate, lru.hit_rate, noise)
    assert min(pol.duel_regret) >= 0.0
    assert 0.0 <= pol.duel_weight <= 1.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), gates=st.integers(0, 12), rows=st.sampled_from([1, 16]))
def test_uses_compiled_victim_is_the_lowest_python_score(seed, gates, rows):
    """``eviction_order=uses``: the cache's compiled victim choice (victim_index over its
    candidate arrays) is the entry with the lowest ``eviction_scores``, ties to the key."""
    from policies.base import IterationStart, PolicyContext
    from policies.cache import ExpertCache
    from policies.placement import Placement

    L2, J2 = 8, 8
    spec = small_spec(layers=L2, experts=J2, top_k=2, hidden=3)
    pol = make_policy("fmoe", store_capacity=4, admission="none", eviction_order="uses")
    cache = ExpertCache(capacity=48, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(L2, J2), [cache]))
    rng = np.random.default_rng(seed)
    keys = [(int(k // J2), int(k % J2)) for k in rng.permutation(L2 * J2)[:48]]
    for k in keys:
        cache.preload([k], now=float(rng.integers(0, 4)))
    emb = np.tile(np.eye(3, dtype=np.float32)[:1], (rows, 1))
    pol.on_iteration_start(
        IterationStart(0, ("r",) * rows, np.arange(rows), np.zeros(rows, bool), emb)
    )
    for g in range(min(gates, L2)):
        ids = rng.integers(0, J2, (rows, 2))
        ids[:, 1] = (ids[:, 0] + 1) % J2
        probs = np.full((rows, J2), 1.0 / J2, np.float32)
        pol.on_gate(GateOutput(0, g, ids, np.ones((rows, 2), np.float32), probs, None, 1.0))
    arr = cache.candidate_arrays()
    i = pol.victim_index(arr)
    group = list(cache._cands.values())
    scores = pol.eviction_scores(group)
    want = min(zip(scores, [e.key for e in group], strict=True))[1]
    assert i >= 0
    assert arr.entries[i].key == want
