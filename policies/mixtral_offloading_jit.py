"""``mixtral-offloading``'s gate as compiled code (:mod:`policies.compiled_gate`'s
contract): the orders :meth:`policies.mixtral_offloading.MixtralOffloading.on_gate`
makes, computed in numba so the simulator's prefetching kernel calls it in place of a
return to Python at every layer step.

What it reproduces, step for step, at layer ``l``'s gate: it counts the gate; with
lookahead rows (``look``: ``GateOutput.lookahead``) and a next layer ``l + 1``, it
counts a speculation, each row of ``look[:, l]`` votes its top ``n`` scores (ties to the
lower expert; ``union_top``), summed in row order, and the experts with a positive vote
go through ``select_orders`` at layer ``l + 1`` with the running layer's routed experts
reserved (:func:`policies.gate_select_jit.orders_from_votes`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies import compiled_gate, gate_select_jit
from policies.gate_select_jit import orders_from_votes, scratch_ints, vote_top
from specs.jitcache import stamp_dependencies

# pi: sizes and top-n, the gate and speculation counts, then scratch
P_J, P_D, P_L, P_TOPN, P_GATES, P_SPEC, P_SCRATCH = 0, 1, 2, 3, 4, 5, 6


def int_state(layers: int, experts: int, devices: int, top_n: int) -> np.ndarray:
    """The gate's int state (``pi``): sizes, top-n, counts and scratch."""
    pi = np.zeros(P_SCRATCH + scratch_ints(experts, devices), np.int64)
    pi[P_J], pi[P_D], pi[P_L], pi[P_TOPN] = experts, devices, layers, top_n
    return pi


def float_state(experts: int) -> np.ndarray:
    """The gate's float state (``pf``): scratch for a row's scores and the votes."""
    return np.zeros(2 * experts, np.float64)


@njit(cache=True, _nrt=False)
def lookahead_gate(pi, pf, layer, now, ids, look, ki, kf, gi, ordk, ordp, nout):
    """The speculative next-layer prefetch's orders at ``layer``'s gate (the module's
    docstring)."""
    J, D, L, n = pi[P_J], pi[P_D], pi[P_L], pi[P_TOPN]
    for c in range(4):
        nout[c] = 0
    pi[P_GATES] += 1
    nxt = layer + 1
    if look.shape[0] == 0 or nxt >= L:
        return 0
    pi[P_SPEC] += 1
    o_sc, o_v = 0, J
    for e in range(J):
        pf[o_v + e] = 0.0
    for r in range(look.shape[0]):
        for e in range(J):
            pf[o_sc + e] = look[r, layer, e]
        vote_top(pi, pf, P_SCRATCH, o_sc, o_v, J, n)
    nout[3] = orders_from_votes(
        pi, pf, P_SCRATCH, o_v, J, D, layer, nxt, ids, ki, gi, ordk, ordp
    )  # on_gate's orders: the second batch
    return 0


# the kernel compiles in policies.compiled_gate's column numbers and gate_select_jit's
# kernels: their contents join its disk-cache stamp (specs/jitcache.py)
stamp_dependencies(globals().values(), (compiled_gate, gate_select_jit))
