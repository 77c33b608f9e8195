"""The one-row admission pass of :meth:`policies.fmoe_deadline.FmoeDeadline._admit` in one
numba kernel call (:mod:`policies.fmoe_admit_jit`), as a mixin of FmoeDeadline: the
candidates become arrays, the links' states and (``victim="priced"``) the devices'
victims are read as the Python pass would read them, and the orders and cancellations
the kernel returns are sent in rank order (docs/fmoe.md, "Speed")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.base import Policy, PrefetchOrder
from policies.cache import ExpertKey

# admit_rows' victim arguments without victim pricing (none read)
_NO_VICTIMS = (
    0.0,
    np.zeros(1, np.int64),
    np.zeros((1, 1)),
    np.zeros(1, np.int64),
    np.zeros(1, np.bool_),
)


class FmoeAdmitKernel:
    """:meth:`_admit_kernel` and the victim lists it reads."""

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
        from policies import fmoe_admit_jit as K  # numba: loaded with fmoe_jit at bind

        n = lay.shape[0]
        p = p.copy() if self._rank_chance else p  # the kernel writes the chances there
        view = self._view
        assert view is not None
        nd = self._n_dev
        committed = np.zeros(nd)
        copy = np.full(nd, self._copy_s)
        avail = np.zeros(nd)
        # the links' states, read before any order is sent (as the loop reads each at
        # its device's first candidate: an order changes only its own link, after that)
        cand_dev = self._dev_arr[lay, jj]
        devs = (0,) if nd == 1 else np.unique(cand_dev).tolist()
        shift = self._first_step_shift(g)  # forecast="gate" (FmoeDeadline)
        for dev in devs:
            link = view.link_state(dev)
            committed[dev] = link.queued_s
            copy[dev] = link.copy_s
            avail[dev] = self._avail_per_layer(dev)
            if shift is not None:
                committed[dev] += shift[dev]
        interval = self._interval
        no_rho = not interval or interval <= 0
        demand = np.asarray(self._demand_s, np.float64)
        if self._rank_chance:  # ranked by chance: _admit's _iteration_chance per candidate
            self._chance()  # (there first), computed by the kernel
        price = self._victim_priced
        if price:
            per_dev = np.bincount(cand_dev, minlength=nd) if nd > 1 else np.array([n])
            victims = self._kernel_victims(devs, avail, per_dev)
        else:
            victims = _NO_VICTIMS
        if victims is None:
            return False
        # map_value="marginal": what the lookahead would save of each anyway (_admit's sv)
        sv = np.zeros(n)
        if self._map_marginal:
            far = np.flatnonzero(lay >= g + 2)
            if far.size:
                far_lay = lay[far]
                for layer in np.unique(far_lay).tolist():
                    r = self._look_recall(layer)
                    if r:
                        at = far[far_lay == layer]
                        c, av = copy[cand_dev[at]], avail[cand_dev[at]]
                        sv[at] = r * np.where(c < av, c, av)  # per candidate: r x min(c, av)
        # map picks the lookahead passed over (FmoeDeadline._iteration_chance)
        ch0 = np.zeros(n)
        cn0 = np.full(n, -1.0)
        named = self._look_named
        if self._map_marginal and named is not None and named[0] == self._cur_it:
            # _map_only per candidate: only the lookahead's layer has such picks, and all
            # of that layer's share one (hits, picks) pair
            at = np.flatnonzero(lay == named[1]).tolist()
            if at:
                hn = None
                ordered = named[2]
                for i in at:
                    if int(jj[i]) not in ordered:
                        if hn is None:
                            hn = self._map_only(named[1], int(jj[i]))
                        ch0[i], cn0[i] = hn  # type: ignore[misc]
        act = np.empty((n, 2), np.int64)
        counts = np.zeros(7, np.int64)
        have = self._chance_it == self._cur_it
        rank_chance = self._rank_chance
        # blocking="measured" (policies.fmoe_blocking): the measured waits, else zeros
        beta = np.asarray(self._beta if self._blocking else np.zeros(nd), np.float64)
        # saving="finish" (policies.fmoe_finish): link-time costs over kappa (1.0: as before)
        kap = np.asarray(self._kap, np.float64)
        beta = beta / kap
        # victim="residence" (policies.fmoe_residence): the measured residence, else 0.0
        resid = (
            np.array([self._residence_steps(0), self._residence_steps(1)])
            if price and self._victim_resid
            else np.zeros(2)
        )
        args = (lay, jj, p, was, look, g, self._dev_arr, committed, copy, avail, demand,
                0.0 if no_rho else float(interval), no_rho, self._ist)  # fmt: skip
        na = K.admit_rows(
            *args,
            self._chance_tab,
            have,
            self._cur_it,
            act,
            counts,
            price,
            *victims,
            rank_chance,
            beta,
            resid,
            sv,
            ch0,
            cn0,
            kap,
            self._cal_h,
            self._cal_n,
        )
        if na == -1:  # a late copy needs this iteration's chance table: make it, again
            tab = self._chance()
            na = K.admit_rows(
                *args, tab, True, self._cur_it, act, counts, price, *victims, rank_chance, beta,
                resid, sv, ch0, cn0, kap, self._cal_h, self._cal_n,
            )  # fmt: skip
        if na < 0:
            return False
        # orders at the map's p, or with rank_chance the chances the kernel put there
        if type(self).prefetch is Policy.prefetch and type(self).cancel is Policy.cancel:
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
            return True
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
        return True

    def _kernel_victims(
        self, devs: Sequence[int], avail: np.ndarray, per_dev: np.ndarray
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
        from policies.fmoe_victim import VICTIMS_PRICED

        self._victims_reset()
        nd = self._n_dev
        vfree = np.zeros(nd, np.int64)
        v_len = np.zeros(nd, np.int64)
        v_loaded = np.zeros(nd, np.bool_)
        v_e = np.zeros((nd, VICTIMS_PRICED))
        caches = self.ctx.caches
        for dev in devs:
            free = caches[dev].free
            if free >= per_dev[dev]:  # never reaches a victim: skip scoring them
                self._vfree[dev], self._vq[dev] = free, []
                vfree[dev], v_loaded[dev] = free, True
                continue
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
