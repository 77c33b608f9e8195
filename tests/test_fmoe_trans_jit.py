"""policies.fmoe_trans_jit.transition_bins_into (the loop over experts innermost, issue 21
speed work) against transition_bins_into_ref (expert by expert, the form it had): the
same bins, bit for bit, on random counts, shrinkage, latest tokens and request slots."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_trans_jit as tj


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    L=st.integers(1, 4),
    J=st.integers(2, 40),
    K=st.integers(1, 4),
    S=st.integers(1, 4),
    layer=st.integers(-1, 3),
    pop_on=st.booleans(),
)
def test_bins_equal_the_expert_by_expert_reference(
    seed: int, L: int, J: int, K: int, S: int, layer: int, pop_on: bool
) -> None:
    rng = np.random.default_rng(seed)
    layer = min(layer, L - 1)
    tn = rng.integers(0, 300, (L, J + 1)).astype(np.float64)
    tc = (rng.random((L, J, J)) * tn[:, :J, None]).astype(np.float32)
    tm = rng.random((L, J)) * tn[:, J : J + 1]
    tau = rng.normal(0.005, 0.01, L)  # some layers without structure (tau <= 0)
    prev = rng.integers(-1, J, (S, L, K))
    prev[rng.random((S, L)) < 0.3, 0] = -1  # slots without a latest token
    rn = rng.integers(0, 50, (S, L)).astype(np.float64)
    rc = rng.random((S, L, J)) * rn[:, :, None]
    slots = rng.permutation(S)[: rng.integers(0, S + 1)]
    pop = rng.random((L, J + 1)) * 100 if pop_on else np.zeros((0, 0))
    base = K / J
    got = np.full((5, L, J), -7, np.int64)
    want = got.copy()
    tj.transition_bins_into(got, 3, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, 10, layer)
    tj.transition_bins_into_ref(want, 3, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, 10, layer)
    np.testing.assert_array_equal(got, want)
