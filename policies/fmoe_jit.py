"""numba kernels of fMoE's per-step bookkeeping (eviction table, search plan).

Each kernel does, element by element, the same IEEE operations in the same order as the
numpy expression it replaces (documented at each), so results are bitwise the same;
tests/test_fmoe_jit.py checks every kernel against its numpy reference. They exist
because the policy runs at every layer step, on arrays of a few hundred elements, where
numpy's per-call overhead (about a microsecond per operation) is the whole cost.

Imported when an fMoE policy is bound (importing numba and loading the cached kernels
costs about half a second per process; ``fmoe policies`` and ``--help`` never pay it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

AGE_BUCKETS = 16  # as policies.fmoe_eviction.AGE_BUCKETS
_SATURATED = 1 << (AGE_BUCKETS - 2)  # ages above this land in the last bucket


def _bucket_table() -> np.ndarray:
    """age_bucket of every age 0.._SATURATED: min(bit length of age - 1, 15), 0 for 0 and 1."""
    ages = np.arange(_SATURATED + 1)
    out = np.zeros(ages.size, np.int64)
    for a in range(2, ages.size):
        out[a] = min(int(a - 1).bit_length(), AGE_BUCKETS - 1)
    return out


_BUCKETS = _bucket_table()  # a constant of the compiled kernels


@njit(cache=True, inline="always")
def age_bucket1(age):  # noqa: ANN001, ANN201 - numba
    """:func:`policies.fmoe_eviction.age_bucket` of one int: min(ceil(log2(max(age, 1))),
    15), which for integers is the bit length of age - 1 (tested against the numpy form
    for every age below 2^22 and for the "never chosen" ages)."""
    if age <= 1:
        return 0
    if age > _SATURATED:
        return AGE_BUCKETS - 1
    return _BUCKETS[age]


@njit(cache=True)
def observe_choice(ist, fl, prot, layer, it, ids):  # noqa: ANN001, ANN201 - numba
    """A gate of ``layer`` chose ``ids`` (any shape, repeats allowed) in iteration ``it``.

    ``ist`` int64 [3, L, J]: [0] the last iteration that chose each expert, [1] its
    forecast's table row, [2, :, 0] the iteration of each layer's last forecast; ``fl``
    float64 [3, R, A]: [0] choices (hits) and [1] visits per (forecast row, age bucket),
    [2] the chance table; ``prot`` bool [L, J]: protected experts.
    At the layer's first gate of the iteration, every expert's visit is counted in row 0
    and, for a fresh forecast, in its forecast row, and each distinct chosen expert's hit
    likewise (as ``np.add.at`` of ones: integer counts, exact in any order). Then the chosen
    experts' last iteration becomes ``it`` and the protection of layers <= ``layer`` ends.
    Returns False (and changes nothing) when an id lies outside [0, J).
    """
    last = ist[0, layer]
    rows = ist[1, layer]
    J = last.shape[0]
    flat = ids.ravel()
    for i in range(flat.shape[0]):
        if flat[i] < 0 or flat[i] >= J:
            return False
    first = True
    for j in range(J):
        if last[j] == it:
            first = False
            break
    if first:
        fresh = ist[2, layer, 0] == it
        for j in range(J):
            b = age_bucket1(it - last[j])
            fl[1, 0, b] += 1.0
            if fresh:
                fl[1, rows[j], b] += 1.0
        seen = np.zeros(J, np.bool_)
        for i in range(flat.shape[0]):
            j = flat[i]
            if seen[j]:
                continue
            seen[j] = True
            b = age_bucket1(it - last[j])
            fl[0, 0, b] += 1.0
            if fresh:
                fl[0, rows[j], b] += 1.0
    for i in range(flat.shape[0]):
        last[flat[i]] = it
    for lay in range(min(layer + 1, prot.shape[0])):
        for j in range(prot.shape[1]):
            prot[lay, j] = False
    return True


@njit(cache=True)
def decreasing_rows(fl, base):  # noqa: ANN001, ANN201 - numba
    """fl[2] = the reference ``_decreasing_rows(fl[0] + base, fl[1] + 1.0)``: choices /
    visits per row, pooled into the non-increasing least-squares fit (pool-adjacent-
    violators: the same block merges, sums and divisions in the same order)."""
    R, A = fl.shape[1], fl.shape[2]
    bh = np.empty(A)
    bw = np.empty(A)
    bc = np.empty(A, np.int64)
    for r in range(R):
        nb = 0
        for c in range(A):
            bh[nb] = fl[0, r, c] + base
            bw[nb] = fl[1, r, c] + 1.0
            bc[nb] = 1
            nb += 1
            while nb > 1 and bh[nb - 2] / bw[nb - 2] < bh[nb - 1] / bw[nb - 1]:
                bh[nb - 2] += bh[nb - 1]
                bw[nb - 2] += bw[nb - 1]
                bc[nb - 2] += bc[nb - 1]
                nb -= 1
        i = 0
        for b in range(nb):
            v = bh[b] / bw[b]
            for _ in range(bc[b]):
                fl[2, r, i] = v
                i += 1


@njit(cache=True)
def expected_next_use(ist, fl, prot, out, g, it):  # noqa: ANN001, ANN201 - numba
    """out [L, J] = minus the expected layer steps to each expert's next use (the eviction
    score before its recency tie-break), element by element as the numpy reference
    (policies.fmoe_eviction's module doc; protected experts -0.0), with chance = fl[2]::

        nxt = float(L - g + lay)
        ahead (lay > g): p_now = chance[row, b(age)], p_next = chance[0, b(age + 1)],
            e = p_now * (lay - g) + (1 - p_now) * (nxt + L * (1 / p_next - 1))
        passed: e = nxt + L * (1 / chance[0, b(max(age, 0) + 1)] - 1)
    """
    L, J = out.shape
    A = fl.shape[2]
    # L * (1 / chance[0, b] - 1) per bucket b: the same operations, once per bucket
    wait0 = np.empty(A)
    for b in range(A):
        wait0[b] = L * (1.0 / fl[2, 0, b] - 1.0)
    for lay in range(L):
        fresh = ist[2, lay, 0] == it
        nxt = float(L - g + lay)
        ahead = lay > g
        for j in range(J):
            if prot[lay, j]:
                out[lay, j] = -0.0
                continue
            age = it - ist[0, lay, j]
            if ahead:
                row = ist[1, lay, j] if fresh else 0
                p_now = fl[2, row, age_bucket1(age)]
                wait = nxt + wait0[age_bucket1(age + 1)]
                out[lay, j] = -(p_now * (lay - g) + (1.0 - p_now) * wait)
            else:
                out[lay, j] = -(nxt + wait0[age_bucket1(max(age, 0) + 1)])


@njit(cache=True)
def gate_step(ist, fl, prot, out, layer, it, ids, fc_rows, target, eager):  # noqa: ANN001, ANN201 - numba
    """One planned gate in one call: :func:`observe_choice`; then, when ``target`` >= 0,
    layer ``target``'s forecast (its experts' table rows ``fc_rows[layer]``, made in
    iteration ``it``); then, when ``eager`` (the chance table is this iteration's),
    :func:`expected_next_use` into ``out`` at ``g = layer``. Returns observe_choice's
    answer (nothing changes when it is False)."""
    if not observe_choice(ist, fl, prot, layer, it, ids):
        return False
    if target >= 0:
        ist[2, target, 0] = it
        for j in range(ist.shape[2]):
            ist[1, target, j] = fc_rows[layer, j]
    if eager:
        expected_next_use(ist, fl, prot, out, layer, it)
    return True


@njit(cache=True)
def running_sums(cum_dots):  # noqa: ANN001, ANN201 - numba
    """``cum_dots`` float32 [L, B, n] becomes its running sums over layers, in layer
    order: the float32 adds of ``for l in 1..L-1: cum_dots[l] += cum_dots[l - 1]``
    (numpy walks that in-place add slowly: one call per layer)."""
    L, B, n = cum_dots.shape
    for lay in range(1, L):
        for b in range(B):
            cur = cum_dots[lay, b]
            prev = cum_dots[lay - 1, b]
            for c in range(n):
                cur[c] += prev[c]


@njit(cache=True)
def select_rows(rows, scores, k, use_delta, picks, counts):  # noqa: ANN001, ANN201 - numba
    """:func:`policies.fmoe_select.select_rows` of ``rows`` float32 [R, J] with float32
    ``scores`` [R]: row r's selected experts, by descending probability (ties to the lower
    id), go to ``picks[r, :counts[r]]``.

    The top-k always; with ``use_delta`` the exact similarity-aware rule: the float32
    running sums ``cum`` of the row in that order, thr = min(1 - score, 1) - 1e-6 in
    float64, n = max(first i with cum[i] >= thr (float64 comparison, as np.searchsorted
    left), k), and beyond the first k only experts of probability > 0. (select_rows'
    fast path, the top-k when its mass clears thr by a margin, is this rule's answer
    there; it is only a shortcut.)
    """
    R, J = rows.shape
    order = np.empty(J, np.int64)
    for r in range(R):
        p = rows[r]
        # stable descending order: insertion sort, a later equal value stays behind
        for i in range(J):
            v = p[i]
            m = i
            while m > 0 and p[order[m - 1]] < v:
                order[m] = order[m - 1]
                m -= 1
            order[m] = i
        n = k
        if use_delta:
            thr = min(1.0 - np.float64(scores[r]), 1.0) - 1e-6
            cum = np.float32(0.0)
            first = J
            for i in range(J):
                cum += p[order[i]]
                if np.float64(cum) >= thr:
                    first = i
                    break
            n = max(first + 1, k)
        c = 0
        for i in range(min(n, J)):
            j = order[i]
            if i < k or p[j] > 0.0:
                picks[r, c] = j
                c += 1
        counts[r] = c
