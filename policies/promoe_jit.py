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

from policies import compiled_gate
from policies.compiled_gate import ABSENT, G_CAP, K_DEV, K_STATE
from specs.jitcache import stamp_dependencies

# pi: sizes and options, then scratch (J routed marks, D routed counts, D ranks,
# J picked marks, J candidates)
P_J, P_D, P_L, P_STRIDE, P_TOPN, P_SCRATCH = 0, 1, 2, 3, 4, 5


def int_state(layers: int, experts: int, devices: int, stride: int, top_n: int) -> np.ndarray:
    """The gate's int state (``pi``): sizes, stride, top-n and its scratch."""
    pi = np.zeros(P_SCRATCH + 3 * experts + 2 * devices, np.int64)
    pi[P_J], pi[P_D], pi[P_L], pi[P_STRIDE], pi[P_TOPN] = experts, devices, layers, stride, top_n
    return pi


@njit(cache=True, _nrt=False)
def stride_gate(pi, pf, layer, now, ids, ki, kf, gi, ordk, ordp, nout):
    """The stride prefetch's orders at ``layer``'s gate (the module's docstring)."""
    J, D, L, d, n = pi[P_J], pi[P_D], pi[P_L], pi[P_STRIDE], pi[P_TOPN]
    for c in range(4):
        nout[c] = 0
    target = layer + d
    if target >= L:
        return 0
    mark = P_SCRATCH  # pi[mark + e]: expert e routed at this layer by some row
    routed = mark + J  # per device: distinct routed experts (layer_reserve)
    rank = routed + D  # per device: candidates kept so far
    picked = rank + D  # a row's top-n picks so far
    cand = picked + J  # candidate experts, best first
    o_rows = L * J * J
    o_a = o_rows + L * J
    o_sc = o_a + 1  # a row's scores
    o_v = o_sc + J  # votes
    a = pf[o_a]
    den_add = a * J
    R, _, K = ids.shape
    nsel = min(n, J)
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
            pi[picked + e] = 0
        for _ in range(nsel):  # the row's top n: highest first, ties to the lower expert
            best = -1
            for e in range(J):
                if pi[picked + e] == 0 and (best < 0 or pf[o_sc + e] > pf[o_sc + best]):
                    best = e
            pi[picked + best] = 1
            pf[o_v + best] += pf[o_sc + best]
    if known == 0:
        return 0
    nc = 0  # candidates by vote descending, then expert ascending (a stable insertion)
    for e in range(J):
        v = pf[o_v + e]
        if not v > 0:
            continue
        p = nc
        while p > 0 and pf[o_v + pi[cand + p - 1]] < v:
            pi[cand + p] = pi[cand + p - 1]
            p -= 1
        pi[cand + p] = e
        nc += 1
    for e in range(J):
        pi[mark + e] = 0
    for dv in range(D):
        pi[routed + dv] = 0
        pi[rank + dv] = 0
    for r in range(R):
        for k in range(K):
            e = ids[r, layer, k]
            if pi[mark + e] == 0:
                pi[mark + e] = 1
                pi[routed + (layer * J + e) % D] += 1
    m = 0
    for c in range(nc):
        e = pi[cand + c]
        key = target * J + e
        dv = key % D
        budget = gi[dv, G_CAP] - pi[routed + dv]
        if pi[rank + dv] >= budget:  # budget <= 0 keeps none
            continue
        pi[rank + dv] += 1
        if ki[key, K_STATE] != ABSENT and ki[key, K_DEV] == dv:  # in that cache's entries
            continue
        ordk[m] = key
        ordp[m] = pf[o_v + e]
        m += 1
    nout[3] = m  # on_gate's orders: the second batch
    return 0


# the kernel compiles in policies.compiled_gate's column numbers: that file's contents
# join its disk-cache stamp (specs/jitcache.py), so a change there recompiles it
stamp_dependencies(globals().values(), (compiled_gate,))
