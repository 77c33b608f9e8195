"""The hit-density order's victim (``eviction_order="density"``, policies/fmoe_shadow.py)
in one numba kernel over the cache's candidate arrays: what ``FmoeShadow._scores_density``
scores, with the same chance table reads (imported at bind: numba is not loaded by
``fmoe policies`` or ``--help``)."""

from __future__ import annotations

from numba import njit

from policies.fmoe_jit import _before, age_bucket1, layer_row, pow_rows


@njit(cache=True)
def density_victim(ist, fl, prot, g, it, rows, layers, experts, last_used, n, tie):  # noqa: ANN001, ANN201 - numba
    """The slot of the lowest max(P1 / t1, p / L) + tie x last_used among candidates
    0..n-1, ties to the lower (layer, expert) key; protected ones never (-1 when every
    candidate is protected)."""
    L = ist.shape[1]
    best = -1
    bs = 0.0
    bl = 0
    bj = 0
    for i in range(n):
        lay = layers[i]
        j = experts[i]
        if prot[lay, j]:
            continue
        age = it - ist[0, lay, j]
        off = layer_row(fl, lay)
        freq = off + ist[3, lay, j]
        p = fl[2, freq, age_bucket1(max(age, 0) + 1)]
        if lay > g:
            row = off + ist[1, lay, j] if ist[2, lay, 0] == it else freq
            p1 = fl[2, row, age_bucket1(age)]
            if rows > 1:
                p1 = 1.0 - pow_rows(1.0 - p1, rows)
            t1 = lay - g
        else:
            p1 = p
            t1 = L - g + lay
        s = max(p1 / t1, p / L) + tie * last_used[i]
        if best < 0 or _before(s, lay, j, bs, bl, bj):
            best, bs, bl, bj = i, s, lay, j
    return best
