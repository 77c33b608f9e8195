"""numba kernels of fMoE's characteristic-time eviction order (``eviction_order=
"window"``, policies/fmoe_window.py): each cached expert's chance of being used within
the cache's measured residence time, for the [L, J] table the Python scorer reads and the
cache's compiled victim choice over its candidate arrays, with the same operations per
expert. Apart from policies/fmoe_jit.py (whose helpers they use) to keep that module's
size and its signatures as they are. Imported when an fMoE policy is bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies.fmoe_jit import _SATURATED, _before, _victim_etnu, age_bucket1, layer_row, pow_rows

# weight of minus the expected time to next use in the score: a tie-break between
# experts of equal chance within the window (e.g. both 0: their layer's next visit lies
# beyond it), far below any chance difference a learned cell can tell apart
ETNU_TIE = 1e-9


@njit(cache=True, inline="always")
def _bucket_end(a):  # noqa: ANN001, ANN202 - numba
    """The last age of age ``a``'s bucket (fmoe_jit.age_bucket1's doubling buckets: 0-1,
    2, 3-4, 5-8, ...; the last bucket has no end)."""
    if a <= 1:
        return 1
    if a > _SATURATED:
        return a + (1 << 62)
    e = 2
    while e < a:
        e *= 2
    return e


@njit(cache=True, inline="always")
def _miss_visits(fl, row, a, n):  # noqa: ANN001, ANN202 - numba
    """The log of the chance that ``n`` consecutive visits of one expert, at ages a,
    a + 1, ... (iterations since its layer last chose it), all pass it by, each with its
    cell's chance fl[2, row, bucket(age)]: a sum over the age buckets the visits fall in
    (logs: a long window's chances do not round to 1.0 and tie)."""
    miss = 0.0
    while n > 0:
        k = min(n, _bucket_end(a) - a + 1)
        miss += k * np.log(1.0 - fl[2, row, age_bucket1(a)])
        n -= k
        a += k
    return miss


@njit(cache=True, inline="always")
def window_chance(ist, fl, prot, g, it, rows, horizon, L, lay, j):  # noqa: ANN001, ANN201 - numba
    """-log(1 - P), P the chance that (lay, j) is used within ``horizon`` layer steps
    after gate ``g`` of
    iteration ``it`` (of ``rows`` rows), the cache's measured residence time (Che's
    characteristic time): its layer's visits at t1, t1 + L, ... <= horizon (t1 = lay - g
    for a layer still ahead, L - g + lay for a passed one), the first with its cell now
    (ahead: the forecast's or request-frequency cell at its age, for R rows 1 - (1 - p)^R;
    passed: the request-frequency cell at the next age), each later one with the later
    visits' row (ist[4] with ``transitions_later``, else the request-frequency row) at
    the age it will have then (the table's chance falls with age: a young expert's
    tail beyond the window does not count, an old one's flat chance counts per visit)::

        P = 1 - (1 - P1) * prod_k (1 - p(age_k)),   P = 0 when t1 > horizon

    returned as -log(1 - P) (the same order; no rounding to 1.0). Protected experts:
    +inf (kept)."""
    if prot[lay, j]:
        return np.inf
    age = it - ist[0, lay, j]
    off = layer_row(fl, lay)
    freq = off + ist[3, lay, j]
    later = off + ist[4, lay, j] if ist.shape[0] > 4 else freq
    if lay > g:
        t1 = lay - g
        row = off + ist[1, lay, j] if ist[2, lay, 0] == it else freq
        p1 = fl[2, row, age_bucket1(age)]
        if rows > 1:
            p1 = 1.0 - pow_rows(1.0 - p1, rows)
        a = age + 1  # the age at the next iteration's visit
    else:
        t1 = L - g + lay
        a = max(age, 0) + 1
        p1 = fl[2, freq, age_bucket1(a)]
        a += 1
    if t1 > horizon:
        return 0.0
    n = int((horizon - t1) // L)  # later visits inside the window
    if n <= 0:
        return -np.log(1.0 - p1)
    return -np.log(1.0 - p1) - _miss_visits(fl, later, a, n)


@njit(cache=True)
def window_table(ist, fl, prot, out, g, it, rows, horizon):  # noqa: ANN001, ANN201 - numba
    """out [L, J] = each expert's window score: :func:`window_chance` plus ETNU_TIE times
    minus its expected time to next use (policies.fmoe_jit's value; the tie-break).
    Lower goes first."""
    L, J = out.shape
    for lay in range(L):
        for j in range(J):
            out[lay, j] = _score(ist, fl, prot, g, it, rows, horizon, L, lay, j)


@njit(cache=True, inline="always")
def _score(ist, fl, prot, g, it, rows, horizon, L, lay, j):  # noqa: ANN001, ANN202 - numba
    p = window_chance(ist, fl, prot, g, it, rows, horizon, L, lay, j)
    if p == np.inf:
        return p
    return p + ETNU_TIE * _victim_etnu(ist, fl, prot, g, it, L, lay, j, rows)


@njit(cache=True)
def window_victim(ist, fl, prot, g, it, rows, horizon, layers, experts, last_used, n, tie):  # noqa: ANN001, ANN201, E501 - numba
    """The slot among candidates 0..n-1 with the lowest :func:`window_table` value plus
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
        s = _score(ist, fl, prot, g, it, rows, horizon, L, lay, j) + tie * last_used[i]
        if s != s:
            return -2
        if best < 0 or _before(s, lay, j, bs, bl, bj):
            best, bs, bl, bj = i, s, lay, j
    return best
