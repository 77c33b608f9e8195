"""fMoE's layer-first eviction order and the shadow duel (policies/fmoe_shadow.py; issue
20, "never worse than LRU when the predictions carry no information")."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from policies.replay import replay
from tests.strategies import random_workload, small_spec
from tests.test_fmoe_deadline import STRUCTURELESS, _no_prefetch, structureless_vs_lru


def _bound(layers: int, experts: int, capacity: int, order: str) -> tuple[FmoePolicy, ExpertCache]:
    spec = small_spec(layers=layers, experts=experts, top_k=1, hidden=3)
    pol = FmoePolicy(store_capacity=4, eviction_order=order, admission="none")
    cache = ExpertCache(capacity=capacity, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(layers, experts), [cache]))
    return pol, cache


def _random_gates_then_preload(
    pol: FmoePolicy,
    cache: ExpertCache,
    rng: np.random.Generator,
    layers: int,
    experts: int,
    gates: int,
) -> list[tuple[int, int]]:
    """``gates`` gates of random top-1 routing (one row per iteration, request r0), then a
    random half of the experts preloaded; the preloaded keys (maybe none)."""
    it = -1
    for n in range(gates):
        g = n % layers
        if g == 0:
            it += 1
            pol.on_iteration_start(
                IterationStart(it, ("r0",), np.zeros(1, int), np.zeros(1, bool), None)
            )
        ids = rng.choice(experts, size=(1, 1))
        probs = np.full((1, experts), 1.0 / experts, np.float32)
        pol.on_gate(GateOutput(it, g, ids, np.ones((1, 1), np.float32), probs, None, float(n)))
    keys = [(lay, j) for lay in range(layers) for j in range(experts) if rng.random() < 0.5]
    if keys:
        cache.preload(keys, 0.0)
    return keys


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(2, 6),
    experts=st.integers(3, 8),
    seed=st.integers(0, 10_000),
    gates=st.integers(1, 40),
)
def test_layer_order_evicts_from_the_layer_that_comes_back_last(layers, experts, seed, gates):
    """After any gate the lowest-scored entry belongs to the layer whose next visit is
    furthest among the cached layers, and within that layer the order is the expected
    time's (the time order's scores, ranked alike)."""
    rng = np.random.default_rng(seed)
    pol, cache = _bound(layers, experts, layers * experts, "layer")
    keys = _random_gates_then_preload(pol, cache, rng, layers, experts, gates)
    if not keys:
        return
    entries = [cache.entries[k] for k in keys]
    for i, e in enumerate(entries):
        e.last_used = float(rng.integers(0, 100)) + i * 1e-3  # distinct recency
    scores = pol.eviction_scores(entries)
    free = [e for e, s in zip(entries, scores, strict=True) if s != float("inf")]
    if not free:
        return
    victim = entries[int(np.argmin(scores))]
    visit = {e.key[0]: pol._next_visit(e.key[0], pol._g) for e in free}
    assert visit[victim.key[0]] == max(visit.values())
    same = [e for e in free if e.key[0] == victim.key[0]]
    time_scores = pol._scores_etnu(same)
    assert victim is same[int(np.argmin(time_scores))]


@settings(max_examples=12, deadline=None)
@given(**STRUCTURELESS)
def test_layer_order_and_duel_are_never_worse_than_lru_on_random_routing(
    seed, layers, experts, top_k, share
):
    """Routing without structure: both the layer-first order and the duel match LRU
    within the noise of a finite trace (the property the expected-time order has too)."""
    for order in ("layer", "shadow"):
        _, fmoe, lru, noise = structureless_vs_lru(
            seed, layers, experts, top_k, share, eviction_order=order
        )
        assert fmoe.hit_rate >= lru.hit_rate - noise, (order, fmoe.hit_rate, lru.hit_rate)


def test_one_tokens_worth_of_cache_keeps_every_layers_share():
    """The router-only Mixtral-shaped case (6 layers, 8 experts, top-2, a cache of 12: one
    token's experts) on random routing: the layer-first order is not below LRU on any of
    eight draws by more than a standard error of a hit rate, and on average it is above
    it (Belady's rule with equal chances: evicting the layer that comes back last loses no
    layer's visit)."""
    L, J, K = 6, 8, 2
    spec = small_spec(layers=L, experts=J, top_k=K, hidden=4)
    diffs = []
    for seed in range(8):
        work = random_workload(spec, num_requests=6, seed=seed, max_prompt=8, max_output=60)
        train = random_workload(spec, num_requests=4, seed=seed + 1, max_prompt=8, max_output=30)
        lru = replay(work, _no_prefetch("lru"), capacity_experts=L * K)
        pol = _no_prefetch("fmoe", store_capacity=50, eviction_order="layer")
        lay = replay(work, pol, capacity_experts=L * K, training=train)
        se = (lru.hit_rate * (1 - lru.hit_rate) / lru.counters["demands"]) ** 0.5
        assert lay.hit_rate >= lru.hit_rate - se, (seed, lay.hit_rate, lru.hit_rate, se)
        diffs.append(lay.hit_rate - lru.hit_rate)
    assert np.mean(diffs) > 0.0, diffs


def test_the_cache_follows_the_shadow_that_leads_by_two_standard_errors():
    """The duel's switch rule: the cache's scorer is the layer-first one exactly while
    that shadow's lead in hits is beyond 2 sqrt(demands exactly one shadow hit), and
    back when the expected-time shadow leads by as much."""
    pol, cache = _bound(3, 4, 6, "shadow")
    assert pol._shadow_on and not pol._shadow_layer and pol._scores_fast
    tab = np.full((3, 4), -5.0)
    pol.shadow_hits, pol.shadow_diff = [100, 119], 100  # lead 19 < 2 x 10
    pol._shadow_play(0, np.array([[0]]), tab)
    assert not pol._shadow_layer
    pol.shadow_hits, pol.shadow_diff = [100, 121], 100  # lead 21 > 20 (the gate adds one
    pol._shadow_play(0, np.array([[1]]), tab)  # miss to each shadow: no change of lead)
    assert pol._shadow_layer and not pol._scores_fast and pol.shadow_switches == 1
    pol.shadow_hits, pol.shadow_diff = [130, 100], 100
    pol._shadow_play(1, np.array([[0]]), tab)
    assert not pol._shadow_layer and pol._scores_fast and pol.shadow_switches == 2
    md = pol.metadata()
    assert md["shadow_following"] == "time" and md["shadow_switches"] == 2


def test_shadows_play_each_order_out():
    """Two layers, two slots, one expert a gate: after layer 0 chose 0 and layer 1 chose
    0, layer 0 choosing 1 needs a victim. The expected-time shadow evicts the longest
    expected time (layer 1's expert, by the table given), the layer-first one layer 0's
    (it comes back last); each shadow then counts its own hits."""
    pol, _ = _bound(2, 3, 2, "shadow")
    # minus the expected times: layer 1's expert 0 is the time order's victim (-9 lowest)
    tab = np.array([[-2.0, -2.0, -2.0], [-9.0, -1.0, -1.0]])
    for g, j in ((0, 0), (1, 0), (0, 1)):
        pol._shadow_play(g, np.array([[j]]), tab)
    time_mask, layer_mask = (m[0] for m in pol._sh_mask)
    assert {tuple(k) for k in np.argwhere(time_mask)} == {(0, 0), (0, 1)}
    assert {tuple(k) for k in np.argwhere(layer_mask)} == {(1, 0), (0, 1)}
    pol._shadow_play(1, np.array([[0]]), tab)  # layer 1 chooses 0 again: layer-first hits
    assert pol.shadow_hits == [0, 1] and pol.shadow_diff == 1


@settings(max_examples=15, deadline=None)
@given(
    layers=st.integers(2, 6),
    experts=st.integers(3, 8),
    seed=st.integers(0, 10_000),
    gates=st.integers(1, 40),
)
def test_density_kernel_picks_the_scorers_lowest(layers, experts, seed, gates):
    """``eviction_order=density``: the kernel's victim over the cache's candidate arrays
    is the entry the Python scorer ranks lowest (ties to the lower key)."""
    rng = np.random.default_rng(seed)
    pol, cache = _bound(layers, experts, layers * experts, "density")
    keys = _random_gates_then_preload(pol, cache, rng, layers, experts, gates)
    if not keys:
        return
    for i, k in enumerate(keys):
        cache.entries[k].last_used = float(rng.integers(0, 100)) + i * 1e-3
    arr = cache.candidate_arrays()
    i = pol.victim_index(arr)
    entries = [arr.entries[s] for s in range(arr.n)]
    scores = pol.eviction_scores(entries)
    free = [(sc, e.key) for sc, e in zip(scores, entries, strict=True) if sc != float("inf")]
    if not free:
        assert i < 0
        return
    assert arr.entries[i].key == min(free)[1]
