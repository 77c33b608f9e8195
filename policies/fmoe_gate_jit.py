"""numba kernel of a one-row admission pass of fMoE's deadline admission in
one call (issue 21, speed only): :func:`admit_one` merges the pass's candidates
(:func:`policies.fmoe_admit_jit.merge_cands`), notes the map candidates' cells
(:func:`policies.fmoe_calib_jit.calib_note`), makes the iteration's chance table where
the Python pass would make it (:func:`policies.fmoe_jit.decreasing_rows`, at a pass that
reaches the admission kernel), lists the device's victims
(:func:`policies.fmoe_jit.victims`, as ``FmoeAdmitKernel._kernel_victims`` does) and
ranks and judges (:func:`policies.fmoe_admit_jit.admit_gate`). Before, these were four
kernel calls with Python between them; each does the same operations in the same order
here, so the decisions are bitwise the same (tests/test_fmoe_gate_one.py runs the fused
and the step-by-step passes side by side on random routings).

It calls kernels of other modules: numba keys a kernel's disk cache on its own source
file only (docs/testing.md, "numba's disk cache"), so the contents of those modules join
this file's kernels' cache stamp (:func:`specs.jitcache.stamp_dependencies`, as
sim/fastkernel_prefetch.py does): a changed callee recompiles them.

Imported when an fMoE policy with deadline admission is bound (with policies.fmoe_jit).
"""

from __future__ import annotations

from numba import njit

from policies.fmoe_admit_jit import admit_gate, merge_cands
from policies.fmoe_calib_jit import calib_note
from policies.fmoe_jit import decreasing_rows, victims
from specs.jitcache import stamp_dependencies

# admit_one's codes besides admit_gate's (>= -3)
LOOP = -10  # fewer candidates than the kernel takes: the Python loop judges them
PY_VICTIMS = -11  # a victim's score is NaN: the step-by-step pass (its Python listing)


@njit(cache=True)
def admit_one(  # noqa: ANN201, PLR0913 - numba
    cnt,
    n_of,
    n_old,
    n_lq,
    g,
    need_tab,
    kmin,
    c_lay,
    c_exp,
    c_lu,
    tie,
    gev,
    ev_rows,
    step,
    demand_s,
    interval,
    no_rho,
    it,
    beta,
    kap,
    named_layer,
    named_ids,
    mh0,
    mn0,
    P,
    idx,
    of,
    op,
    oldf,
    lqf,
    lqv,
    J,
    pos,
    lay,
    jj,
    p,
    was,
    look,
    cal_on,
    pend,
    noted,
    fl,
    base,
    pooled,
    price,
    free,
    c_ok,
    c_n,
    per_dev,
    prot,
    vout,
    vout_s,
    vout_e,
    most_cap,
    vfree,
    v_e,
    v_len,
    v_loaded,
    dev_of,
    committed,
    copy,
    avail,
    ist,
    tab,
    act,
    counts,
    rank_chance,
    resid,
    cal_h,
    cal_n,
    marginal,
    mode,
    map_h,
    cat_h1,
    on,
    rec,
    sv,
    ch0,
    cn0,
    pbuf,
    res,
):  # noqa: ANN001 - numba
    """One pass (module doc). The arguments that change from call to call come first
    (``cnt`` .. ``mn0``), then those fixed once the policy is bound (``P`` .. ``res``:
    arrays filled in place and options, which the caller keeps as one tuple instead of
    reading fifty attributes a call):
    merge_cands' arguments (``P`` .. ``look``; its live pending keys and p, the pending
    keys and the lookahead chances' keys and values the first ``n_of``, ``n_old`` and
    ``n_lq`` of the buffers ``of``, ``op``, ``oldf``, ``lqf``, ``lqv``), calib_note's
    where ``cal_on``, the chance table (``fl``, ``base``, ``pooled``) made where
    ``need_tab`` and ``kmin`` or more candidates merged, where ``price`` the victims of
    each device with candidates (per device: ``free`` slots, ``c_ok`` whether its
    candidate arrays ``c_lay``/``c_exp``/``c_lu`` (tuples, ``c_n`` candidates) are
    there; ``per_dev`` scratch; at most ``most_cap`` listed), then admit_gate's
    arguments.

    ``res`` gets [candidates merged, 1 if the table was made]. Returns admit_gate's value
    (actions, or -2 / -3 where the Python pass decides), :data:`LOOP` below ``kmin``
    candidates (nothing judged: the Python loop's turn), or :data:`PY_VICTIMS` (the
    step-by-step pass's turn; the merge, notes and table stand, as they would there)."""
    n = merge_cands(P, idx, cnt, of[:n_of], op[:n_of], oldf[:n_old], lqf[:n_lq], lqv[:n_lq],
                    g, J, pos, lay, jj, p, was, look)  # fmt: skip
    res[0] = n
    res[1] = 0
    if cal_on:
        calib_note(lay, jj, look, n, ist, it, pend, noted)
    if n < kmin:
        return LOOP
    if need_tab:  # FmoeEviction._chance: the pass ranks by chance, made there first
        decreasing_rows(fl, base, pooled)
        res[1] = 1
    if price:  # FmoeAdmitKernel._kernel_victims: each device with candidates, listed
        nd = free.shape[0]
        for d in range(nd):
            per_dev[d] = 0
            vfree[d] = 0
            v_len[d] = 0
            v_loaded[d] = False
        for i in range(n):
            per_dev[dev_of[lay[i], jj[i]]] += 1
        for d in range(nd):
            if per_dev[d] == 0:
                continue
            if free[d] >= per_dev[d]:  # every copy takes a free slot: no victim priced
                vfree[d] = free[d]
                v_loaded[d] = True
                continue
            if not c_ok[d]:  # no candidate arrays to list from: the Python's listing
                return PY_VICTIMS
            most = per_dev[d] + 1 if per_dev[d] + 1 < most_cap else most_cap
            c = victims(ist, fl, prot, gev, it, c_lay[d], c_exp[d], c_lu[d], c_n[d], tie,
                        vout[:most], vout_s[:most], vout_e[:most], ev_rows)  # fmt: skip
            if c < 0:
                return PY_VICTIMS
            for t in range(c):
                v_e[d, t] = -vout_e[t]
            vfree[d] = free[d]
            v_len[d] = c
            v_loaded[d] = True
    return admit_gate(
        lay, jj, p, was, look, n, g, dev_of, committed, copy, avail, demand_s, interval,
        no_rho, ist, tab, True, it, act, counts, price, step, vfree, v_e, v_len, v_loaded,
        rank_chance, beta, resid, kap, cal_h, cal_n, marginal, mode, map_h, cat_h1, on, rec,
        named_layer, named_ids, mh0, mn0, sv, ch0, cn0, pbuf,
    )  # fmt: skip


# admit_one compiles in kernels of these modules: their sources join its disk-cache
# stamp (specs/jitcache.py)
def _stamp_own_kernels() -> None:
    from policies import fmoe_admit_jit, fmoe_blocking, fmoe_calib_jit, fmoe_jit

    stamp_dependencies((admit_one,), (fmoe_admit_jit, fmoe_blocking, fmoe_calib_jit, fmoe_jit))


_stamp_own_kernels()
