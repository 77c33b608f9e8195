"""fMoE's deadline-aware prefetch admission, as a mixin of :class:`policies.fmoe.FmoePolicy`.

With an executor view (``PolicyContext.executor``) and ``admission="deadline"``, the
orders a hook selects are not sent at once: at the end of the hook every candidate of
the iteration (this hook's and the earlier ones not started yet) is ranked by
p / (l - l_now) and admitted, best first, only when

- the copy is worth its link time. Before its layer runs the link gives prefetches
  (l - l_now) x (layer interval - demand-load time per layer on that link), both
  measured over the previous iteration of the same kind, prompt or decode step (the
  view's ``layer_time_s`` and no demand loads before the first); after the link's queue
  and the better-ranked admitted copies, the part ``done`` of this copy fits in it. A
  copy done in time is admitted. A late one saves ``done`` of a demand load if its expert
  is used (chance q: the eviction table's learned chance for its forecast, or its
  request-frequency cell, for one row; 1 - (1 - q)^R over an iteration's R rows) and, if
  not, its rest ``copy - done`` runs after its layer and delays demand loads by their
  share rho of the link's time; it is admitted when q x done > (1 - q) x (copy - done) x
  rho.
- A copy forecast to start only after its layer has run costs nothing if the forecast
  holds (the link drops an order whose layer has run before it starts): it is queued,
  taking no link time from the copies ranked after it, when one layer step's prefetch
  time done (the forecast's error before it is re-made at the next gate) would pay for
  its unused rest: q x min(avail, copy) > (1 - q) x copy x rho.

At a gate the first of the layer steps before a copy's layer is forecast from the gate's
own demand loads (``forecast="gate"``, policies.fmoe_forecast): the layer waits for the
slowest device's loads and a device's own go first; the queued link time is shifted so
that the mean forecast's first step is that one.

The victim of an admitted copy is the expert the device's next demand load would evict
(the same expected-time-to-next-use order); the copy only evicts it earlier, by the time
to that device's next miss, so no separate victim check is made (one was measured to
reject useful copies where links have slack: docs/fmoe.md).

Admitted orders are (re)sent at their new priority; an order not started that is now
late, or whose layer has run, is cancelled. A rejected copy evicts nothing. Without a
view (or with ``admission="all"``) every selected expert is ordered as the paper does.

Over 450 lines on purpose: the admission pass is one loop whose inlined chances and
costs must read as the admission kernel's (policies.fmoe_admit_jit), side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.base import ExecutorView, Policy, PolicyContext
from policies.cache import ExpertKey, ExpertState
from policies.fmoe_admit import FmoeAdmitKernel
from policies.fmoe_admit_one import FmoeAdmitOne
from policies.fmoe_blocking import FmoeBlocking, gate_crossings
from policies.fmoe_calib import FmoeCalib
from policies.fmoe_cands import CandidateSet
from policies.fmoe_eviction import AGE_BUCKETS, CAL_BINS
from policies.fmoe_finish import FmoeFinish
from policies.fmoe_forecast import FmoeForecast
from policies.fmoe_resarrays import count_demand
from policies.fmoe_residence import FmoeResidence

_LAST_BUCKET = AGE_BUCKETS - 1
_RESIDENT, _LOADING = ExpertState.RESIDENT, ExpertState.LOADING
# from this many candidates a one-row gate ranks and judges them in one kernel call
# (policies.fmoe_admit_jit; below it the call and its arrays cost more than the loop)
_KERNEL_MIN = 2
# the statistics of the admission kernel's counts, in its order (_count_orders' after
# its stale cancellations)
_KERNEL_COUNTS = (
    "orders_rejected_late",
    "orders_queued_none_done",
    "orders_admitted_late",
    "orders_issued",
    "orders_reranked",
    "orders_rejected_value",
    "orders_rejected_blocking",
)
# _admit's candidates still not started, and the stale ones, found in comprehensions
# (False: the loop; tests/test_fmoe_fast_glue.py compares them)
_LIVE_FAST = True


class FmoeDeadline(
    FmoeAdmitOne, FmoeAdmitKernel, FmoeBlocking, FmoeResidence, FmoeFinish, FmoeForecast, FmoeCalib
):
    """Deadline-aware admission and re-ranking of fMoE's prefetch orders."""

    def _setup_deadline(self, ctx: PolicyContext) -> None:
        view = ctx.executor if self.options.admission == "deadline" else None
        self._no_prefetch = self.options.admission == "none"
        self._view: ExecutorView | None = view
        L, J = ctx.spec.num_moe_layers, ctx.spec.num_experts
        self._dev_of = [[ctx.placement.device_of((lay, j)) for j in range(J)] for lay in range(L)]
        self._dev_arr = np.array(self._dev_of, np.int64).reshape(L, J)  # for the kernel
        self._n_dev = len(ctx.caches)
        self._copy_s = view.link_state(0).copy_s if view is not None else 0.0
        self._pending: dict[ExpertKey, float] = {}  # candidates not started: key -> p
        # this hook's new candidates, (layer, j) -> p as arrays (policies.fmoe_cands)
        self._dl_cands = CandidateSet(L, J)
        # the one-call pass's arguments fixed at bind hold this set's arrays: made again
        self._one_k = self._one_av = self._one_sh = None
        self._gate_times: list[float] = []  # gate times of the current iteration
        self._interval: float | None = None  # measured mean gate interval (see _kind)
        self._demand_now = [0] * self._n_dev  # demand loads per device, this iteration
        self._demand_last = [0] * self._n_dev  # ... at its last gate so far
        self._demand_s = [0.0] * self._n_dev  # demand-load seconds per layer step (see _kind)
        self._rows = 1
        # the measurements above are of the last iteration of the current one's kind
        # (prefill or decode): a prompt's layer step routes many rows and demands most of
        # a layer's experts, a decode step one row's top-K, so one kind's pace says
        # nothing about the other's (kind -> (interval, demand seconds per device))
        self._kind = False  # the current iteration has prefill rows
        self._by_kind: dict[bool, tuple[float, list[float], float]] = {}
        self._max_now = 0  # sum over this iteration's gates of the largest device's loads
        self._max_s = 0.0  # mean over gates of the largest device's demand seconds (per kind)
        # head-of-line blocking (blocking="measured", fmoe_blocking): per kind and device
        # [seconds demand loads waited behind a copy, such waits, gates demanding a
        # load there, gates]
        self._blocking = view is not None and self.options.blocking == "measured"
        self._blk: dict[bool, list[list[float]]] = {
            k: [[0.0, 0.0, 0.0, 0.0] for _ in range(self._n_dev)] for k in (False, True)
        }
        self._blk_pend: list[tuple[int, list[ExpertKey], float]] = []
        self._beta = [0.0] * self._n_dev  # wait per crossing of the current kind
        # victim="residence": the unused copies' residence (policies.fmoe_residence)
        self._setup_residence(view is not None and self._victim_resid, L)
        # forecast="gate": the first layer step's link time from this gate's demand loads
        self._gate_fc = view is not None and self.options.forecast == "gate"
        self._gate_dem: tuple[int, list[int]] | None = None
        # saving="finish": an avoided demand load's worth to the layer step (fmoe_finish)
        self._setup_finish(view is not None and self.options.saving == "finish", self._n_dev)
        # candidate_chance="measured": the map candidates' own rate per cell (fmoe_calib)
        cal_on = view is not None and self.options.candidate_chance == "measured"
        self._setup_calib(cal_on, (3 * CAL_BINS, AGE_BUCKETS), L, J)

    # -- measurements ---------------------------------------------------------------------
    def _deadline_iteration_start(self, rows: int, prefill: bool = False) -> None:
        """A new iteration (``prefill``: it has prompt rows): the last one's gate interval
        and demand loads become the estimates of its kind, and the estimates of this
        iteration's kind are the last measured ones of that kind (none yet: the view's
        layer time and no demand loads); the last iteration's candidates are stale
        (cancelled if queued)."""
        self._rows = rows
        if self._blocking:
            self._blocking_resolve()
        if self._res_on:
            self._residence_new_iteration()
        if self._fin_on:
            self._finish_resolve()
        times = self._gate_times
        if len(times) >= 2:
            # the interval spans the first to the last gate: the demand loads of every gate
            # but the last (those land after it, outside the span) over steps - 1 intervals.
            # Counting the last gate's loads too, over all steps, made the link time left
            # to prefetches (interval - demand) too large whenever the last gate demanded
            # fewer than the mean, and the admission started copies as in time exactly
            # then: on a link demand loads keep busy, every copy it judged in time was late
            # (docs/fmoe.md, "Router-only routing")
            spans = len(times) - 1
            last = self._demand_last
            self._by_kind[self._kind] = (
                (times[-1] - times[0]) / spans,
                [
                    (n - k) * self._copy_s / spans
                    for n, k in zip(self._demand_now, last, strict=True)
                ],
                (self._max_now - max(last)) * self._copy_s / spans,
            )
            if self._distance_source == "copy time / layer time" and not self._kind:
                # the distance is a decode step's: a prompt's pace does not set it
                self._interval, self._demand_s, self._max_s = self._by_kind[False]
                self._rederive_distance()
        self._kind = prefill
        self._interval, self._demand_s, self._max_s = self._by_kind.get(
            prefill, (None, [0.0] * self._n_dev, 0.0)
        )
        if self._blocking:
            self._beta = self._blocking_estimates(prefill)
        if self._fin_on:
            self._kap = self._finish_estimates(prefill)
        self._gate_times = []
        self._calib_reset()  # a candidate is judged and counted within its iteration
        self._demand_now = [0] * self._n_dev
        self._demand_last = [0] * self._n_dev
        self._max_now = 0
        for key in self._pending:
            self._cancel_if_queued(key)
            self._stats["orders_cancelled_stale"] += 1
        self._pending = {}

    def _deadline_gate(self, layer: int, ids: Sequence[int], now: float) -> None:
        """Layer ``layer``'s gate ran at ``now`` and chose ``ids``: count its demand loads
        (experts not resident: absent, or a copy still loading)."""
        self._gate_times.append(now)
        if self._cal_on:  # candidate_chance="measured": were the noted candidates used
            self._calib_gate(layer, ids)
        cache_of, dev_of = self._cache_of, self._dev_of
        if not cache_of:
            return
        now_n = [0] * self._n_dev  # this gate's demand loads per device
        blocking = self._blocking
        # blocking="measured": the devices with absent experts (and their keys) and with a
        # copy still loading, found in the same loop (FmoeBlocking._blocking_gate's)
        absent: dict[int, list[ExpertKey]] = {}
        late: set[int] = set()
        one = self._layer_ents[layer]  # the layer's one entries dict, where one cache has it
        ents, devs = self._ents_of[layer], dev_of[layer]
        rows = self._res_rows()
        if rows is not None:  # the executor's arrays: the loop below on the state codes
            count_demand(rows[1], layer, ids, devs, now_n, blocking, absent, late)
        for j in ids if rows is None else ():
            # a demanded copy still loading (a late prefetch, promoted to a demand load)
            # is link time this gate waits for, as a demand load's: counted as one, else
            # its stall lengthens the measured interval and so the link time the rule
            # thinks prefetches have (more late copies admitted, longer stalls: measured
            # on one A100, docs/fmoe.md)
            key = (layer, j)
            e = (ents[j] if one is None else one).get(key)
            if e is None:
                dev = devs[j]
                now_n[dev] += 1
                if blocking:
                    got = absent.get(dev)
                    if got is None:
                        absent[dev] = [key]
                    else:
                        got.append(key)
            elif e.state is not _RESIDENT:
                now_n[devs[j]] += 1
                if blocking and e.state is _LOADING:
                    late.add(devs[j])  # a late prefetch, now this gate's demand load
        for dev, k in enumerate(now_n):
            if k:
                self._demand_now[dev] += k
        self._demand_last = now_n
        self._max_now += max(now_n)
        if self._gate_fc:  # forecast="gate": the first step's link time from these
            self._gate_dem = (layer, now_n)
        if blocking:
            self._blocking_resolve()
            self._blocking_seen(absent, late, now)
        if self._res_on:
            self._residence_gate(layer, ids)
        if self._fin_on:
            self._finish_gate(layer, ids, now)

    def _rho(self, dev: int) -> float:
        """Share of ``dev``'s link time its demand loads took per layer step (last
        iteration; 0 before the first measurement), in [0, 1]."""
        interval = self._interval
        if not interval or interval <= 0:
            return 0.0
        return min(self._demand_s[dev] / interval, 1.0)

    def _avail_per_layer(self, dev: int) -> float:
        view = self._view
        assert view is not None
        interval = self._interval
        if interval is None:
            interval = view.layer_time_s(self._rows)
        return max(interval - self._demand_s[dev], 0.0)

    # -- admission ------------------------------------------------------------------------
    def _candidate(self, layer: int, j: int, p: float) -> None:
        """A selected expert not cached: a candidate for this hook's admission."""
        self._dl_cands.put(layer, j, p)

    def _iteration_chance(self, layer: int, j: int) -> float:
        """The chance that some row of this iteration chooses (layer, j): the learned
        chance q of one row's choice at its layer's visit (:meth:`_candidate_chance`),
        1 - (1 - q)^rows over the iteration's rows (rows choose independently given their
        cell). A prompt of hundreds of rows demands almost every expert of a layer; one
        row's chance would count most of its copies as likely unused."""
        one = self._rows <= 1
        q = (
            self._calib_chance(layer, j)
            if one and self._cal_on
            else self._candidate_chance(layer, j)
        )
        if self._map_marginal and one:
            hn = self._map_only(layer, j)  # a map pick the lookahead passed over
            if hn is not None:
                q = (hn[0] + q) / (hn[1] + 1.0)
        q = q if self._rows <= 1 else 1.0 - (1.0 - q) ** self._rows
        look = self._look_q.get((layer, j))  # lookahead picks' measured chance (over rows)
        return look if look is not None and look > q else q

    def _cancel_if_queued(self, key: ExpertKey) -> None:
        if self._cache_of and key not in self._cache_of[key[0]][key[1]].entries:
            self.cancel(*key)

    def _admit(self, g: int) -> None:
        """Rank every candidate not started by p / (l - g) and send those whose copy is
        worth its link time (module doc); cancel the rest not started. The orders sent are
        followed to their layer (victim="residence", policies.fmoe_residence)."""
        self._res_noted = False  # set where the orders were noted as they were sent
        self._admit_pass(g)
        if self._res_on and self._pending and not self._res_noted:
            self._residence_admitted(self._pending)

    def _admit_pass(self, g: int) -> None:
        """:meth:`_admit`'s ranking and judging."""
        old = self._pending
        dl = self._dl_cands
        if not old and not dl.cnt:
            return  # nothing to rank (what the general path below ends with)
        cache_of, dev_of = self._cache_of, self._dev_of
        if _LIVE_FAST and old and cache_of and type(self).cancel is Policy.cancel:
            # the loop below in comprehensions (Policy.cancel only appends, in call order)
            rows = self._res_rows()
            if rows is not None:  # the executor's arrays: zero is "not started"
                mv = rows[1]
                live = [kp for kp in old.items() if not mv[kp[0]]]
            else:
                ents = self._ents_of
                live = [kp for kp in old.items() if kp[0] not in ents[kp[0][0]][kp[0][1]]]
            gone = [k for k, _ in live if k[0] <= g]  # not started, its layer has run
            if gone:
                self._cancel.extend(gone)
                live = [kp for kp in live if kp[0][0] > g]
            stale = len(gone)
        else:
            live = []
            stale = 0
            for key, p in old.items():
                layer, j = key
                if cache_of and key in cache_of[layer][j].entries:
                    continue  # started (or landed): the link has it
                if layer <= g:
                    self.cancel(layer, j)
                    stale += 1
                    continue
                live.append((key, p))
        # one row: the pass below in one kernel call (policies.fmoe_admit_one), which
        # judges even one candidate (its merge is in the call already), unless
        # _KERNEL_MIN is raised to keep passes in the loop (as tests do)
        one = (
            self._admit_one(g, live, old, 1 if _KERNEL_MIN <= 2 else _KERNEL_MIN)
            if self._rows <= 1
            else None
        )
        if one is None:
            # the candidates: the live pending ones, then this hook's (policies.fmoe_cands)
            lay, jj, pv, was, look_c = dl.take_merged(live, old, g, self._look_q)
            n = lay.shape[0]
            if n and self._cal_on and self._rows <= 1:
                self._calib_note(lay, jj, look_c)  # the map candidates' cells (fmoe_calib)
            kernel = self._rows <= 1 and n >= _KERNEL_MIN
        else:
            left, lay, jj, pv, was, look_c = one
            n = lay.shape[0]
            kernel = left == "kernel"
            if left == "done":
                if stale:
                    self._stats["orders_cancelled_stale"] += stale
                return
        if not n:
            self._pending = {}
            if stale:
                self._stats["orders_cancelled_stale"] += stale
            return
        if kernel and self._admit_kernel(g, lay, jj, pv, was, look_c):
            if stale:
                self._stats["orders_cancelled_stale"] += stale
            return
        cands = dict(zip(zip(lay.tolist(), jj.tolist(), strict=True), pv.tolist(), strict=True))
        if self._rank_chance:  # each candidate's measured chance of use, not its map's p
            cands = {key: self._iteration_chance(*key) for key in cands}
        if len(cands) == 1:  # the common case on coarse models: nothing to sort
            ranked = list(cands.items())
        else:
            ranked = sorted(cands.items(), key=lambda kv: (-kv[1] / (kv[0][0] - g), kv[0]))
        view = self._view
        assert view is not None
        committed = [-1.0] * self._n_dev  # link seconds ahead of the next order (lazy)
        got = [False] * self._n_dev  # committed read (a forecast's shift may make it < 0)
        avail = [-1.0] * self._n_dev
        pending: dict[ExpertKey, float] = {}
        copy = [self._copy_s] * self._n_dev  # one copy's time per link (its view, lazily)
        late_no = late_yes = issued = reranked = none_done = value_no = blocked_no = 0
        # for the late copies' chances and rho, inlined (_iteration_chance, _rho): the
        # chance table is fetched at the first late copy, where _candidate_chance made it
        tab = None
        it, ist, rows, look_q = self._cur_it, self._ist, self._rows, self._look_q
        interval, demand_s = self._interval, self._demand_s
        no_rho = not interval or interval <= 0
        price = self._victim_priced
        resid = self._victim_resid
        marginal = self._map_marginal
        cal_on, cal_h, cal_n = self._cal_on, self._cal_h, self._cal_n
        recall: dict[int, float] = {}  # the lookahead's recall per layer (this pass)
        if price:
            self._victims_reset()
        beta = self._beta if self._blocking else None
        shift = self._first_step_shift(g)
        kap = self._kap  # saving="finish": link-time costs over kappa (1.0: the earlier rule)
        for key, p in ranked:
            layer, j = key
            dev = dev_of[layer][j]
            if not got[dev]:
                got[dev] = True
                link = view.link_state(dev)
                committed[dev] = link.queued_s
                copy[dev] = link.copy_s
                avail[dev] = self._avail_per_layer(dev)
                if shift is not None:
                    committed[dev] += shift[dev]
            was = key in old
            copy_s = copy[dev]
            # the part of the copy done before its layer runs: the prefetch link time
            # until then, after the copies ahead of it (all of it when it lands in time)
            done = min(copy_s, (layer - g) * avail[dev] - committed[dev])
            # its victim's price (victim="priced", policies.fmoe_victim; "residence" with
            # its chance of use q: an unused copy holds the victim's slot longer), else 0
            vc = (
                self._victim_price(
                    dev,
                    committed[dev],
                    copy_s,
                    layer - g,
                    avail[dev],
                    self._iteration_chance(layer, j) if resid else None,
                    int(key in look_q),
                )
                if price
                else 0.0
            )
            # the demand loads it holds up (blocking="measured", policies.fmoe_blocking):
            # beta per gate before its layer it is on the link at, and at its own gate
            # (1 - q) x beta if in flight then; 0 (the earlier rule) without a measurement
            b = 0.0 if beta is None else beta[dev] / kap[dev]
            nb = own = 0
            if b > 0:
                nb, own = gate_crossings(committed[dev], copy_s, avail[dev], layer - g)
            # map_value="marginal": what the lookahead would save of it anyway, at the
            # gate before its layer (FmoeLookahead._look_recall), is not this copy's
            sv = 0.0
            if marginal and layer - g >= 2:
                r = recall.get(layer)
                if r is None:
                    r = recall[layer] = self._look_recall(layer)
                av = avail[dev]
                sv = r * (copy_s if copy_s < av else av)
            if (
                (price or nb)
                and done >= copy_s
                and self._iteration_chance(layer, j) * (copy_s - sv) <= vc + nb * b
            ):
                # in time, but likelier to cost its victim's use (and the demand loads
                # it holds up) than to pay
                value_no += 1
                if not self._iteration_chance(layer, j) * (copy_s - sv) <= vc:
                    blocked_no += 1  # the rule without the hold-up would have sent it
                if was:
                    self.cancel(layer, j)
                continue
            if done < copy_s:
                # late: if used (chance q) it saves the part done; if not, the rest of
                # the copy runs after its layer, delaying demand loads by their share
                # of the link's time (rho). Worth it only when the saving is larger.
                # q = self._iteration_chance(layer, j), inlined
                if tab is None:
                    tab = self._chance()
                age = it - ist.item(0, layer, j)
                row = (
                    ist.item(1, layer, j) if ist.item(2, layer, 0) == it else ist.item(3, layer, j)
                )
                bk = 0 if age <= 1 else min((age - 1).bit_length(), _LAST_BUCKET)
                q = tab.item(row, bk)
                if cal_on and rows <= 1:  # as _iteration_chance (_calib_chance)
                    q = (cal_h.item(row, bk) + q) / (cal_n.item(row, bk) + 1.0)
                if marginal and rows <= 1:  # as _iteration_chance
                    hn = self._map_only(layer, j)
                    if hn is not None:
                        q = (hn[0] + q) / (hn[1] + 1.0)
                if rows > 1:
                    q = 1.0 - (1.0 - q) ** rows
                if look_q:  # lookahead picks' measured chance, where larger
                    look = look_q.get(key)
                    if look is not None and look > q:
                        q = look
                rho = 0.0 if no_rho else min(demand_s[dev] / interval, 1.0)  # self._rho(dev)
                rho = rho / kap[dev]
                av = avail[dev]
                # started up to one step sooner than forecast, a copy that cannot land
                # in a step is on the link at its own gate: unused, that gate waits
                hold = (1.0 - q) * b if b > 0 and av < copy_s else 0.0
                if done <= 0 and q * (min(av, copy_s) - sv) > (1.0 - q) * copy_s * rho + vc + hold:
                    # forecast to start only after its layer has run: then the link drops
                    # it (a stale order) and it costs nothing, so it is queued without
                    # taking link time from the copies ranked after it. It runs only
                    # where the link drains sooner than forecast; the forecast is re-made
                    # at every gate, so it is off by up to one layer step's prefetch time
                    # (avail): worth queuing when that much done beats its unused rest.
                    pending[key] = p
                    self.prefetch(layer, j, p / (layer - g))
                    none_done += 1
                    issued += 1
                    reranked += was
                    continue
                if (
                    done <= 0
                    and b > 0
                    and q * (min(av, copy_s) - sv) > (1.0 - q) * copy_s * rho + vc
                ):
                    blocked_no += 1
                hold = (nb + (1.0 - q) * own) * b if b > 0 else 0.0
                if done <= 0 or q * (done - sv) <= (1.0 - q) * (copy_s - done) * rho + vc + hold:
                    late_no += 1
                    if done > 0 and not q * (done - sv) <= (1.0 - q) * (copy_s - done) * rho + vc:
                        blocked_no += 1
                    if was:
                        self.cancel(layer, j)
                    continue
                late_yes += 1
            if price:
                self._victim_take(dev)
            committed[dev] += copy_s
            pending[key] = p
            self.prefetch(layer, j, p / (layer - g))
            issued += 1
            reranked += was
        self._pending = pending
        self._count_orders(
            late_no, none_done, late_yes, issued, reranked, value_no, blocked_no, stale
        )

    def _count_kernel(self, c: list[int]) -> None:
        """:meth:`_count_orders` of the kernel's seven counts ``c`` (in its order), no
        stale ones: the same additions in the same order."""
        st = self._stats
        for name, n in zip(_KERNEL_COUNTS, c, strict=True):
            if n:
                st[name] += n

    def _count_orders(
        self,
        late_no: int,
        none_done: int,
        late_yes: int,
        issued: int,
        reranked: int,
        value_no: int,
        blocked_no: int = 0,
        stale: int = 0,
    ) -> None:
        """Add one admission pass's counts to the policy's order statistics (counted in
        locals during the pass, added here once; the kernel returns them in this order)."""
        if not (stale or late_no or none_done or late_yes or issued or value_no or blocked_no):
            return
        st = self._stats
        for name, n in (
            ("orders_cancelled_stale", stale),
            ("orders_rejected_late", late_no),
            ("orders_queued_none_done", none_done),
            ("orders_admitted_late", late_yes),
            ("orders_issued", issued),
            ("orders_reranked", reranked),
            ("orders_rejected_value", value_no),
            ("orders_rejected_blocking", blocked_no),
        ):
            if n:
                st[name] += n
