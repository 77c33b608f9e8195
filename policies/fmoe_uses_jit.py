"""numba kernels of fMoE's expected-uses eviction order (``eviction_order="uses"``,
policies/fmoe_duel.py): the [L, J] table the Python scorer reads and the cache's compiled
victim choice over its candidate arrays, both with the same operations per expert.
Apart from policies/fmoe_jit.py (whose helpers they use) to keep that module's size.
Imported when an fMoE policy is bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.fmoe_jit import _before, age_bucket1, layer_row, pow_rows


@njit(cache=True)
def expected_uses(ist, fl, prot, out, g, it, rows, horizon):  # noqa: ANN001, ANN201 - numba
    """out [L, J] = each expert's expected uses while it stays resident, if its stay is
    memoryless with mean ``horizon`` layer steps (the cache's measured residency): a use
    at t steps counts with the chance exp(-t / horizon) that the entry is still there.
    With its first visit at t1 (l - g ahead, L - g + l passed), used there with P1
    (ahead: the cell now, for ``rows`` rows 1 - pow_rows(1 - p, rows); passed: the
    request-frequency cell at the next age) and at every later visit with p (the
    request-frequency cell at the next age)::

        U = exp(-t1 / H) * (P1 + p * r / (1 - r)),  r = exp(-L / H)

    Protected experts: +inf (kept). Higher is kept; the eviction goes lowest first."""
    L, J = out.shape
    for lay in range(L):
        for j in range(J):
            out[lay, j] = _uses_one(ist, fl, prot, g, it, rows, horizon, L, lay, j)


@njit(cache=True)
def uses_victim(ist, fl, prot, g, it, rows, horizon, layers, experts, last_used, n, tie):  # noqa: ANN001, ANN201, E501 - numba
    """The slot among candidates 0..n-1 with the lowest ``expected_uses`` value plus
    ``tie * last_used``, ties to the lower (layer, expert) key (what the cache's
    ``_lowest`` picks from the same scores); -1 without candidates, -2 on a NaN."""
    L = ist.shape[1]
    best = -1
    bs = 0.0
    bl = 0
    bj = 0
    for i in range(n):
        lay = layers[i]
        j = experts[i]
        s = _uses_one(ist, fl, prot, g, it, rows, horizon, L, lay, j) + tie * last_used[i]
        if s != s:
            return -2
        if best < 0 or _before(s, lay, j, bs, bl, bj):
            best, bs, bl, bj = i, s, lay, j
    return best


@njit(cache=True, inline="always")
def _uses_one(ist, fl, prot, g, it, rows, horizon, L, lay, j):  # noqa: ANN001, ANN202 - numba
    """One expert's :func:`expected_uses` value (the same operations)."""
    if prot[lay, j]:
        return np.inf
    r = np.exp(-L / horizon)
    geo = r / (1.0 - r) if r < 1.0 else np.inf
    age = it - ist[0, lay, j]
    off = layer_row(fl, lay)  # layer_table=True: the layer's block
    freq = off + ist[3, lay, j]
    if lay > g:
        t1 = float(lay - g)
        row = off + ist[1, lay, j] if ist[2, lay, 0] == it else freq
        p1 = fl[2, row, age_bucket1(age)]
        if rows > 1:
            p1 = 1.0 - pow_rows(1.0 - p1, rows)
        p = fl[2, freq, age_bucket1(age + 1)]
    else:
        t1 = float(L - g + lay)
        p = fl[2, freq, age_bucket1(max(age, 0) + 1)]
        p1 = p
    return np.exp(-t1 / horizon) * (p1 + p * geo)
