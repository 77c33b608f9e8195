"""numba kernel of fMoE's lookahead measurement (:meth:`policies.fmoe_lookahead.FmoeLookahead._lookahead_score`)
for one-row gates: a dozen numpy calls on vectors of k elements cost more than the
measurement. The same float operations on the same elements, in the same order, so the
counts are bitwise the numpy form's (tests/test_fmoe_admit_jit.py runs both end to end).

Imported when an fMoE policy is bound (with :mod:`policies.fmoe_jit`).
"""

from __future__ import annotations

from numba import njit


@njit(cache=True)
def score_row(  # noqa: ANN201, PLR0913 - numba
    chosen,
    rows,
    base,
    pk,
    ids,
    n,
    h,
    e,
    scored,
    bnd,
    on,
    p,
    top,
    map_it,
    map_n,
    map_h,
    cat_n,
    cat_h,
    g,
):  # noqa: ANN001 - numba
    """One row's gate ``g`` chose ``ids`` [K], as ``_lookahead_score`` counts it for B = 1.

    When ``scored``, its lookahead picks ``pk`` [k] (made at the gate before) are scored:
    hit = pick r is among ``ids``; n[r] += 1, h[r] += hit, e[r] += the pick's chance
    (chosen[pick] + base) / (rows + 1.0); then on[r] = h[r] - e[r] > bnd[r] (``bnd``: the
    mixture boundary of the new n) and p[r] = (h[r] + base) / (n[r] + 1.0). When
    ``map_it`` (the map forecast layer g in this iteration; ``top`` its top-k), the map's
    top-k is scored (map_n[g] += k, map_h[g] += how many were chosen) and, if scored, each
    pick's hit is counted in cat_n/cat_h[the map's top-k names it, g, r]. Last the choice
    is counted: ``np.add.at(chosen, ids, 1.0)``, in order."""
    k = pk.shape[0]
    if scored:
        den = rows + 1.0
        for r in range(k):
            j = pk[r]
            c = (chosen[j] + base) / den
            hit = False
            for m in range(ids.shape[0]):
                if ids[m] == j:
                    hit = True
            n[r] += 1.0
            h[r] += 1.0 if hit else 0.0
            e[r] += c
            on[r] = h[r] - e[r] > bnd[r]
            p[r] = (h[r] + base) / (n[r] + 1.0)
            if map_it:
                agree = 0
                for t in range(top.shape[0]):
                    if top[t] == j:
                        agree = 1
                cat_n[agree, g, r] += 1.0
                cat_h[agree, g, r] += 1.0 if hit else 0.0
    if map_it:
        got = 0
        for t in range(top.shape[0]):
            for m in range(ids.shape[0]):
                if ids[m] == top[t]:
                    got += 1
                    break
        map_n[g] += float(top.shape[0])
        map_h[g] += float(got)
    for m in range(ids.shape[0]):
        chosen[ids[m]] += 1.0


@njit(cache=True)
def topk_row(row, k, out):  # noqa: ANN001, ANN201 - numba
    """``out[:k]`` = the first k of ``np.argsort(-row, kind="stable")``: the k largest of
    ``row`` (float64 [J], k <= J), best first, ties to the lower index (-0.0 ties 0.0, as
    there). False (``out`` unspecified) when the row holds a NaN, which numpy orders its
    own way.

    One pass keeping the best so far ranked in ``out`` (an index enters only when its
    value beats the last kept one's strictly: an equal value at a larger index ranks
    after it, the stable order); O(J) for the top-K of a row of hundreds of experts."""
    J = row.shape[0]
    c = 0
    for q in range(J):
        v = row[q]
        if v != v:
            return False
        if c == k and (k == 0 or not v > row[out[k - 1]]):
            continue
        s = c if c < k else k - 1
        while s > 0 and v > row[out[s - 1]]:
            out[s] = out[s - 1]
            s -= 1
        out[s] = q
        if c < k:
            c += 1
    return True


@njit(cache=True)
def topk_rows(rows, k, out):  # noqa: ANN001, ANN201 - numba
    """:func:`topk_row` of each row of ``rows`` [R, J] into ``out`` [R, k]: the first k of
    ``np.argsort(-rows, axis=1, kind="stable")``. False (``out`` unspecified) when a row
    holds a NaN."""
    for r in range(rows.shape[0]):
        if not topk_row(rows[r], k, out[r]):
            return False
    return True


@njit(cache=True)
def look_gate_row(  # noqa: ANN201, PLR0913 - numba
    chosen,
    rows_g,
    base,
    pk_prev,
    ids,
    n,
    h,
    e,
    scored,
    bnd,
    on,
    p,
    top,
    map_it,
    map_n,
    map_h,
    cat_n,
    cat_h,
    g,
    split,
    named_ids,
    mcat_n,
    mcat_h,
    row,
    pk,
    on_n,
    p_n,
    top_n,
    have_top,
    prot,
    etnu,
    out_j,
    out_p,
    out_q,
):  # noqa: ANN001 - numba
    """``FmoeLookahead._lookahead_gate`` of one row at gate ``g`` (``lookahead="auto"``,
    deadline admission, a next layer g + 1) in one call, issue 21 (speed only):

    1. :func:`score_row` (the picks ``pk_prev`` for g, the map's top-k ``top``; ``on``,
       ``p`` are layer g's rows of the cells' state, written where ``scored``);
    2. ``_map_split_score`` where ``split``: each of the map's top-k ``top`` counted in
       ``mcat_n``/``mcat_h``[named by the lookahead's last orders ``named_ids``, g];
    3. ``_lookahead_picks``: the top-k of the lookahead ``row`` into ``pk`` (as
       :func:`topk_row`);
    4. ``_lookahead_measured_orders`` for layer g + 1 (``on_n``, ``p_n`` its cells;
       ``top_n`` the map's top-k there where ``have_top``): the picks of cells that are
       on with their p (the part's measured precision where ``have_top``), ranked by
       (-p, expert) into ``out_j``/``out_p`` with their chance of use 1 - 1.0 x (1 - p)
       in ``out_q``, each protected (``prot`` True, ``etnu`` -0.0 at [g + 1, j]).

    Returns how many were ranked; -1 when no cell of g + 1 is on (nothing ordered, as
    the Python returns early); -2 when the row or a p holds a NaN (nothing written: the
    caller runs the Python, whose sorts order NaNs their own way)."""
    k = pk.shape[0]
    if not topk_row(row, k, pk):
        return -2
    nxt = g + 1
    any_on = False
    m = 0
    for r in range(k):
        if not on_n[r]:
            continue
        any_on = True
        j = pk[r]
        if have_top:
            c = 0
            for t in range(top_n.shape[0]):
                if top_n[t] == j:
                    c = 1
                    break
            pv = (cat_h[c, nxt, r] + p_n[r]) / (cat_n[c, nxt, r] + 1.0)
        else:
            pv = p_n[r]
        if pv != pv:
            return -2
        if pv > -1.0:
            out_j[m] = j
            out_p[m] = pv
            out_q[m] = 1.0 - 1.0 * (1.0 - pv)
            m += 1
    # nothing above wrote the policy's state: from here on it is the Python's order
    score_row(
        chosen, rows_g, base, pk_prev, ids, n, h, e, scored, bnd, on, p, top, map_it, map_n,
        map_h, cat_n, cat_h, g,
    )  # fmt: skip
    if split:
        for t in range(top.shape[0]):
            j = top[t]
            c = 0
            for q in range(named_ids.shape[0]):
                if named_ids[q] == j:
                    c = 1
                    break
            hit = 0.0
            for q in range(ids.shape[0]):
                if ids[q] == j:
                    hit = 1.0
                    break
            mcat_n[c, g] += 1.0
            mcat_h[c, g] += hit
    if not any_on:
        return -1
    for i in range(1, m):  # insertion sort by (-p, j): distinct experts, no NaN
        j, v, q = out_j[i], out_p[i], out_q[i]
        s = i
        while s > 0 and (-out_p[s - 1] > -v or (-out_p[s - 1] == -v and out_j[s - 1] > j)):
            out_j[s] = out_j[s - 1]
            out_p[s] = out_p[s - 1]
            out_q[s] = out_q[s - 1]
            s -= 1
        out_j[s] = j
        out_p[s] = v
        out_q[s] = q
    for i in range(m):
        prot[nxt, out_j[i]] = True
        etnu[nxt, out_j[i]] = -0.0
    return m
