"""policies.fmoe_orders_jit.protect_put (issue 21, speed only) against the Python it
replaces on random inputs: the protection loop of FmoeOrders._order
(FmoeEviction._protect's two writes per expert) followed by the candidates' rule
(CandidateSet.put where neither ordered this iteration nor cached) leave the same arrays
and the same candidate set, in the same order."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fmoe_cands import CandidateSet
from policies.fmoe_orders_jit import protect_put

L, J = 4, 12


def _python(protect, prot, etnu, issued, layer, experts, cached, vals, ahead, cands):  # noqa: ANN001, ANN202
    """FmoeOrders._order's loop for deadline candidates, with its protection."""
    for i, (j, v) in enumerate(zip(experts, vals, strict=True)):
        if protect:
            prot[layer, j] = True
            etnu[layer, j] = -0.0
        if issued[layer, j] or cached[i]:
            continue
        issued[layer, j] = True
        cands.put(layer, j, v * ahead)


@settings(max_examples=30, deadline=None)
@given(
    protect=st.booleans(),
    layer=st.integers(0, L - 1),
    experts=st.lists(st.integers(0, J - 1), min_size=1, max_size=J),
    data=st.data(),
    ahead=st.sampled_from([1.0, 2.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_protect_put_matches_the_python_loop(
    protect: bool, layer: int, experts: list[int], data: st.DataObject, ahead: float, seed: int
) -> None:
    n = len(experts)
    vals = data.draw(
        st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n), label="vals"
    )
    cached = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), np.bool_)
    rng = np.random.default_rng(seed)
    issued0 = rng.random((L, J)) < 0.3
    etnu0 = rng.random((L, J))
    prot0 = rng.random((L, J)) < 0.2
    # candidates already in the set (some of this layer's, at other p)
    pre = [(int(rng.integers(L)), int(rng.integers(J)), float(rng.random())) for _ in range(5)]

    def fresh() -> tuple[np.ndarray, np.ndarray, np.ndarray, CandidateSet]:
        cs = CandidateSet(L, J)
        for la, j, p in pre:
            cs.put(la, j, p)
        return prot0.copy(), etnu0.copy(), issued0.copy(), cs

    prot_a, etnu_a, iss_a, cs_a = fresh()
    _python(protect, prot_a, etnu_a, iss_a, layer, experts, cached, vals, ahead, cs_a)
    prot_b, etnu_b, iss_b, cs_b = fresh()
    cs_b.cnt = protect_put(
        protect, prot_b, etnu_b, iss_b, layer, np.array(experts, np.int64), cached,
        np.array(vals, np.float64), ahead, cs_b.p, cs_b.idx, cs_b.cnt,
    )  # fmt: skip
    assert np.array_equal(prot_a, prot_b)
    assert np.array_equal(np.signbit(etnu_a), np.signbit(etnu_b))
    assert np.array_equal(etnu_a, etnu_b)
    assert np.array_equal(iss_a, iss_b)
    assert cs_a.cnt == cs_b.cnt
    assert cs_a.idx[: cs_a.cnt].tolist() == cs_b.idx[: cs_b.cnt].tolist()
    assert cs_a.p.tobytes() == cs_b.p.tobytes()
