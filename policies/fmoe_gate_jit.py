"""One numba call for the one-row admission pass of fMoE's deadline admission after its
candidates are merged (issue 21, speed only): :meth:`policies.fmoe_admit.FmoeAdmitKernel._admit_kernel`
made each candidate's lookahead saving (``map_value="marginal"``: ``sv``), the map picks
the lookahead passed over (``ch0``, ``cn0``) and a copy of ``p`` with a dozen numpy calls
(flatnonzero, unique, where, zeros, full) and a Python loop over layers before calling
:func:`policies.fmoe_admit_jit.admit_rows`; :func:`admit_gate` computes them from the
lookahead's measurement arrays and calls that kernel, whose logic stays in one place.

Every float operation is the Python code's, in its order: ``_look_recall`` adds the hits
of the cells that are on in rank order and divides once; ``sv`` is r x min(copy, avail)
(``np.where(c < av, c, av)``) for a layer two or more ahead where r is not 0;
``_map_only`` gives the layer's (hits, picks) of map-only picks. tests/test_fmoe_gate_jit.py
compares it with the Python glue on random states.

Imported with :mod:`policies.fmoe_jit` when an fMoE policy is bound.
"""

from __future__ import annotations

from numba import njit

from policies.fmoe_admit_jit import admit_rows


@njit(cache=True)
def look_recall(layer, mode, map_h, cat_h1, on):  # noqa: ANN001, ANN201 - numba
    """FmoeLookahead._look_recall: ``mode`` 0 (lookahead off), 1 (auto: the cells ``on``)
    or 2 (true: every cell); ``map_h`` [L] the map's top-K hits, ``cat_h1`` [L, k] the
    hits of picks the map also names."""
    if mode == 0 or not (0 <= layer < map_h.shape[0]):
        return 0.0
    named = map_h[layer]
    if named <= 0:
        return 0.0
    hits = 0.0
    for r in range(cat_h1.shape[1]):
        if mode == 2 or on[layer, r]:
            hits += cat_h1[layer, r]
    return hits / named if hits < named else 1.0


@njit(cache=True)
def marginal_terms(  # noqa: ANN201, PLR0913 - numba
    lay,
    jj,
    n,
    g,
    dev_of,
    copy,
    avail,
    marginal,
    mode,
    map_h,
    cat_h1,
    on,
    rec,
    named_layer,
    named_ids,
    mh0,
    mn0,
    sv,
    ch0,
    cn0,
):  # noqa: ANN001 - numba
    """``_admit_kernel``'s ``sv``, ``ch0``, ``cn0`` for candidates 0..n-1 (module doc):
    with ``marginal``, ``sv[i]`` = r x min(copy, avail) of its device for a layer at least
    two after ``g`` (r = look_recall of its layer, kept in ``rec``, [L] scratch: NaN
    unset, left unset), else 0.0; for a candidate of ``named_layer`` (-1: none) whose
    expert is not in ``named_ids``, (ch0, cn0) = (``mh0``, ``mn0``), else (0.0, -1.0)."""
    for i in range(n):
        sv[i] = 0.0
        ch0[i] = 0.0
        cn0[i] = -1.0
    if not marginal:
        return
    for i in range(n):
        layer = lay[i]
        if layer >= g + 2:
            r = rec[layer]
            if r != r:  # unset (look_recall never gives NaN: a NaN map_h fails named <= 0)
                r = rec[layer] = look_recall(layer, mode, map_h, cat_h1, on)
            if r != 0.0:
                d = dev_of[layer, jj[i]]
                c = copy[d]
                av = avail[d]
                sv[i] = r * (c if c < av else av)
        if layer == named_layer:
            j = jj[i]
            found = False
            for t in range(named_ids.shape[0]):
                if named_ids[t] == j:
                    found = True
                    break
            if not found:
                ch0[i] = mh0
                cn0[i] = mn0
    for i in range(n):  # leave the scratch unset for the next call
        rec[lay[i]] = float("nan")


@njit(cache=True)
def admit_gate(  # noqa: ANN201, PLR0913 - numba
    lay,
    jj,
    p,
    was,
    look,
    n,
    g,
    dev_of,
    committed,
    copy,
    avail,
    demand_s,
    interval,
    no_rho,
    ist,
    tab,
    have_tab,
    it,
    act,
    counts,
    price,
    step,
    vfree,
    v_e,
    v_len,
    v_loaded,
    rank_chance,
    beta,
    resid,
    kap,
    cal_h,
    cal_n,
    marginal,
    mode,
    map_h,
    cat_h1,
    on,
    rec,
    named_layer,
    named_ids,
    mh0,
    mn0,
    sv,
    ch0,
    cn0,
    pbuf,
):  # noqa: ANN001 - numba
    """:func:`marginal_terms` then :func:`policies.fmoe_admit_jit.admit_rows` on the
    first ``n`` candidates, with ``p`` copied to ``pbuf`` first where ``rank_chance``
    (admit_rows writes the chances there; ``p`` stays as merged). Returns admit_rows'
    value; the orders' p is ``pbuf`` with ``rank_chance``, else ``p``."""
    marginal_terms(
        lay, jj, n, g, dev_of, copy, avail, marginal, mode, map_h, cat_h1, on, rec,
        named_layer, named_ids, mh0, mn0, sv, ch0, cn0,
    )  # fmt: skip
    pv = p[:n]
    if rank_chance:
        for i in range(n):
            pbuf[i] = p[i]
        pv = pbuf[:n]
    return admit_rows(
        lay[:n], jj[:n], pv, was[:n], look[:n], g, dev_of, committed, copy, avail, demand_s,
        interval, no_rho, ist, tab, have_tab, it, act, counts, price, step, vfree, v_e, v_len,
        v_loaded, rank_chance, beta, resid, sv[:n], ch0[:n], cn0[:n], kap, cal_h, cal_n,
    )  # fmt: skip
