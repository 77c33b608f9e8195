"""numba kernel of fMoE's lookahead measurement (:meth:`policies.fmoe_lookahead.FmoeLookahead._lookahead_score`)
for one-row gates: a dozen numpy calls on vectors of k elements cost more than the
measurement. The same float operations on the same elements, in the same order, so the
counts are bitwise the numpy form's (tests/test_fmoe_lookahead.py runs both).

Imported when an fMoE policy is bound (with :mod:`policies.fmoe_jit`).
"""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def score_row(chosen, rows, base, pk, ids, n, h, e, hit, scored):  # noqa: ANN001, ANN201 - numba
    """One row's gate chose ``ids`` [K]. When ``scored``: its picks ``pk`` [k] (made at
    the gate before) are scored, as ``_lookahead_score`` does for B = 1: hit[r] = pick r
    is among ``ids``; n[r] += 1, h[r] += hit[r], e[r] += the pick's chance
    (chosen[pick] + base) / (rows + 1.0). Then the choice is counted:
    ``np.add.at(chosen, ids, 1.0)`` (in order)."""
    if scored:
        den = rows + 1.0
        for r in range(pk.shape[0]):
            j = pk[r]
            c = (chosen[j] + base) / den
            ht = False
            for m in range(ids.shape[0]):
                if ids[m] == j:
                    ht = True
            hit[r] = ht
            n[r] += 1.0
            h[r] += 1.0 if ht else 0.0
            e[r] += c
    for m in range(ids.shape[0]):
        chosen[ids[m]] += 1.0
