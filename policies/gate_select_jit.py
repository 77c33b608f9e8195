"""Compiled steps shared by the baselines' compiled gates (:mod:`policies.compiled_gate`):
a row's top-n vote (:func:`policies.baseline_common.union_top`) and the orders
:func:`policies.baseline_common.select_orders` makes of the votes, step for step.

Both work on the gates' own state arrays: ``pf[o_v:o_v + J]`` the votes, and int scratch
in ``pi`` from ``scratch`` on (:func:`scratch_ints` of ``J`` experts and ``D`` devices).
"""

from __future__ import annotations

from numba import njit

from policies import compiled_gate
from policies.compiled_gate import ABSENT, G_CAP, K_DEV, K_STATE
from specs.jitcache import stamp_dependencies


def scratch_ints(experts: int, devices: int) -> int:
    """The int scratch :func:`vote_top` and :func:`orders_from_votes` use."""
    return 3 * experts + 2 * devices


@njit(cache=True, _nrt=False)
def vote_top(pi, pf, scratch, o_sc, o_v, J, n):
    """Add the row's scores ``pf[o_sc:o_sc + J]``' top ``n`` (highest first, ties to the
    lower expert, as ``union_top``'s stable argsort) to the votes ``pf[o_v:o_v + J]``."""
    picked = scratch
    for e in range(J):
        pi[picked + e] = 0
    for _ in range(min(n, J)):
        best = -1
        for e in range(J):
            if pi[picked + e] == 0 and (best < 0 or pf[o_sc + e] > pf[o_sc + best]):
                best = e
        pi[picked + best] = 1
        pf[o_v + best] += pf[o_sc + best]


@njit(cache=True, _nrt=False)
def mark_routed(pi, ids, layer, J, D, mark, routed, rank):
    """Marks (``pi[mark + e]`` = 1) the experts some row of ``ids`` routes at ``layer``,
    counts them per device (``pi[routed + d]``, ``(layer * J + e) % D``: the
    ``layer_reserve`` of ``select_orders``) and zeroes the per-device ranks
    (``pi[rank + d]``)."""
    for e in range(J):
        pi[mark + e] = 0
    for dv in range(D):
        pi[routed + dv] = 0
        pi[rank + dv] = 0
    R, _, K = ids.shape
    for r in range(R):
        for k in range(K):
            e = ids[r, layer, k]
            if pi[mark + e] == 0:
                pi[mark + e] = 1
                pi[routed + (layer * J + e) % D] += 1


@njit(cache=True, _nrt=False, inline="always")
def keep_to_order(pi, ki, gi, key, D, routed, rank):
    """``select_orders``' test of one candidate (flat ``key``, taken best first): kept
    while its device (``key % D``) has room (``capacity - reserve``, at least 0; the
    rank counts up), and ordered when kept and not among that device's cache entries."""
    dv = key % D
    budget = gi[dv, G_CAP] - pi[routed + dv]
    if pi[rank + dv] >= budget:  # budget <= 0 keeps none
        return False
    pi[rank + dv] += 1
    return not (ki[key, K_STATE] != ABSENT and ki[key, K_DEV] == dv)  # not in its entries


@njit(cache=True, _nrt=False)
def orders_from_votes(pi, pf, scratch, o_v, J, D, layer, target, ids, ki, gi, ordk, ordp):
    """``select_orders`` of the experts with a positive vote at layer ``target``, with
    ``layer_reserve`` of ``ids[:, layer]`` (the running layer's routed experts): vote
    descending then expert ascending; per device (``(target * J + e) % D``) the first
    ``capacity - reserve`` (at least 0) kept; an order (the vote its priority) for each
    kept one not among that device's cache entries. Writes from ``ordk[0]``; returns the
    number of orders."""
    mark = scratch + J  # pi[mark + e]: expert e routed at ``layer`` by some row
    routed = mark + J  # per device: distinct routed experts (layer_reserve)
    rank = routed + D  # per device: candidates kept so far
    cand = rank + D  # candidate experts, best first
    nc = 0  # a stable insertion: vote descending, then expert ascending
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
    if nc == 0:
        return 0
    mark_routed(pi, ids, layer, J, D, mark, routed, rank)
    m = 0
    for c in range(nc):
        e = pi[cand + c]
        key = target * J + e
        if not keep_to_order(pi, ki, gi, key, D, routed, rank):
            continue
        ordk[m] = key
        ordp[m] = pf[o_v + e]
        m += 1
    return m


# the kernels compile in policies.compiled_gate's column numbers: that file's contents
# join their disk-cache stamp (specs/jitcache.py), so a change there recompiles them
stamp_dependencies(globals().values(), (compiled_gate,))
