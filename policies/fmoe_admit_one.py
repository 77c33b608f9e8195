"""A one-row admission pass of :meth:`policies.fmoe_deadline.FmoeDeadline._admit`
in one kernel call (:func:`policies.fmoe_gate_jit.admit_one`; issue 21, speed only), as a
mixin of FmoeDeadline: the merge of the candidates, the calibration notes, the chance
table, the victims' listing and the ranking and judging, which were four kernel calls
with Python between them (``CandidateSet.take_merged``, ``_calib_note``,
``FmoeAdmitKernel._admit_kernel`` with ``_kernel_victims``). It reads what that pass reads
(the link's state, the device's free slots and candidate arrays) before the call, all
of it free of side effects, and takes over from the step-by-step pass only where both
would act the same; elsewhere it returns None before anything is changed
(tests/test_fmoe_gate_one.py compares the two passes on random routings)."""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.base import Policy
from policies.fmoe_admit import _AdmitBufs
from policies.fmoe_eviction import _TIE_EPS, CAL_BINS, FmoeEviction
from policies.fmoe_victim import _LIST_KERNEL, VICTIMS_PRICED

# one-row passes on one device through admit_one (False: the step-by-step pass, the
# reference the tests compare it with)
_ONE = True
_DONE, _KERNEL, _LOOP = "done", "kernel", "loop"
_NO_I = np.zeros(0, np.int64)
_NO_F = np.zeros(0, np.float64)
# what _admit_one returns once it sent and counted (_admit_pass reads only the first)
_DONE_ONE = (_DONE, _NO_I, _NO_I, _NO_F, np.zeros(0, np.bool_), _NO_F)


class FmoeAdmitOne:
    """:meth:`_admit_one`: the one-call pass."""

    _one_k: Any = None  # policies.fmoe_gate_jit (numba: at the first pass)
    _one_v: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # victims' outputs
    _one_res: np.ndarray | None = None
    _one_static: tuple = ()  # admit_one's arguments fixed at bind (_one_setup)
    _one_mm: tuple = ()  # memoryviews of merge_cands' input buffers (_one_setup)
    _one_av: tuple | None = None  # _one_avail's memo: (demand s, interval, avail, any <= 0)
    _one_sh: tuple | None = None  # _one_shift's memo

    def _one_class_ok(self) -> bool:
        """Whether this policy's class sends and cancels orders as Policy does and makes
        the chance table FmoeEviction._chance makes (the call does the same; a subclass
        or a test that replaces them keeps the step-by-step pass). Checked at the first
        pass: a class's methods do not change during a run."""
        cls = type(self)
        return (
            cls.prefetch is Policy.prefetch
            and cls.cancel is Policy.cancel
            and cls._chance is FmoeEviction._chance
        )

    def _one_setup(self) -> Any:
        """The kernels' module, the call's buffers and its arguments fixed once the
        policy is bound (admit_one's ``P`` .. ``res``, one tuple)."""
        from policies import fmoe_gate_jit

        self._one_v = (
            np.empty(VICTIMS_PRICED, np.int64),
            np.empty(VICTIMS_PRICED),
            np.empty(VICTIMS_PRICED),
        )
        self._one_res = np.zeros(2, np.int64)
        nd = self._n_dev
        self._one_arrs = (np.zeros(nd, np.int64), np.zeros(nd, np.bool_), np.zeros(nd, np.int64))
        self._one_mv = tuple(memoryview(a) for a in self._one_arrs)  # item writes
        self._one_per = np.zeros(nd, np.int64)
        # per device its cache's candidate arrays (placeholders until listed)
        self._one_cl, self._one_ce = [_NO_I] * nd, [_NO_I] * nd
        self._one_cu = [_NO_F] * nd
        self._one_flat = self._dev_arr.ravel().tolist()  # flat key -> device
        dl = self._dl_cands
        bufs = self._admit_bufs
        if bufs is None:  # sized for every candidate of the set (n <= L x J)
            bufs = self._admit_bufs = _AdmitBufs.make(dl.p.shape[0], nd, len(self._la_on_arr))
        # merge_cands' inputs, filled item by item (a pass has a few: numpy's array from a
        # list costs more), each key at most once: <= L x J
        size = dl.p.shape[0]
        mi = (np.zeros(size, np.int64), np.zeros(size), np.zeros(size, np.int64))
        ml = (np.zeros(size, np.int64), np.zeros(size))
        self._one_mm = tuple(memoryview(a) for a in (*mi, *ml))
        free, c_ok, c_n = self._one_arrs
        vo, vs, ve = self._one_v
        # every array here is made at bind and filled in place from then on
        self._one_static = (
            dl.p, dl.idx, *mi, *ml, dl.J, dl._pos, *dl._out, self._cal_on, self._cal_pend,
            self._cal_noted, self._fl, self._base, CAL_BINS, self._victim_priced, free, c_ok,
            c_n, self._one_per, self._prot, vo, vs, ve, VICTIMS_PRICED, bufs.vfree, bufs.v_e,
            bufs.v_len, bufs.v_loaded, self._dev_arr, bufs.committed, bufs.copy, bufs.avail,
            self._ist, self._chance_tab, bufs.act, bufs.counts, True, bufs.resid, self._cal_h,
            self._cal_n, self._map_marginal, self._admit_mode(), self._map_h,
            self._la_cat_h[1], self._la_on_arr, bufs.rec, bufs.sv, bufs.ch0, bufs.cn0,
            bufs.p, self._one_res,
        )  # fmt: skip
        self._one_k = fmoe_gate_jit
        return fmoe_gate_jit

    def _one_avail(self) -> list[float]:
        """Every device's ``_avail_per_layer``: made again only when the measured pace
        (a new list of demand seconds, or another interval) changed, at an iteration's
        start; without a measured interval, from the view's layer time every pass."""
        iv = self._interval
        ds = self._demand_s
        memo = self._one_av
        if iv is not None and memo is not None and memo[0] is ds and memo[1] == iv:
            return memo[2]
        if iv is None:
            iv = self._view.layer_time_s(self._rows)
        av = [max(iv - x, 0.0) for x in ds]
        # [3]: whether some device has no prefetch time (the step is read only then)
        self._one_av = (ds, self._interval, av, any(x <= 0 for x in av))
        return av

    def _one_shift(self, g: int, av_all: list[float]) -> list[float] | None:
        """``_first_step_shift(g, av_all)``, made once per gate (a gate's second pass, after
        its search, reads the same gate's demand loads and the same pace)."""
        memo = self._one_sh
        dem = self._gate_dem
        if (
            memo is not None
            and memo[0] == g
            and memo[1] is dem
            and memo[2] is av_all
            and memo[3] == self._interval
            and memo[4] == self._max_s
        ):
            return memo[5]
        shift = self._first_step_shift(g, av_all)
        self._one_sh = (g, dem, av_all, self._interval, self._max_s, shift)
        return shift

    def _admit_one(
        self, g: int, live: list[tuple[tuple[int, int], float]], old: dict, kmin: int
    ) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """The pass at gate ``g`` of a one-row iteration on one device, ``live`` the pending
        candidates not started whose layer is ahead (in ``old``'s order), ``kmin`` the fewest
        candidates the admission kernel judges (fewer: the Python loop's): None (nothing
        done) where it does not apply; else (what is left, the merged candidates' layers,
        experts, p, was queued, lookahead chance). What is left: "done" (sent and counted,
        but for the stale cancellations; the arrays then empty), "kernel" (a NaN victim score: the step-by-step
        admission kernel's Python victim listing) or "loop" (the Python loop judges them;
        none where there are none)."""
        if (
            not _ONE
            or not self._rank_chance
            or self.ctx is None
            # a chance table a test puts on the instance (not FmoeEviction._chance's)
            or "_chance" in self.__dict__
        ):
            return None
        K = self._one_k
        if K is None:
            if not self._one_class_ok():
                return None
            K = self._one_setup()
        price = self._victim_priced
        if price and not (_LIST_KERNEL and self._scores_fast):
            return None
        dl = self._dl_cands
        bufs = self._admit_bufs
        # CandidateSet.merge_inputs' arrays, into the call's buffers: the live keys (flat)
        # and p, the pending keys where more than the live ones, the lookahead chances
        J = dl.J
        mf, mp, mo, lf, lv = self._one_mm
        n_of = 0
        for (la, j), v in live:
            mf[n_of] = la * J + j
            mp[n_of] = v
            n_of += 1
        n_old = 0
        if len(old) > n_of:
            for la, j in old:
                mo[n_old] = la * J + j
                n_old += 1
        n_lq = 0
        for (la, j), v in self._look_q.items():
            lf[n_lq] = la * J + j
            lv[n_lq] = v
            n_lq += 1
        view = self._view
        committed, copy, avail = bufs.committed, bufs.copy, bufs.avail  # type: ignore[union-attr]
        av_all = self._one_avail()
        shift = self._one_shift(g, av_all)  # forecast="gate" (FmoeDeadline)
        # the links and caches of the candidates' devices (a superset: every live one's
        # and every new one's, some of whose layers may have run), read as the
        # step-by-step pass reads them for its candidates' devices (reading changes
        # nothing; the kernel reads no other device's)
        if self._n_dev == 1:
            devs: Any = (0,)
        else:
            flat = self._one_flat
            devs = {flat[k[0] * dl.J + k[1]] for k, _ in live}
            if dl.cnt:
                devs.update(map(flat.__getitem__, dl.idx[: dl.cnt].tolist()))
        caches = self.ctx.caches
        free, c_ok, cn = self._one_mv
        cl, ce, cu = self._one_cl, self._one_ce, self._one_cu
        for dev in devs:
            link = view.link_state(dev)
            committed[dev] = link.queued_s + shift[dev] if shift is not None else link.queued_s
            copy[dev] = link.copy_s
            avail[dev] = av_all[dev]
            cache = caches[dev]
            free[dev] = cache.free
            arr = cache._arr  # the cache's candidate arrays, as _victims_kernel reads them
            # (else made or remade by the cache's own call there: the Python's listing)
            ok = arr is not None and arr.src is cache._cands and arr.n == len(cache._cands)
            c_ok[dev] = ok
            if ok:
                cl[dev], ce[dev], cu[dev], cn[dev] = arr.layers, arr.experts, arr.last_used, arr.n
        interval = self._interval
        no_rho = not interval or interval <= 0
        step = 0.0  # FmoeAdmitKernel._kernel_victims' step (read only where avail <= 0)
        if price and self._one_av[3] and any(av_all[dev] <= 0 for dev in devs):  # type: ignore[index]
            s = self._interval or view.layer_time_s(self._rows)
            step = float(s) if s else 0.0
        resid = bufs.resid  # type: ignore[union-attr]
        if price and self._victim_resid:
            resid[0], resid[1] = self._residence_both()
        else:
            resid[0] = resid[1] = 0.0
        named_layer, named_ids, mh0, mn0 = self._admit_named_args()
        demand, beta, kap = self._admit_link_arrays()
        res = self._one_res
        it = self._cur_it
        code = K.admit_one(
            dl.cnt, n_of, n_old, n_lq, g, self._chance_it != it, kmin, tuple(cl),
            tuple(ce), tuple(cu), _TIE_EPS / (abs(self._now) + 1.0), self._g, self._ev_rows,
            step, demand, 0.0 if no_rho else float(interval), no_rho, it, beta, kap,
            named_layer, named_ids, mh0, mn0, *self._one_static,
        )  # fmt: skip
        dl.cnt = 0
        n = int(res[0])  # type: ignore[index]
        if res[1]:  # type: ignore[index]  # FmoeEviction._chance's bookkeeping: this iteration's table
            self._chance_it = it
            self._ev += 1
        lay, jj, p, was, look = dl._out
        if code >= 0:
            # the actions name candidates below n: the whole buffers serve (no slices)
            self._admit_acts(g, lay, jj, bufs.p, code, bufs.act, bufs.counts)  # type: ignore[union-attr]
            return _DONE_ONE
        lay, jj, p, was, look = lay[:n], jj[:n], p[:n], was[:n], look[:n]
        return (_KERNEL if code == K.PY_VICTIMS else _LOOP), lay, jj, p, was, look
