"""fMoE's lookahead cells measured on the training rows at fit (``policies.fmoe_fit``):
the same measurement the gates make at run time, so a cell the training rows show right
is on from the first served token."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from tests.strategies import small_spec
from traces.types import Request, Routing, Workload

_CELLS = ("_la_n", "_la_h", "_la_e", "_la_chosen", "_la_rows")


def _bound(spec, **opts) -> FmoePolicy:
    pol = FmoePolicy(prefetch_distance=2, store_capacity=8, **opts)
    cache = ExpertCache(capacity=64, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [cache]))
    return pol


def _routing(rng: np.random.Generator, T: int, L: int, J: int, K: int, right: bool) -> Routing:
    """T tokens choosing K of J experts per layer; lookahead row l names layer l+1's
    choice (``right``) or is drawn independently of the route."""
    ids = np.stack([[rng.permutation(J)[:K] for _ in range(L)] for _ in range(T)])
    look = rng.random((T, L, J)).astype(np.float32)
    if right:
        look = np.full((T, L, J), 0.01, np.float32)
        for t in range(T):
            for lay in range(L - 1):
                look[t, lay, ids[t, lay + 1]] = 0.9
    probs = np.full((T, L, J), 0.1 / J, np.float32)
    for t in range(T):
        for lay in range(L):
            probs[t, lay, ids[t, lay]] += 0.9 / K
    return Routing(
        topk_ids=ids.astype(np.int64),
        topk_weights=np.full((T, L, K), 1.0 / K, np.float32),
        gate_probs=probs,
        lookahead=look,
    )


def _workload(spec, routings: list[Routing]) -> Workload:
    reqs = [
        Request(f"r{i}", 0.0, r.num_tokens, 1, r, prompt_embedding=np.ones(3, np.float32))
        for i, r in enumerate(routings)
    ]
    return Workload(spec, reqs, {})


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(2, 5),
    experts=st.integers(3, 8),
    top_k=st.integers(1, 3),
    tokens=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_fit_scores_the_cells_as_the_gates_would(layers, experts, top_k, tokens, seed):
    """Each training request scored at fit leaves the cells (picks, hits, chance hits,
    choice counts, on, p) as the gates leave them when the same rows run as one
    iteration of that many rows: the fit's measurement is the run time's."""
    top_k = min(top_k, experts)
    spec = small_spec(layers=layers, experts=experts, top_k=top_k, hidden=3)
    rng = np.random.default_rng(seed)
    routings = [_routing(rng, T, layers, experts, top_k, bool(rng.integers(2))) for T in tokens]
    fitted = _bound(spec)
    fitted.fit(_workload(spec, routings))
    online = _bound(spec)
    for it, r in enumerate(routings):
        T = r.num_tokens
        rows = tuple(f"r{it}" for _ in range(T))
        online.on_iteration_start(IterationStart(it, rows, np.arange(T), np.ones(T, bool)))
        for lay in range(layers):
            online.on_gate(
                GateOutput(
                    it, lay, r.topk_ids[:, lay], r.topk_weights[:, lay],
                    r.gate_probs[:, lay], r.lookahead[:, lay],
                )
            )  # fmt: skip
    for name in _CELLS:
        np.testing.assert_allclose(getattr(fitted, name), getattr(online, name), rtol=1e-12)
    assert fitted._la_on == online._la_on
    np.testing.assert_allclose(fitted._la_p, online._la_p, rtol=1e-12)
    assert fitted.metadata()["fit_rows"]["lookahead"] == sum(tokens)


def test_training_rows_that_name_the_next_layer_turn_cells_on_before_any_token():
    """Right lookahead rows in the training requests: the cells are on after fit, before
    a token is served (before, they turned on only after about 20 served picks each);
    rows independent of the route leave every cell off; ``lookahead=false`` scores none."""
    L, J, K = 4, 8, 2
    spec = small_spec(layers=L, experts=J, top_k=K, hidden=3)
    rng = np.random.default_rng(5)
    right = _workload(spec, [_routing(rng, 40, L, J, K, True) for _ in range(3)])
    noise = _workload(spec, [_routing(rng, 40, L, J, K, False) for _ in range(3)])
    on = _bound(spec)
    on.fit(right)
    md = on.metadata()
    assert md["lookahead_cells_on"] == f"{(L - 1) * K}/{L * K}"  # layer 0 has no picks
    assert md["lookahead_precision"] == 1.0 and md["fit_rows"]["lookahead"] == 120
    off = _bound(spec)
    off.fit(noise)
    assert off.metadata()["lookahead_cells_on"] == f"0/{L * K}"
    assert off.metadata()["lookahead_picks_scored"] == 120 * (L - 1) * K
    none = _bound(spec, lookahead=False)
    none.fit(right)
    assert "lookahead" not in none.metadata()["fit_rows"]
    assert float(none._la_n.sum()) == 0.0
