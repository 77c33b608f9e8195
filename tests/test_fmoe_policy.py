"""The ``fmoe`` policy on hand-made stores (steps 1-6) and over random and structured workloads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PrefetchOrder,
    RequestArrival,
    validate_order,
)
from policies.cache import CacheFullError, ExpertCache
from policies.fmoe import FmoePolicy, default_prefetch_distance
from policies.placement import Placement
from policies.registry import make_policy, policy_class
from specs.errors import InputError
from specs.model_spec import ModelSpec
from tests.strategies import random_workload, small_spec
from traces.types import Request, Routing, Workload

L, J = 4, 4


def _spec(family: str = "test", layers: int = L, experts: int = J, top_k: int = 1) -> ModelSpec:
    return small_spec(layers=layers, experts=experts, top_k=top_k, hidden=3).model_copy(
        update={"family": family}
    )


def _bind(
    policy: Policy, spec: ModelSpec, cache_capacity: int = 64, distance: int | None = None
) -> ExpertCache:
    cache = ExpertCache(capacity=cache_capacity, expert_bytes=1)
    placement = Placement(spec.num_moe_layers, spec.num_experts)
    policy.bind(PolicyContext(spec, placement, [cache], prefetch_distance=distance))
    return cache


def _peaked(experts: list[int], top: float = 0.9) -> np.ndarray:
    """An [L, J] map putting ``top`` on one expert per layer, the rest spread evenly."""
    m = np.full((len(experts), J), (1 - top) / (J - 1), np.float32)
    m[np.arange(len(experts)), experts] = top
    return m


ROW0, ROW1 = _peaked([0, 0, 0, 0]), _peaked([1, 2, 3, 1])
E = np.eye(3, dtype=np.float32)


def _policy(**opts) -> tuple[FmoePolicy, ExpertCache]:
    pol = FmoePolicy(prefetch_distance=2, store_capacity=4, **opts)
    cache = _bind(pol, _spec())
    pol.store.add_batch(np.stack([ROW0, ROW1]), E[:2])
    return pol, cache


def _start(
    pol: Policy, emb: np.ndarray | None, it: int = 0, rids: tuple[str, ...] | None = None
) -> None:
    B = 1 if emb is None and rids is None else (len(rids) if rids else len(emb))
    rids = rids or tuple(f"r{b}" for b in range(B))
    pol.on_iteration_start(IterationStart(it, rids, np.zeros(B, int), np.zeros(B, bool), emb))


def _gate(pol: Policy, layer: int, probs: np.ndarray, it: int = 0, with_probs: bool = True) -> None:
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :1]
    w = np.ones_like(ids, dtype=np.float32)
    pol.on_gate(GateOutput(it, layer, ids, w, probs if with_probs else None))


def _orders(pol: Policy) -> list[tuple[int, int, float]]:
    return [(o.layer, o.expert, round(o.priority, 6)) for o in pol.decide_prefetch().enqueue]


def test_registered_async_and_options_validated():
    assert policy_class("fmoe") is FmoePolicy and FmoePolicy.async_search
    assert make_policy("fmoe", store_capacity="7").options.store_capacity == 7
    with pytest.raises(InputError, match="fmoe"):
        make_policy("fmoe", prediction="magic")
    with pytest.raises(InputError, match="fmoe"):
        make_policy("fmoe", no_such_option=1)


def test_semantic_search_predicts_first_d_layers_from_the_matching_row():
    pol, _ = _policy()
    _start(pol, np.array([[0.0, 2.0, 0.0]]))  # points at row 1
    # row 1's experts of layers 0, 1 at p / (l - (-1)), nearest first
    assert _orders(pol) == [(0, 1, 0.9), (1, 2, 0.45)]


def test_trajectory_search_predicts_layer_g_plus_d():
    pol, _ = _policy()
    _start(pol, np.array([[1.0, 0.0, 0.0]]))  # semantics say row 0 ...
    pol.decide_prefetch()
    _gate(pol, 0, ROW1[:1])  # ... but the gates follow row 1
    assert _orders(pol) == [(2, 3, 0.45)]  # row 1's layer 2 at p / (2 - 0)
    _gate(pol, 1, ROW1[1:2])
    assert _orders(pol) == [(3, 1, 0.45)]
    _gate(pol, 2, ROW1[2:3])
    assert _orders(pol) == []  # layer 4 does not exist


def test_weak_match_hedges_with_more_experts_and_fixed_top_k_does_not():
    flat = np.array([[0.5, 0.3, 0.1, 0.1]] * L, np.float32)
    weak = np.array([[1.0, 0.0, 3.0]])  # cosine 1/sqrt(10) with row 0: delta ~ .68
    got = {}
    for mode in ("traj+sem+delta", "traj+sem"):
        pol = FmoePolicy(prefetch_distance=1, store_capacity=4, prediction=mode)
        _bind(pol, _spec())
        pol.store.add_batch(flat[None], E[:1])
        _start(pol, weak)
        got[mode] = sorted(o.expert for o in pol.decide_prefetch().enqueue)
    assert got == {"traj+sem+delta": [0, 1], "traj+sem": [0]}


def test_traj_mode_has_no_semantic_orders():
    pol, _ = _policy(prediction="traj")
    _start(pol, np.array([[0.0, 2.0, 0.0]]))
    assert _orders(pol) == []
    _gate(pol, 0, ROW1[:1])
    assert _orders(pol) == [(2, 3, 0.45)]


def test_batch_rows_merge_as_a_union_with_max_priority():
    pol, _ = _policy()
    _start(pol, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.1]]))
    assert sorted(_orders(pol)) == [(0, 0, 0.9), (0, 1, 0.9), (1, 0, 0.45), (1, 2, 0.45)]


def test_cached_experts_are_not_ordered_again():
    pol, cache = _policy()
    cache.preload([(0, 1)])
    _start(pol, np.array([[0.0, 1.0, 0.0]]))
    assert _orders(pol) == [(1, 2, 0.45)]


def test_prompt_embedding_fallback_and_topk_rows_are_reported():
    pol, _ = _policy()
    pol.on_request_arrival(RequestArrival("a", 3, prompt_embedding=np.array([0.0, 1.0, 0.0])))
    _start(pol, None, rids=("a",))
    assert _orders(pol)[0][:2] == (0, 1)
    _gate(pol, 0, ROW1[:1], with_probs=False)
    md = pol.metadata()
    assert md["embedding_source"] == "prompt"
    assert md["gate_rows_source"] == {"gate_probs": 0, "topk_weights": 1}
    assert md["prefetch_distance_used"] == 2 and md["store_rows"] == 2


def test_prompt_embeddings_follow_the_batch_and_a_new_arrival():
    """A batch's prepared prompt rows are reused only for the same requests, and a
    request's embedding given again at arrival replaces what its batches search with."""
    pol, _ = _policy()
    first = lambda: _orders(pol)[0][:2]  # noqa: E731
    pol.on_request_arrival(RequestArrival("a", 3, prompt_embedding=np.array([0.0, 1.0, 0.0])))
    pol.on_request_arrival(RequestArrival("b", 3, prompt_embedding=np.array([1.0, 0.0, 0.0])))
    for it, rid, expert in [(0, "a", 1), (1, "a", 1), (2, "b", 0), (3, "a", 1)]:
        _start(pol, None, it=it, rids=(rid,))
        assert first() == (0, expert)  # row 1 leads with expert 1, row 0 with expert 0
    pol.on_request_arrival(RequestArrival("a", 3, prompt_embedding=np.array([1.0, 0.0, 0.0])))
    _start(pol, None, it=4, rids=("a",))
    assert first() == (0, 0)
    assert pol.metadata()["embedding_rows"] == {"token": 0, "prompt": 5, "none": 0}


def test_iteration_end_stores_rows_that_saw_every_layer():
    pol, _ = _policy()
    _start(pol, np.array([[0.0, 0.0, 1.0]]))
    for layer in range(L):
        _gate(pol, layer, ROW1[layer : layer + 1] * 0.5 + ROW0[layer : layer + 1] * 0.5)
    pol.on_iteration_end(IterationEnd(0, ("r0",)))
    assert pol.store.size == 3
    np.testing.assert_allclose(pol.store.maps[:, 2], ROW1 * 0.5 + ROW0 * 0.5, atol=1e-6)
    np.testing.assert_allclose(pol.store.emb[2], [0, 0, 1])
    _start(pol, np.array([[0.0, 0.0, 1.0]]), it=1)
    _gate(pol, 0, ROW1[:1], it=1)
    pol.on_iteration_end(IterationEnd(1, ("r0",)))  # layers 1.. never ran: not stored
    assert pol.store.size == 3


def test_running_dots_stay_exact_when_the_store_changes_mid_iteration():
    pol, _ = _policy()
    _start(pol, np.array([[0.0, 1.0, 0.0]]))
    _gate(pol, 0, ROW1[:1])
    pol.store.add_batch(
        np.stack([ROW1, ROW0, ROW1]), np.eye(3, dtype=np.float32)
    )  # appends and replaces
    _gate(pol, 1, ROW0[1:2])
    it = pol._it
    n = pol.store.size
    expect = pol.store.prefix_dots(np.arange(n), it.observed, 2)
    np.testing.assert_allclose(it.dots[:, :n], expect, atol=1e-6)
    np.testing.assert_allclose(it.sem[:, :n], pol.store.semantic_scores(it.query), atol=1e-6)


def test_eviction_weighs_prediction_by_frequency_and_protection_wins():
    pol, cache = _policy(eviction="paper")
    _start(pol, np.array([[0.0, 1.0, 0.0]]))  # searched map: row 1 (layer 1 favours expert 2)
    likely, unlikely = (1, 2), (1, 0)
    cache.preload([likely, unlikely])
    for key, uses in ((likely, 1), (unlikely, 20)):
        for _ in range(uses):
            cache.use(key, now=1.0)
    assert cache.choose_victim(pol.eviction_scores) == unlikely  # .033 x 20 < .9 x 1
    for _ in range(20):
        cache.use(unlikely, now=1.0)
    assert cache.choose_victim(pol.eviction_scores) == likely  # .033 x 40 > .9 x 1
    cache.entries[likely].protected = True  # predicted, not yet used
    cache.entries[unlikely].protected = False
    assert cache.choose_victim(pol.eviction_scores) == unlikely
    cache.entries[unlikely].pins = 1  # in use: only the protected one can go
    assert cache.choose_victim(pol.eviction_scores) == likely


@pytest.mark.parametrize("mode", ["paper", "fmoe"])
def test_ties_break_by_recency(mode):
    pol, cache = _policy(eviction=mode)
    cache.preload([(3, 2), (3, 3)])
    cache.use((3, 2), now=5.0)
    cache.use((3, 3), now=2.0)
    pol.on_expert_used((3, 2), 1, 5.0)
    assert cache.choose_victim(pol.eviction_scores) == (3, 3)  # no prediction: same estimate


@pytest.mark.parametrize("mode", ["lru", "lfu", "lfu-global"])
def test_lru_and_lfu_eviction_switches(mode):
    pol, cache = _policy(eviction=mode)
    cache.preload([(0, 0), (0, 1)])
    for _ in range(3):
        cache.use((0, 0), now=1.0)
        pol.on_expert_used((0, 0), 1, 1.0)
    cache.use((0, 1), now=2.0)
    pol.on_expert_used((0, 1), 1, 2.0)
    assert cache.choose_victim(pol.eviction_scores) == ((0, 0) if mode == "lru" else (0, 1))


@pytest.mark.parametrize(
    "family, option, ctx, expected",
    [("mixtral", None, None, 3), ("qwen2_moe", None, None, 6), ("phimoe", None, None, 4),
     ("olmoe", None, None, 3), ("mixtral", None, 5, 5), ("mixtral", 2, 5, 2), ("qwen2_moe", None, 40, 8)],
)  # fmt: skip
def test_prefetch_distance_defaults_and_overrides(family, option, ctx, expected):
    spec = _spec(family=family, layers=8)
    pol = FmoePolicy(prefetch_distance=option)
    _bind(pol, spec, distance=ctx)
    assert pol.distance == expected
    assert default_prefetch_distance(spec) == {"mixtral": 3, "qwen2_moe": 6, "phimoe": 4}.get(
        family, 3
    )


def test_fit_fills_the_store_from_training_tokens_with_topk_fallback():
    spec = _spec(top_k=2)
    wl = random_workload(spec, num_requests=6, seed=4, with_probs=False)
    train, test = wl.split(0.7)
    pol = FmoePolicy(store_capacity=1000)
    pol.fit(train)  # before bind: sized from the training spec
    _bind(pol, spec)
    tokens = train.num_tokens
    assert pol.store.size == tokens and len(train.requests) == 4 and len(test.requests) == 2
    r0 = train.requests[0].routing
    first = np.zeros((L, J), np.float32)
    np.put_along_axis(first, r0.topk_ids[0].astype(int), r0.topk_weights[0], axis=1)
    np.testing.assert_allclose(pol.store.maps[:, 0], first)
    assert pol.metadata()["fit_rows"] == {"topk_weights": tokens, "emb_token": tokens}
    with pytest.raises(InputError, match="layers"):
        pol.fit(random_workload(_spec(layers=2), num_requests=1))


def test_store_saved_and_loaded_through_the_option(tmp_path):
    pol, _ = _policy()
    pol.save_store(tmp_path / "store.npz")
    again = FmoePolicy(
        store_path=str(tmp_path / "store.npz"), store_capacity=4, prefetch_distance=2
    )
    _bind(again, _spec())
    np.testing.assert_allclose(again.store.stored_maps(), pol.store.stored_maps())
    default_cap = FmoePolicy(store_path=str(tmp_path / "store.npz"))
    _bind(default_cap, _spec())
    assert default_cap.store.capacity == 4  # the file's, not the option's default
    with pytest.raises(InputError, match="exceed capacity"):
        _bind(FmoePolicy(store_path=str(tmp_path / "store.npz"), store_capacity=1), _spec())
    with pytest.raises(InputError, match="experts"):
        _bind(FmoePolicy(store_path=str(tmp_path / "store.npz")), _spec(experts=5))


# -- whole workloads through a minimal driver -------------------------------------------


def _drive(
    pol: Policy, wl: Workload, cache_capacity: int
) -> tuple[ExpertCache, list[PrefetchOrder]]:
    """Play requests one after another; prefetches land at once, misses load on demand."""
    spec = wl.spec
    cache = _bind(pol, spec, cache_capacity)
    orders: list[PrefetchOrder] = []

    def apply(now_layer: int) -> None:
        for o in pol.decide_prefetch().enqueue:
            validate_order(o, spec)
            orders.append(o)
            if o.key in cache.entries or o.layer <= now_layer:
                continue
            try:
                cache.begin_load(o.key, 0.0, prefetch=True, scores=pol.eviction_scores)
                cache.finish_load(o.key, 0.0)
            except CacheFullError:
                pass

    it = 0
    for req in wl.requests:
        r = req.routing
        pol.on_request_arrival(
            RequestArrival(req.request_id, req.prompt_len, prompt_embedding=req.prompt_embedding)
        )
        for i in range(req.num_iterations):
            rows = req.iteration_rows(i)
            B = rows.stop - rows.start
            emb = None if r.embeddings is None else r.embeddings[rows]
            rids = (req.request_id,) * B
            pol.on_iteration_start(
                IterationStart(
                    it, rids, np.arange(rows.start, rows.stop), np.full(B, i == 0), emb, now=it
                )
            )
            apply(-1)
            for layer in range(spec.num_moe_layers):
                probs = None if r.gate_probs is None else r.gate_probs[rows, layer]
                pol.on_gate(
                    GateOutput(
                        it,
                        layer,
                        r.topk_ids[rows, layer],
                        r.topk_weights[rows, layer],
                        probs,
                        now=it,
                    )
                )
                apply(layer)
                for j in np.unique(r.topk_ids[rows, layer]):
                    key = (layer, int(j))
                    if not cache.demand(key) and key not in cache.entries:
                        cache.begin_load(key, it, prefetch=False, scores=pol.eviction_scores)
                        cache.finish_load(key, it)
                    cache.use(key, float(it))
                    pol.on_expert_used(key, B, float(it))
                cache.unprotect_layer(layer)
            done = (req.request_id,) if i == req.num_iterations - 1 else ()
            pol.on_iteration_end(IterationEnd(it, rids, done, now=it))
            it += 1
    return cache, orders


class _NoPrefetchLRU(Policy):
    name = "test-lru"


@settings(max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    with_probs=st.booleans(),
    with_emb=st.booleans(),
    cap=st.integers(1, 5),
)
def test_random_workloads_give_valid_deterministic_orders(seed, with_probs, with_emb, cap):
    spec = small_spec(layers=3, experts=6, top_k=2)
    wl = random_workload(
        spec, num_requests=4, seed=seed, with_probs=with_probs, with_embeddings=with_emb
    )
    runs = []
    for _ in range(2):
        pol = FmoePolicy(store_capacity=cap, prefetch_distance=1)
        cache, orders = _drive(pol, wl, cache_capacity=6)
        assert pol.store.size <= cap
        assert cache.counters.hits + cache.counters.misses == cache.counters.demands
        assert all(np.isfinite(o.priority) and o.priority >= 0 for o in orders)
        runs.append([(o.layer, o.expert, o.priority) for o in orders])
    assert runs[0] == runs[1]


def _topic_workload(
    spec: ModelSpec, requests: int, seed: int, topics: int = 6, noise: float = 1.0
) -> Workload:
    """Requests of ``topics`` topics; a topic fixes nearby embeddings and its routing per layer."""
    rng = np.random.default_rng(seed)
    Lm, Jm, K, H = spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size
    centres = rng.normal(size=(topics, H))
    topic_logits = rng.normal(size=(topics, Lm, Jm)) * 3.0
    reqs = []
    for i in range(requests):
        t = i % topics
        p, o = 2, 6
        T = p + o - 1
        logits = topic_logits[t] + rng.normal(size=(T, Lm, Jm)) * noise
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
        w = np.take_along_axis(probs, ids, -1)
        emb = centres[t] + rng.normal(size=(T, H)) * 0.2
        routing = Routing(ids.astype(np.int16), (w / w.sum(-1, keepdims=True)).astype(np.float32),
                          probs.astype(np.float32), emb.astype(np.float32))  # fmt: skip
        reqs.append(Request(f"q{i}", float(i), p, o, routing))
    return Workload(spec, reqs, {"source": "test topics"})


def _hit_rate(pol: Policy, wl: Workload, cache_capacity: int) -> float:
    cache, _ = _drive(pol, wl, cache_capacity)
    return cache.counters.hits / cache.counters.demands


def test_fmoe_beats_lru_and_semantics_help_on_a_trace_with_semantic_structure():
    spec = small_spec(layers=6, experts=16, top_k=2, hidden=12)
    train, test = _topic_workload(spec, 40, seed=7).split(0.7, seed=1)
    rates = {}
    for mode in ("traj", "traj+sem+delta"):
        pol = FmoePolicy(store_capacity=200, prefetch_distance=2, prediction=mode)
        pol.fit(train)
        rates[mode] = _hit_rate(pol, test, cache_capacity=16)
    lru = _hit_rate(_NoPrefetchLRU(), test, cache_capacity=16)
    assert rates["traj+sem+delta"] > lru + 0.1, (rates, lru)
    assert rates["traj+sem+delta"] > rates["traj"] + 0.05, (
        rates
    )  # layers < d need the semantic search


def test_lfu_counts_uses_while_cached_and_lfu_global_remembers_across_evictions():
    """The paper's caching ablation: lfu is fmoe's freq without p (it restarts when an
    expert is evicted and reloaded); lfu-global keeps counting over the run."""
    for mode, expected in (("lfu", (0, 0)), ("lfu-global", (0, 1))):
        pol, cache = _policy(eviction=mode)
        cache.preload([(0, 0)])
        for _ in range(3):  # (0, 0) was popular before ...
            pol.on_expert_used((0, 0), 1, 1.0)
        cache.preload([(0, 1)])
        cache.use((0, 1), now=2.0)  # ... but only (0, 1) was used since it is cached
        pol.on_expert_used((0, 1), 1, 2.0)
        assert cache.choose_victim(pol.eviction_scores) == expected, mode


def _gate_la(pol: Policy, layer: int, probs: np.ndarray, look: np.ndarray | None) -> None:
    ids = np.argsort(-probs, axis=1, kind="stable")[:, :1]
    w = np.ones_like(ids, dtype=np.float32)
    pol.on_gate(GateOutput(0, layer, ids, w, probs, look))


def test_lookahead_option_orders_the_next_layers_speculated_top_k():
    look = np.array([[0.1, 0.2, 0.6, 0.1]], np.float32)  # speculates expert 2 for layer 1
    off, _ = _policy(lookahead=False)
    on, _ = _policy(lookahead=True)
    assert on.wants_lookahead and not off.wants_lookahead
    for pol in (off, on):
        _start(pol, np.array([[1.0, 0.0, 0.0]]))  # row 0: layers 0, 1 predict expert 0
        pol.decide_prefetch()
        _gate_la(pol, 0, ROW0[:1], look)
    # both order row 0's layer 2 (trajectory); only lookahead=True adds (1, 2) at p / 1
    assert _orders(off) == [(2, 0, 0.45)]
    assert sorted(_orders(on)) == [(1, 2, 0.6), (2, 0, 0.45)]
    assert on.metadata()["lookahead_gates"] == 1
    # the last layer has no next layer; a gate without lookahead rows orders nothing extra
    _gate_la(on, 3, ROW0[3:4], look)
    _gate_la(on, 1, ROW0[1:2], None)
    assert all(layer != 4 for layer, _, _ in _orders(on))
    with pytest.raises(InputError, match="lookahead"):
        _gate_la(on, 2, ROW0[2:3], np.ones((1, J + 1), np.float32))
