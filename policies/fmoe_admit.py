"""The one-row admission pass of :meth:`policies.fmoe_deadline.FmoeDeadline._admit` in one
numba kernel call (:mod:`policies.fmoe_admit_jit`), as a mixin of FmoeDeadline: the
candidates become arrays, the links' states and (``victim="priced"``) the devices'
victims are read as the Python pass would read them, and the orders and cancellations
the kernel returns are sent in rank order (docs/fmoe.md, "Speed")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from policies.base import Policy, PrefetchOrder
from policies.cache import ExpertKey
from policies.fmoe_victim import VICTIMS_PRICED

_NO_IDS = np.zeros(0, np.int64)
# up to this many candidates, a multi-device pass finds their devices with lists
_FEW = 32
# up to this many actions, a pass's orders and cancellations are sent item by item
_FEW_ACTS = 16
_K = None  # policies.fmoe_admit_jit (numba: loaded with fmoe_jit at bind)


def _kernels():  # noqa: ANN202 - the module
    """policies.fmoe_admit_jit, imported at the first admission pass (numba)."""
    global _K  # noqa: PLW0603 - a lazily imported module
    if _K is None:
        from policies import fmoe_admit_jit

        _K = fmoe_admit_jit
    return _K


# admit_rows' victim arguments without victim pricing (none read)
_NO_VICTIMS = (
    0.0,
    np.zeros(1, np.int64),
    np.zeros((1, 1)),
    np.zeros(1, np.int64),
    np.zeros(1, np.bool_),
)


@dataclass
class _AdmitBufs:
    """:meth:`FmoeAdmitKernel._admit_kernel`'s arrays, made once per policy (the kernel
    fills them; a call's values never outlive it)."""

    committed: np.ndarray  # per device: link seconds ahead of the next order
    copy: np.ndarray  # per device: one copy's seconds
    avail: np.ndarray  # per device: prefetch link time per layer step
    resid: np.ndarray  # [2]: measured residence per source
    act: np.ndarray  # [n, 2]: the kernel's actions
    counts: np.ndarray  # [7]: the pass's order counts
    sv: np.ndarray  # per candidate: the lookahead's saving of it
    ch0: np.ndarray  # per candidate: hits of map-only picks
    cn0: np.ndarray  # per candidate: picks of map-only picks (-1: not one)
    p: np.ndarray  # per candidate: the chances (rank="chance")
    rec: np.ndarray  # [L]: the lookahead's recall per layer (NaN: not computed)
    vfree: np.ndarray  # per device: free slots (_kernel_victims)
    v_len: np.ndarray  # per device: victims listed
    v_loaded: np.ndarray  # per device: listed at all
    v_e: np.ndarray  # [devices, VICTIMS_PRICED]: the victims' expected times

    @staticmethod
    def make(size: int, n_dev: int, n_layers: int) -> _AdmitBufs:
        """Buffers for up to ``size`` candidates on ``n_dev`` devices."""
        return _AdmitBufs(
            np.zeros(n_dev), np.zeros(n_dev), np.zeros(n_dev), np.zeros(2),
            np.empty((size, 2), np.int64), np.zeros(7, np.int64), np.zeros(size),
            np.zeros(size), np.zeros(size), np.zeros(size), np.full(n_layers, np.nan),
            np.zeros(n_dev, np.int64), np.zeros(n_dev, np.int64), np.zeros(n_dev, np.bool_),
            np.zeros((n_dev, VICTIMS_PRICED)),
        )  # fmt: skip


class FmoeAdmitKernel:
    """:meth:`_admit_kernel` and the victim lists it reads."""

    _admit_bufs: _AdmitBufs | None = None
    # the last pass's per-iteration arrays, keyed by their lists' values (_admit_kernel)
    _admit_arrs: tuple | None = None
    _admit_named: tuple | None = None  # the lookahead's named set and its array

    def _admit_kernel(
        self,
        g: int,
        lay: np.ndarray,
        jj: np.ndarray,
        p: np.ndarray,
        was: np.ndarray,
        look: np.ndarray,
    ) -> bool:
        """The rest of :meth:`_admit` for a one-row iteration's candidates (layers ``lay``,
        experts ``jj``, p ``p``, ``was`` queued before, ``look`` the lookahead chance or
        -1.0: policies.fmoe_cands.CandidateSet.take_merged)
        in one kernel call (policies.fmoe_admit_jit): the same decisions, orders and
        cancellations in the same order. False (nothing done, the arrays unchanged) where
        the kernel cannot rank (a NaN key)."""
        K = _kernels()
        n = lay.shape[0]
        bufs = self._admit_bufs
        if bufs is None:  # sized for every candidate of the set (n <= L x J)
            bufs = self._admit_bufs = _AdmitBufs.make(self._dl_cands.p.shape[0], self._n_dev,
                                                      len(self._la_on_arr))  # fmt: skip
        view = self._view
        assert view is not None
        nd = self._n_dev
        committed, copy, avail = bufs.committed, bufs.copy, bufs.avail
        # the links' states, read before any order is sent (as the loop reads each at
        # its device's first candidate: an order changes only its own link, after that)
        if nd == 1:
            devs: Sequence[int] = (0,)
            per_dev: Sequence[int] = (n,)
        elif n <= _FEW:  # the devices and their counts from lists (numpy's calls cost more)
            dev_of = self._dev_of
            cd = [dev_of[la][j] for la, j in zip(lay.tolist(), jj.tolist(), strict=True)]
            devs = sorted(set(cd))
            per_dev = [0] * nd
            for d in cd:
                per_dev[d] += 1
        else:
            cand_dev = self._dev_arr[lay, jj]
            devs = np.unique(cand_dev).tolist()
            per_dev = np.bincount(cand_dev, minlength=nd)
        if nd > 1:
            committed[:] = 0.0
            copy[:] = self._copy_s
            avail[:] = 0.0
        # _avail_per_layer of every device, once (the forecast's shift reads them all)
        iv = self._interval
        if iv is None:
            iv = view.layer_time_s(self._rows)
        av_all = [max(iv - x, 0.0) for x in self._demand_s]
        shift = self._first_step_shift(g, av_all)  # forecast="gate" (FmoeDeadline)
        for dev in devs:
            link = view.link_state(dev)
            committed[dev] = link.queued_s
            copy[dev] = link.copy_s
            avail[dev] = av_all[dev]
            if shift is not None:
                committed[dev] += shift[dev]
        interval = self._interval
        no_rho = not interval or interval <= 0
        if self._rank_chance:  # ranked by chance: _admit's _iteration_chance per candidate
            self._chance()  # (there first), computed by the kernel
        price = self._victim_priced
        if price:
            victims = self._kernel_victims(devs, avail, per_dev)
        else:
            victims = _NO_VICTIMS
        if victims is None:
            return False
        # map_value="marginal": what the lookahead would save of each anyway (_admit's
        # sv) and the map picks the lookahead passed over (FmoeDeadline._iteration_chance):
        # computed by the kernel (policies.fmoe_admit_jit.marginal_terms)
        named_layer, named_ids, mh0, mn0 = self._admit_named_args()
        mode_i = self._admit_mode()
        act, counts = bufs.act, bufs.counts
        have = self._chance_it == self._cur_it
        rank_chance = self._rank_chance
        demand, beta, kap = self._admit_link_arrays()
        # victim="residence" (policies.fmoe_residence): the measured residence, else 0.0
        resid = bufs.resid
        if price and self._victim_resid:
            resid[0], resid[1] = self._residence_steps(0), self._residence_steps(1)
        else:
            resid[0] = resid[1] = 0.0
        head = (lay, jj, p, was, look, n, g, self._dev_arr, committed, copy, avail, demand,
                0.0 if no_rho else float(interval), no_rho, self._ist)  # fmt: skip
        tail = (rank_chance, beta, resid, kap, self._cal_h, self._cal_n, self._map_marginal, mode_i, self._map_h,
                self._la_cat_h[1], self._la_on_arr, bufs.rec, named_layer, named_ids, mh0, mn0,
                bufs.sv, bufs.ch0, bufs.cn0, bufs.p)  # fmt: skip
        na = K.admit_gate(*head, self._chance_tab, have, self._cur_it, act, counts, price,
                           *victims, *tail)  # fmt: skip
        if na == -1:  # a late copy needs this iteration's chance table: make it, again
            tab = self._chance()
            na = K.admit_gate(*head, tab, True, self._cur_it, act, counts, price, *victims,
                               *tail)  # fmt: skip
        if rank_chance:
            p = bufs.p[:n]  # the chances the kernel put there
        if na < 0:
            return False
        self._admit_acts(g, lay, jj, p, na, act, counts)
        return True

    def _admit_named_args(self) -> tuple[int, np.ndarray, float, float]:
        """map_value="marginal": the layer the lookahead named experts for at this gate
        (-1: none), their ids, and the hits and picks of map picks it passed over there
        (admit_gate's named_layer, named_ids, mh0, mn0)."""
        named = self._look_named
        named_layer, named_ids, mh0, mn0 = -1, _NO_IDS, 0.0, -1.0
        if self._map_marginal and named is not None and named[0] == self._cur_it:
            named_layer = named[1]
            memo = self._admit_named  # the set's array, made once per set (it is frozen)
            if memo is not None and memo[0] is named[2]:
                named_ids = memo[1]
            else:
                named_ids = np.fromiter(named[2], np.int64, len(named[2]))
                self._admit_named = (named[2], named_ids)
            if 0 <= named_layer < len(self._mcat_h[0]):
                mh0, mn0 = float(self._mcat_h[0, named_layer]), float(self._mcat_n[0, named_layer])
        return named_layer, named_ids, mh0, mn0

    def _admit_mode(self) -> int:
        """The lookahead option as admit_gate's mode: 0 false, 1 auto, 2 true."""
        mode = self._la_mode
        return 0 if mode is False else (2 if mode is True else 1)

    def _admit_link_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(demand seconds, beta over kappa, kappa) per device as arrays.

        blocking="measured" (policies.fmoe_blocking): the measured waits, else zeros;
        saving="finish" (policies.fmoe_finish): link-time costs over kappa (1.0: as
        before). These lists change once an iteration: their arrays are made again only
        when their values differ from the last pass's (compared as lists)."""
        d, b, k = self._demand_s, self._beta if self._blocking else None, self._kap
        memo = self._admit_arrs
        # the same three lists as the last pass's: the same values (each is replaced by
        # a new list when measured again, never changed in place)
        if memo is not None and memo[4][0] is d and memo[4][1] is b and memo[4][2] is k:
            return memo[1], memo[2], memo[3]
        src = (d, b, k)
        if memo is None or memo[0] != src:
            beta = np.asarray(self._beta if self._blocking else np.zeros(self._n_dev), np.float64)
            kap = np.asarray(self._kap, np.float64)
            memo = self._admit_arrs = (
                (list(src[0]), None if src[1] is None else list(src[1]), list(src[2])),
                np.asarray(self._demand_s, np.float64),
                beta / kap,
                kap,
                src,
            )
        else:
            memo = self._admit_arrs = (*memo[:4], src)
        return memo[1], memo[2], memo[3]

    def _admit_acts(
        self,
        g: int,
        lay: np.ndarray,
        jj: np.ndarray,
        p: np.ndarray,
        na: int,
        act: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """Send the kernel's ``na`` actions ``act`` (candidate index, ORDER or CANCEL) in
        order, orders at priority p / (layer - g); the pass's counts to the statistics."""
        K = _kernels()
        # orders at the map's p, or with rank_chance the chances the kernel put there
        plain = type(self).prefetch is Policy.prefetch and type(self).cancel is Policy.cancel
        if plain and na <= _FEW_ACTS:
            # the loop below without its method calls, item by item (a pass acts on a
            # few candidates: the comprehensions' numpy calls cost more)
            pending = {}
            enq, canc = self._enqueue, self._cancel
            order = K.ORDER
            # victim="residence": the orders noted as they are sent (_residence_admitted's
            # rule, in the same order; FmoeDeadline._admit then skips it)
            res = self._res_on
            sent, look = self._res_sent, self._look_q
            for i, code in act[:na].tolist():
                la, j = lay.item(i), jj.item(i)
                key = (la, j)
                if code == order:
                    v = p.item(i)
                    pending[key] = v
                    enq.append(PrefetchOrder(la, j, v / (la - g)))
                    if res:
                        s = sent.get(la)
                        if s is None:
                            s = sent[la] = {}
                        if key in look:
                            s[key] = 1
                        elif key not in s:
                            s[key] = 0
                else:
                    canc.append(key)
            self._pending = pending
            self._res_noted = res
            self._count_kernel(counts.tolist())
            return
        if plain:
            # the loop below in comprehensions (Policy.prefetch and cancel only append to
            # their lists, in call order: the same lists)
            acts = act[:na]
            sent = acts[:, 1] == K.ORDER
            oi = acts[sent, 0]
            okeys = list(zip(lay[oi].tolist(), jj[oi].tolist(), strict=True))
            opv = p[oi].tolist()
            self._pending = dict(zip(okeys, opv, strict=True))
            self._enqueue.extend(
                [PrefetchOrder(k[0], k[1], v / (k[0] - g)) for k, v in zip(okeys, opv, strict=True)]
            )
            if len(oi) < na:
                ci = acts[~sent, 0]
                self._cancel.extend(zip(lay[ci].tolist(), jj[ci].tolist(), strict=True))
            self._count_orders(*counts.tolist())
            return
        pending: dict[ExpertKey, float] = {}
        keys = list(zip(lay.tolist(), jj.tolist(), strict=True))
        pvs = p.tolist()
        for i, code in act[:na].tolist():
            key = keys[i]
            if code == K.ORDER:
                pv = pvs[i]
                pending[key] = pv
                self.prefetch(key[0], key[1], pv / (key[0] - g))
            else:
                self.cancel(key[0], key[1])
        self._pending = pending
        self._count_orders(*counts.tolist())

    def _kernel_victims(
        self, devs: Sequence[int], avail: np.ndarray, per_dev: Sequence[int] | np.ndarray
    ) -> tuple | None:
        """The victim lists of ``devs`` for :func:`policies.fmoe_admit_jit.admit_rows`
        (step, free slots, victims' expected times to next use in the order they are
        taken, their count, listed): what ``FmoeVictim._victim_use_chance`` reads when a
        pass prices its first copy on each device (every candidate is priced, so each of
        ``devs`` is listed). None (decide in Python) where reading the expected times now
        could make the eviction table earlier than the Python pass would. A device with
        at least as many free slots as it has candidates (``per_dev``) gets an empty list:
        every copy it admits takes a free slot first, so no victim is ever priced there."""
        if self.ctx is None:
            return None
        nd = self._n_dev
        bufs = self._admit_bufs
        assert bufs is not None
        vfree, v_len, v_loaded, v_e = bufs.vfree, bufs.v_len, bufs.v_loaded, bufs.v_e
        if nd > 1:  # devices without candidates: nothing listed
            vfree[:] = 0
            v_len[:] = 0
            v_loaded[:] = False
        caches = self.ctx.caches
        reset = False  # the Python lists (_victims_load's) are emptied before their first use
        for dev in devs:
            free = caches[dev].free
            if free >= per_dev[dev]:  # never reaches a victim: skip scoring them
                vfree[dev], v_len[dev], v_loaded[dev] = free, 0, True
                continue
            if self._victims_direct(dev, small=True):
                # the compiled listing's expected times straight into v_e (the kernel
                # reads only them: _victims_listed's entry lists are not made)
                # a pass takes at most one victim per copy it admits on the device (its
                # candidates there), so reads none past that many + 1: the list's first
                c = self._victims_kernel(dev, min(int(per_dev[dev]) + 1, VICTIMS_PRICED))[0]
                if c >= 0:
                    v_e[dev, :c] = -self._vl_bufs[2][:c]  # type: ignore[index]
                    vfree[dev], v_len[dev], v_loaded[dev] = free, c, True
                    continue
            if not reset:
                self._victims_reset()
                reset = True
            self._victims_load(dev)
            vq = self._vq[dev]
            vfree[dev], v_len[dev], v_loaded[dev] = self._vfree[dev], len(vq), True
            if vq:
                ve = self._ve.get(dev)  # listed with their expected times (fmoe_victim)
                if ve is not None:
                    v_e[dev, : len(ve)] = ve
                    continue
                if self._etnu_dirty:  # expected_next_use would make the table: leave it
                    return None
                tab = self._etnu_mv
                for t, (_, e) in enumerate(reversed(vq)):
                    v_e[dev, t] = -tab[e.key]  # expected_next_use(*e.key)
        step = 0.0
        if any(avail[dev] <= 0 for dev in devs):
            view = self._view
            assert view is not None
            s = self._interval or view.layer_time_s(self._rows)
            step = float(s) if s else 0.0
        return step, vfree, v_e, v_len, v_loaded
