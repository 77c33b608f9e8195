"""numba kernel of fMoE's deadline admission (:meth:`policies.fmoe_deadline.FmoeDeadline._admit`)
for one-row iterations, where a fine-grained model's gate re-ranks about a hundred
candidates (DeepSeek-V3: the queued copies forecast to start after their layer are
judged again at every gate) and judging each in Python cost more than the rest of a
layer step.

The kernel ranks and judges; the caller sends the orders and cancellations it returns,
in rank order, so the executor sees the same calls in the same order. Every float
operation is the Python loop's, in its order (Python's ``min(a, b)`` is ``b if b < a
else a``, written out so a NaN goes the same way), so the decisions are bitwise the
same; tests/test_fmoe_admit_jit.py compares it with the Python loop.

:func:`admit_gate` makes the pass's lookahead terms before calling it (``map_value=
"marginal"``: each candidate's saving the lookahead makes anyway, ``sv``, r x min(copy,
avail) with r ``_look_recall``'s hits of the cells that are on added in rank order over
one division; the map picks the lookahead passed over, ``ch0``/``cn0``: ``_map_only``),
which ``_admit_kernel`` made with a dozen numpy calls; tests/test_fmoe_gate_jit.py
compares them with that glue on random states.

Imported with :mod:`policies.fmoe_jit` when an fMoE policy is bound. Over 450 lines on
purpose: :func:`admit_gate` calls :func:`admit_rows`, and numba keys a kernel's disk cache
on its own source file only (a caller in another module keeps a stale copy of a changed
callee: docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from policies.fmoe_blocking import gate_crossings as _gate_crossings_py
from policies.fmoe_jit import age_bucket1
from specs.jitcache import stamp_dependencies

# the same function, compiled: one source for the Python admission and the kernel
gate_crossings = njit(cache=True)(_gate_crossings_py)


# action codes written by admit_rows
CANCEL = 1  # rejected, and it was queued: cancel it
ORDER = 2  # (re)send at priority p / (layer - g); it stays a candidate


@njit(cache=True)
def admit_rows(  # noqa: ANN201, PLR0913 - numba
    lay,
    jj,
    p,
    was,
    look,
    g,
    dev_of,
    committed0,
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
    vfree0,
    v_e,
    v_len,
    v_loaded,
    rank_chance,
    beta,
    resid,
    sv,
    ch0,
    cn0,
    kap,
    cal_h,
    cal_n,
):  # noqa: ANN001 - numba
    """Rank candidates (``lay``, ``jj``, ``p``; ``was``: queued before; ``look``: the
    lookahead chance, -1.0 where none) by (-p / (lay - g), lay, jj) and judge them as
    ``_admit`` does for one row (module doc of policies.fmoe_deadline): ``committed0``,
    ``copy``, ``avail`` per device (the link's queued seconds, one copy's seconds, the
    prefetch link time per layer step), ``demand_s`` and ``interval`` for rho; ``ist``
    and the chance table ``tab`` for q.

    Writes, in rank order, (candidate index, CANCEL or ORDER) for each candidate that
    needs a call to ``act`` and [late rejected, queued none done, admitted late, issued,
    re-ranked] to ``counts``; returns how many actions, -1 when a late copy needs the
    chance table and ``have_tab`` is False (nothing else changed: call again with it),
    or -2 when a rank key is NaN (the caller's sort handles that its own way).
    With ``rank_chance`` the candidates are ranked by their chance of use instead:
    ``p`` is overwritten with it (``have_tab`` must then be True).

    With ``price`` (victim="priced", policies.fmoe_victim) each copy's victim is priced
    as ``FmoeVictim._victim_price`` does: ``step`` the layer step for a link without
    prefetch time (0.0: none), per device ``vfree0`` free slots, ``v_e`` the victims'
    expected times to next use in the order they are taken (``v_len`` of them) and
    ``v_loaded`` whether its victims were listed; counts[5] gets the copies rejected
    for their victim's price. -3 when a window is not positive (the caller's Python
    then decides: it lists no victims there).

    ``beta`` (blocking="measured", policies.fmoe_blocking): per device the measured wait
    of demand loads per gate a prefetch is on the link at (zeros: the earlier rule);
    counts[6] gets the copies rejected that the rule without it would have sent.

    ``resid`` (victim="residence", policies.fmoe_residence): the measured residence of
    an unused copy after its layer, in layer steps (<= 0: the ``priced`` rule); the
    victim's price is then (q x use within W + (1 - q) x use within W + resid) x copy.

    ``sv`` (map_value="marginal"): per candidate, the seconds of it the lookahead would
    save anyway (0.0: none); its saving if used is the part done minus that. ``ch0``,
    ``cn0``: per candidate the hits and picks of map picks the lookahead passed over
    (``cn0`` < 0: not such a pick): its chance is then (ch0 + q) / (cn0 + 1).

    ``kap`` (saving="finish", policies.fmoe_finish): per device the measured worth of an
    avoided demand load over one copy time; rho is divided by it (``beta`` comes divided
    already); ones: the earlier rule.

    ``cal_h``, ``cal_n`` (candidate_chance="measured", policies.fmoe_calib): per chance
    table cell the map candidates used and judged; a candidate's table chance q becomes
    (cal_h + q) / (cal_n + 1) before the shrink above (zeros: q itself)."""
    n = lay.shape[0]
    if rank_chance:  # p[i] = _iteration_chance of one row: the table's cell, or the look's
        for i in range(n):
            layer = lay[i]
            j = jj[i]
            row = ist[1, layer, j] if ist[2, layer, 0] == it else ist[3, layer, j]
            bk = age_bucket1(it - ist[0, layer, j])
            q = (cal_h[row, bk] + tab[row, bk]) / (cal_n[row, bk] + 1.0)
            if cn0[i] >= 0.0:
                q = (ch0[i] + q) / (cn0[i] + 1.0)
            p[i] = look[i] if look[i] > q else q
    key = np.empty(n)
    for i in range(n):
        key[i] = -p[i] / (lay[i] - g)
        if key[i] != key[i]:
            return -2
    order = np.empty(n, np.int64)
    for i in range(n):  # insertion sort by (key, lay, jj): keys are distinct pairs
        m = i
        while m > 0:
            o = order[m - 1]
            if key[i] < key[o] or (
                key[i] == key[o] and (lay[i] < lay[o] or (lay[i] == lay[o] and jj[i] < jj[o]))
            ):
                order[m] = o
                m -= 1
            else:
                break
        order[m] = i
    committed = committed0.copy()
    vfree = vfree0.copy()
    vptr = np.zeros(vfree.shape[0], np.int64)
    late_no = late_yes = issued = reranked = none_done = value_no = blocked_no = 0
    na = 0
    for r in range(n):
        i = order[r]
        layer = lay[i]
        j = jj[i]
        dev = dev_of[layer, j]
        copy_s = copy[dev]
        x = (layer - g) * avail[dev] - committed[dev]
        done = x if x < copy_s else copy_s  # min(copy_s, x)
        vc = 0.0
        if price:  # FmoeVictim._victim_price
            av = avail[dev]
            ahead = float(layer - g)
            if av > 0:
                start = committed[dev] / av
                w1 = start + copy_s / av
                window = (ahead if ahead > w1 else w1) - start  # max(w1, ahead) - start
            else:
                w1 = copy_s / step if step > 0 else 0.0
                window = ahead if ahead > w1 else w1
            if not window > 0:
                return -3
            use = 0.0  # _victim_use_chance
            use2 = 0.0  # over window + resid (victim="residence")
            if vfree[dev] <= 0 and v_len[dev] > 0:
                e = v_e[dev, vptr[dev]]
                use = 1.0 if e <= 0 else 1.0 - math.exp(-window / e)
                r = resid[1] if look[i] >= 0.0 else resid[0]  # by source
                if r > 0:
                    use2 = 1.0 if e <= 0 else 1.0 - math.exp(-window / e) * (e / (e + r))
            vc = use * copy_s
        b = beta[dev]
        nb = 0
        own = 0
        if b > 0:
            nb, own = gate_crossings(committed[dev], copy_s, avail[dev], layer - g)
        q = 0.0
        if done < copy_s or price or nb > 0:
            if not have_tab:
                return -1
            age = it - ist[0, layer, j]
            row = ist[1, layer, j] if ist[2, layer, 0] == it else ist[3, layer, j]
            bk = age_bucket1(age)
            q = (cal_h[row, bk] + tab[row, bk]) / (cal_n[row, bk] + 1.0)
            if cn0[i] >= 0.0:
                q = (ch0[i] + q) / (cn0[i] + 1.0)
            if look[i] > q:
                q = look[i]
            if price and (resid[1] if look[i] >= 0.0 else resid[0]) > 0:
                vc = (q * use + (1.0 - q) * use2) * copy_s
        s = sv[i]
        if (price or nb > 0) and done >= copy_s and q * (copy_s - s) <= vc + nb * b:
            value_no += 1  # in time, but likelier to cost its victim's use than to pay
            if not q * (copy_s - s) <= vc:
                blocked_no += 1
            if was[i]:
                act[na, 0] = i
                act[na, 1] = CANCEL
                na += 1
            continue
        if done < copy_s:
            if no_rho:
                rho = 0.0
            else:
                rr = demand_s[dev] / interval
                rho = 1.0 if 1.0 < rr else rr  # min(rr, 1.0)
            rho = rho / kap[dev]
            av = avail[dev]
            mn = copy_s if copy_s < av else av  # min(avail, copy_s)
            hold = (1.0 - q) * b if b > 0 and av < copy_s else 0.0
            if done <= 0 and q * (mn - s) > (1.0 - q) * copy_s * rho + vc + hold:
                act[na, 0] = i
                act[na, 1] = ORDER
                na += 1
                none_done += 1
                issued += 1
                reranked += was[i]
                continue
            if done <= 0 and b > 0 and q * (mn - s) > (1.0 - q) * copy_s * rho + vc:
                blocked_no += 1
            hold = (nb + (1.0 - q) * own) * b if b > 0 else 0.0
            if done <= 0 or q * (done - s) <= (1.0 - q) * (copy_s - done) * rho + vc + hold:
                late_no += 1
                if done > 0 and not q * (done - s) <= (1.0 - q) * (copy_s - done) * rho + vc:
                    blocked_no += 1
                if was[i]:
                    act[na, 0] = i
                    act[na, 1] = CANCEL
                    na += 1
                continue
            late_yes += 1
        if price and v_loaded[dev]:  # FmoeVictim._victim_take
            if vfree[dev] > 0:
                vfree[dev] -= 1
            elif v_len[dev] - vptr[dev] > 1:
                vptr[dev] += 1
        committed[dev] += copy_s
        act[na, 0] = i
        act[na, 1] = ORDER
        na += 1
        issued += 1
        reranked += was[i]
    counts[0] = late_no
    counts[1] = none_done
    counts[2] = late_yes
    counts[3] = issued
    counts[4] = reranked
    counts[5] = value_no
    counts[6] = blocked_no
    return na


@njit(cache=True)
def merge_cands(  # noqa: ANN201, PLR0913 - numba
    P, idx, cnt, of, op, oldf, lqf, lqv, g, J, pos, lay, jj, p, was, look
):  # noqa: ANN001 - numba
    """policies.fmoe_cands.CandidateSet.take_merged in one call: the pending candidates
    ``of``/``op`` (flat index layer x J + j, p; distinct, in order) first, then the set's
    ``cnt`` candidates ``idx`` (p in ``P``, reset to -1.0 here) of a layer after ``g``,
    each at the larger p where already one (``v > p``, the dict's rule) at its first
    position. Writes layers, experts, p, ``was`` (in ``oldf``) and the lookahead chance
    (``lqv`` at ``lqf``, else -1.0) to the outputs and returns their count; ``pos``
    (all -1) is scratch, left all -1."""
    n = 0
    for i in range(of.shape[0]):
        f = of[i]
        la = f // J
        lay[n] = la
        jj[n] = f - la * J
        p[n] = op[i]
        was[n] = True
        pos[f] = n
        n += 1
    for t in range(cnt):
        f = idx[t]
        v = P[f]
        P[f] = -1.0
        la = f // J
        if la <= g:
            continue
        d = pos[f]
        if d >= 0:
            if v > p[d]:
                p[d] = v
            continue
        lay[n] = la
        jj[n] = f - la * J
        p[n] = v
        was[n] = False
        pos[f] = n
        n += 1
    for i in range(oldf.shape[0]):
        d = pos[oldf[i]]
        if d >= 0:
            was[d] = True
    for i in range(n):
        look[i] = -1.0
    for i in range(lqf.shape[0]):
        d = pos[lqf[i]]
        if d >= 0:
            look[d] = lqv[i]
    for i in range(n):
        pos[lay[i] * J + jj[i]] = -1
    return n


# -- the pass's lookahead terms, then admit_rows, in one call (issue 21, speed only) -------
# In this file, not beside the callers: numba keys a kernel's disk cache on its own source
# file, so a kernel calling admit_rows from another module would keep a stale copy of it
# when only this file changed (docs/testing.md, "numba's disk cache").


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


# these kernels compile in policies.fmoe_blocking's gate_crossings and policies.fmoe_jit's
# age_bucket1: their sources join the kernels' disk-cache stamp (specs/jitcache.py)
def _stamp_own_kernels() -> None:
    from policies import fmoe_blocking, fmoe_jit

    stamp_dependencies(globals().values(), (fmoe_blocking, fmoe_jit))


_stamp_own_kernels()
