"""``promoe``'s gate as compiled code (:mod:`policies.compiled_gate`'s contract): the
orders :meth:`policies.promoe.ProMoE.on_gate` makes, computed in numba so the
simulator's prefetching kernel calls it in place of a return to Python at every layer
step.

What it reproduces, step for step, at layer ``l``'s gate with target ``t = l + d``
(nothing when ``t`` is past the last layer):

- a row is known when any of its routed experts ``i`` has a count ``rows[l, i] > 0``;
  no known row, no orders;
- a known row's score of expert ``j``: the mean over its K routed ``i`` (summed in
  order, then divided by K, as numpy's ``mean`` over that axis) of
  ``(N[l, i, j] + a) / (rows[l, i] + a J + 1e-300)``;
- each known row votes its top ``n`` scores (ties to the lower expert; ``union_top``),
  summed over the rows in row order;
- the experts with a positive vote, by vote descending then expert ascending, kept per
  device (``(t * J + j) % devices``) within ``capacity - routed experts of layer l on
  that device`` (at least 0), and an order for each kept one not among that device's
  cache entries (``select_orders``), the vote as its priority.

The tables ``N`` and ``rows`` are the policy's own arrays: views into ``pf`` (laid out
by :func:`policies.promoe.float_state`: ``N`` (L*J*J), ``rows`` (L*J), the smoothing,
then scratch for J scores and J votes; the policy's online learning adds to the tables
in place between iterations).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies import compiled_gate, gate_select_jit
from policies.gate_select_jit import orders_from_votes, scratch_ints, vote_top
from specs.jitcache import stamp_dependencies

# pi: sizes and options, then scratch (policies.gate_select_jit's)
P_J, P_D, P_L, P_STRIDE, P_TOPN, P_SCRATCH = 0, 1, 2, 3, 4, 5


def int_state(layers: int, experts: int, devices: int, stride: int, top_n: int) -> np.ndarray:
    """The gate's int state (``pi``): sizes, stride, top-n and its scratch."""
    pi = np.zeros(P_SCRATCH + scratch_ints(experts, devices), np.int64)
    pi[P_J], pi[P_D], pi[P_L], pi[P_STRIDE], pi[P_TOPN] = experts, devices, layers, stride, top_n
    return pi


@njit(cache=True, _nrt=False)
def stride_gate(pi, pf, layer, now, ids, look, ki, kf, gi, ordk, ordp, nout):
    """The stride prefetch's orders at ``layer``'s gate (the module's docstring)."""
    J, D, L, d, n = pi[P_J], pi[P_D], pi[P_L], pi[P_STRIDE], pi[P_TOPN]
    for c in range(4):
        nout[c] = 0
    target = layer + d
    if target >= L:
        return 0
    o_rows = L * J * J
    o_a = o_rows + L * J
    o_sc = o_a + 1  # a row's scores
    o_v = o_sc + J  # votes
    a = pf[o_a]
    den_add = a * J
    R, _, K = ids.shape
    for e in range(J):
        pf[o_v + e] = 0.0
    known = 0
    for r in range(R):
        s = 0.0
        for k in range(K):
            s += pf[o_rows + layer * J + ids[r, layer, k]]
        if not s > 0:
            continue
        known += 1
        for e in range(J):
            acc = 0.0
            for k in range(K):
                i = ids[r, layer, k]
                acc += (pf[(layer * J + i) * J + e] + a) / (
                    pf[o_rows + layer * J + i] + den_add + 1e-300
                )
            pf[o_sc + e] = acc / K
        vote_top(pi, pf, P_SCRATCH, o_sc, o_v, J, n)
    if known == 0:
        return 0
    m = orders_from_votes(pi, pf, P_SCRATCH, o_v, J, D, layer, target, ids, ki, gi, ordk, ordp)
    nout[3] = m  # on_gate's orders: the second batch
    return 0


# the kernel compiles in policies.compiled_gate's column numbers and gate_select_jit's
# kernels: their contents join its disk-cache stamp (specs/jitcache.py)
stamp_dependencies(globals().values(), (compiled_gate, gate_select_jit))
