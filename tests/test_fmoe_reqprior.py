"""The empirical-Bayes weight of the population prior in a request's frequency
(``request_prior="eb"``, policies/fmoe_reqprior.py): the closed form from the finished
requests' rates, its limits (requests that stray from the population get a weak prior,
ones at its rate an infinite one), the kernels' rule with the weight column, and the
default path unchanged."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_jit, fmoe_trans_jit
from policies.base import PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.fmoe_eviction import CAL_BINS
from policies.placement import Placement
from tests.strategies import small_spec
from tests.test_fmoe_deadline import STRUCTURELESS, structureless_vs_lru


def _bound(L: int, J: int, **opts: object) -> FmoePolicy:
    spec = small_spec(layers=L, experts=J, top_k=1, hidden=3)
    pol = FmoePolicy(store_capacity=4, admission="none", request_prior="eb", **opts)
    pol.bind(PolicyContext(spec, Placement(L, J), [ExpertCache(capacity=L * J, expert_bytes=1)]))
    return pol


def _closed_form(rates_c, rates_n, m):
    """w = mean m (1 - m) / tau2, tau2 from the requests' rates around m (module doc)."""
    J = len(m)
    obs = sum((n * (c / n - m) ** 2).sum() for c, n in zip(rates_c, rates_n, strict=True))
    expect = len(rates_n) * (m * (1 - m)).sum()
    tau2 = (obs - expect) / (J * sum(rates_n))
    return (m * (1 - m)).mean() / tau2 if tau2 > 0 else np.inf


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), reqs=st.integers(1, 6), J=st.integers(2, 8))
def test_weight_is_the_method_of_moments_estimate(seed, reqs, J):
    """After requests finish with counts c (rows n), each layer's weight equals the
    closed form computed from the requests' rates and the population's rate."""
    rng = np.random.default_rng(seed)
    L = 2
    pol = _bound(L, J)
    pop = pol._pop
    pop[:, :J] = rng.integers(0, 50, (L, J))
    pop[:, J] = pop[:, :J].sum(1) + 1
    cs, ns = [], []
    for _ in range(reqs):
        n = rng.integers(1, 30, L).astype(float)
        c = np.stack([rng.multinomial(int(n[lay]), rng.dirichlet(np.ones(J))) for lay in range(L)])
        pol._request_prior_add(c.astype(float), n)
        cs.append(c)
        ns.append(n)
    pol._request_prior_weights(pop)
    m = (pop[:, :J] + pol._base) / (pop[:, J : J + 1] + 1.0)
    for lay in range(L):
        want = _closed_form([c[lay] for c in cs], [n[lay] for n in ns], m[lay])
        got = pop[lay, J + 1]
        assert (np.isinf(want) and np.isinf(got)) or np.isclose(got, want, rtol=1e-9)


def test_requests_that_stray_get_a_weak_prior_and_typical_ones_an_infinite_one():
    """Requests each choosing only their own expert (the largest spread there is: tau2 ->
    m (1 - m)) weigh the prior at about one observation, the default's rule; requests choosing at exactly the population's rate
    (no spread beyond sampling) at infinity: every request is the population."""
    J, L = 4, 1
    pol = _bound(L, J)
    pop = pol._pop
    pop[0, :J] = 100.0
    pop[0, J] = 100.0 * J / 1  # top-1: rows = choices
    for j in range(J):
        c = np.zeros((L, J))
        c[0, j] = 40.0
        pol._request_prior_add(c, np.array([40.0]))
    pol._request_prior_weights(pop)
    assert 1.0 <= pop[0, J + 1] < 1.1  # 1 + 3 / 117 here: sampling's share of the spread
    pol2 = _bound(L, J)
    pop2 = pol2._pop
    pop2[0, :J] = 100.0
    pop2[0, J] = 400.0
    for _ in range(4):
        pol2._request_prior_add(np.full((L, J), 10.0), np.array([40.0]))
    pol2._request_prior_weights(pop2)
    assert pop2[0, J + 1] == np.inf
    # the metadata keeps infinity out of its numbers (not valid JSON) and counts the layer
    meta = pol2.request_prior_metadata()
    assert meta["request_prior_layers_no_spread"] == 1
    assert meta["request_prior_weight_min"] is None and meta["request_prior_weight_max"] is None
    json.dumps(meta, allow_nan=False)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.sampled_from([1.0, 0.5, 7.0, 300.0, np.inf]))
def test_request_bins_with_the_weight_column(seed, w):
    """request_bins and the transitions' _request_f compute (c + w q) / (n + w) per
    request (q the population's rate; w = inf: q); w = 1 is bit for bit the rule without
    the column."""
    rng = np.random.default_rng(seed)
    L, J, S = 2, 5, 3
    base = 1 / J
    rc = rng.integers(0, 6, (S, L, J)).astype(float)
    rn = rc.sum(2) + rng.integers(0, 3, (S, L))
    slots = np.array([0, 2], np.int64)
    pop = np.zeros((L, J + 2))
    pop[:, :J] = rng.integers(0, 30, (L, J))
    pop[:, J] = pop[:, :J].sum(1) + 2
    pop[:, J + 1] = w
    ist = np.zeros((4, L, J), np.int64)
    fmoe_jit.request_bins(ist, rc, rn, slots, base, CAL_BINS, -1, pop)
    for lay in range(L):
        for j in range(J):
            q = (pop[lay, j] + base) / (pop[lay, J] + 1.0)
            if np.isinf(w):
                f = q
            else:
                f = 1.0 - np.prod([1.0 - (rc[s, lay, j] + w * q) / (rn[s, lay] + w) for s in slots])
            assert ist[3, lay, j] == min(int(f / (f + base) * CAL_BINS), CAL_BINS - 1)
            got = fmoe_trans_jit._request_f(rc, rn, slots, pop, lay, j, base)
            assert np.isclose(got, f, rtol=1e-12)
    if w == 1.0:
        plain = np.zeros_like(ist)
        fmoe_jit.request_bins(plain, rc, rn, slots, base, CAL_BINS, -1, pop[:, : J + 1].copy())
        assert np.array_equal(plain, ist)


def test_weights_are_learned_at_fit_and_reported():
    """The training replay's requests set the weights before serving (finite on routing
    whose requests differ), and the policy's metadata reports them; the earlier rule
    (``request_prior="one"``) keeps the population counts without the column."""
    from traces.synth import SynthConfig, generate

    spec = small_spec(layers=3, experts=6, top_k=2, hidden=8)
    train = generate(
        spec, SynthConfig(num_requests=6, seed=2, prompt_len_mean=6, output_len_mean=30)
    )
    pol = FmoePolicy(store_capacity=20, admission="none", request_prior="eb")
    pol.bind(PolicyContext(spec, Placement(3, 6), [ExpertCache(capacity=9, expert_bytes=1)]))
    pol.fit(train)
    meta = pol.metadata()
    assert 0 < meta["request_prior_weight_min"] <= meta["request_prior_weight_max"]
    assert np.isfinite(meta["request_prior_weight_min"])
    assert meta["request_prior_layers_no_spread"] == 0
    default = FmoePolicy(store_capacity=20, admission="none", request_prior="one")
    default.bind(PolicyContext(spec, Placement(3, 6), [ExpertCache(capacity=9, expert_bytes=1)]))
    assert default._pop.shape == (3, 7)
    assert "request_prior_weight_min" not in default.metadata()


@settings(max_examples=10, deadline=None)
@given(**STRUCTURELESS)
def test_eb_prior_is_never_worse_than_lru_on_random_routing(seed, layers, experts, top_k, share):
    """Routing without structure: the learned prior's weight keeps fMoE within the noise
    of LRU."""
    _, fmoe, lru, noise = structureless_vs_lru(
        seed, layers, experts, top_k, share, request_prior="eb"
    )
    assert fmoe.hit_rate >= lru.hit_rate - noise, (fmoe.hit_rate, lru.hit_rate, noise)
