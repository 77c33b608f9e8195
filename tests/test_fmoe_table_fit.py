"""fMoE's eviction table warmed at fit (``table_fit``, policies.fmoe_eviction
``_eviction_fit``): the training requests are counted into the chance table as the gates
count a served request alone in its batch, and those counts are taken out again when the
first served request finishes."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from tests.strategies import small_spec
from traces.types import Request, Routing, Workload


def _bound(spec, **opts) -> FmoePolicy:
    pol = FmoePolicy(prefetch_distance=2, store_capacity=8, **opts)
    cache = ExpertCache(capacity=64, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [cache]))
    return pol


def _request(rng: np.random.Generator, i: int, P: int, out: int, L: int, J: int, K: int) -> Request:
    T = P + out - 1
    ids = np.stack([[rng.permutation(J)[:K] for _ in range(L)] for _ in range(T)])
    r = Routing(topk_ids=ids.astype(np.int64), topk_weights=np.full((T, L, K), 1.0 / K, np.float32))
    return Request(f"r{i}", 0.0, P, out, r, prompt_embedding=np.ones(3, np.float32))


def _serve(pol: FmoePolicy, req: Request, rid: str) -> None:
    """Count ``req``'s routing as the gates do: its prompt as one iteration, then one row
    per iteration, the request alone in its batch (no forecast), then finish it."""
    ids, P = req.routing.topk_ids, req.prompt_len
    L = ids.shape[1]
    for a, b in [(0, P), *((t, t + 1) for t in range(P, ids.shape[0]))]:
        pol._cur_it += 1
        pol._batch_requests((rid,) * (b - a))
        for layer in range(L):
            pol._observe_choice(layer, ids[a:b, layer])
    pol._request_finished(rid)


@settings(max_examples=15, deadline=None)
@given(
    layers=st.integers(2, 4),
    experts=st.integers(3, 8),
    top_k=st.integers(1, 3),
    lens=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fit_counts_the_table_as_the_gates_would(layers, experts, top_k, lens, seed):
    """After fit the chance table's choices and visits (and with ``transitions`` the
    transition counts, whose bins the table counts by) are those the gates leave when the
    training requests are served one at a time, in order; a served request's finishing
    takes the table's out exactly, leaving what a policy without them counted (without
    ``transitions``: the transition counts, learned from the training split, stay)."""
    top_k = min(top_k, experts)
    spec = small_spec(layers=layers, experts=experts, top_k=top_k, hidden=3)
    rng = np.random.default_rng(seed)
    reqs = [_request(rng, i, P, n, layers, experts, top_k) for i, (P, n) in enumerate(lens)]
    for tr in (True, False):
        fitted = _bound(spec, transitions=tr)
        fitted.fit(Workload(spec, reqs, {}))
        replayed = _bound(spec, table_fit=False, transitions=tr)
        for r in reqs:
            _serve(replayed, r, r.request_id)
        assert np.sum(fitted._fl[1]) > 0
        np.testing.assert_allclose(fitted._fl[:2], replayed._fl[:2])
        if tr:
            np.testing.assert_array_equal(fitted._tc, replayed._tc)
    # a served request: with the replay's counts while it runs, without them once it ends
    served = _request(rng, 99, 2, 3, layers, experts, top_k)
    cold = _bound(spec, table_fit=False, transitions=False)
    cold.fit(Workload(spec, reqs, {}))
    assert not np.any(cold._fl[:2])  # table_fit=False: the earlier rule, fit counts nothing
    # the prior's weights the replay measured stay (request_prior="eb", learned from the
    # training split as the transitions are): the cold policy serves with them too
    cold._pop[:, -1] = fitted._pop[:, -1]
    _serve(fitted, served, "s")
    _serve(cold, served, "s")
    np.testing.assert_allclose(fitted._fl[:2], cold._fl[:2])


def test_first_request_reads_the_warm_table():
    """Before any served request the warm table differs from the empty one (the training
    rows' measured rates), and the table is made again from the counts left."""
    spec = small_spec(layers=3, experts=6, top_k=2, hidden=3)
    rng = np.random.default_rng(0)
    reqs = [_request(rng, i, 4, 6, 3, 6, 2) for i in range(4)]
    warm, cold = _bound(spec), _bound(spec, table_fit=False)
    warm.fit(Workload(spec, reqs, {}))
    cold.fit(Workload(spec, reqs, {}))
    assert not np.allclose(warm._chance(), cold._chance())
    assert warm._stats["table_fit_rows"] == sum(r.routing.num_tokens for r in reqs)
