"""The compiled engine path for prefetching policies: links, caches and layer steps in
numba (:mod:`sim.fastkernel_prefetch`), the policy's hooks in Python.

A run takes it (``FMOE_SIM_ENGINE``, as :mod:`sim.engine_fast`) when it does not qualify
for the evict-only kernel and :func:`why_not_prefetch` finds nothing against it: the
policy keeps the default ``decide_prefetch``, ``miss_action`` and ``on_load_finished``
(its other hooks run in Python: the kernel returns at each gate, for ``on_gate_now`` and
``on_gate``, unless the policy offers a compiled gate the kernel calls instead
(:mod:`policies.compiled_gate`, :func:`~sim.engine_prefetch_rules.compiled_gate_of`),
and after each layer's experts are used; arrivals, iteration starts and ends are the
engine's own Python); links carry one copy at a time (no host-side cap); no copy
interference, fused expert call, event log or hybrid action; no layer of the workload can
route to a GPU as many experts as its cache holds (a demand could then wait for a slot:
waves); and a scorer with a ``victim_index`` only on caches below ``VICTIM_INDEX_MIN``
slots unless the policy offers ``kernel_victims`` (the cache would call victim_index,
with its own side effects, where the kernel calls the scorer).

Victims: a recency scorer's are the kernel's own, and so are those of a policy's
:class:`~policies.cache_victims.KernelVictims` (fMoE's: the kernel reads the policy's
arrays and calls it back only to make a table where its Python would make it lazily,
:meth:`PrefetchPath._callback`); any other scorer is called back from the kernel (numba
``objmode``) with the candidates as live entries. Delayed orders (an async search's) are
timed calls inside the kernel. What a hook or scorer reads of the caches and of the links
is the Python engine's: each cache's ``entries`` stays its own dict (a policy may hold it
from bind), its members kept in step from the kernel's log of keys entering and leaving
(:meth:`PrefetchPath._flush`, after every kernel call and before every call back), one
:class:`~sim.engine_prefetch_view.LiveEntry` per load whose fields are read from the
arrays, frozen when its key leaves; ``_cands``, ``candidate_arrays()``, ``counters`` and
``ExecutorView.link_state`` are answered from the arrays at the moment of the read
(:mod:`sim.engine_prefetch_view`); the orders a hook makes go back as arrays. After the
run everything is written back into the cache and link objects.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.base import (
    LinkState,
    PrefetchDecision,
    validate_order,
)
from policies.cache import (
    VICTIM_INDEX_MIN,
    CacheEntry,
    _lowest,
)
from policies.cache_victims import (
    KV_CHANCE,
    KV_DIRTY,
    KV_EV,
    KV_G,
    KV_IT,
    KV_ON,
    KV_ROWS,
    KV_TIE,
)
from sim import engine_prefetch_view as V
from sim.engine_fast import FastPath
from sim.engine_prefetch_rules import by_recency, compiled_gate_of, why_not_prefetch

__all__ = ["PrefetchPath", "by_recency", "why_not_prefetch"]

# sim.fastkernel_prefetch's columns read per call on the hot paths (checked equal to the
# kernel's at the path's start: _check_columns)
_G_BUSY, _G_SEG, _G_QH, _G_QN, _GF_START, _GF_END, _K_JREM = 8, 15, 6, 7, 6, 8, 15
_V_NLOG, _ADDED = 7, 1
_new_link_state = tuple.__new__  # LinkState(...) without its __new__'s Python frame

if TYPE_CHECKING:
    from sim.engine import Engine


class PrefetchPath:
    """The kernel's arrays for one run, the links' face the run loop and arrivals use
    (``due``, ``advance``, ``run_calls``), the mirror of the caches for the policy, and
    the per-iteration driver."""

    prefetching = True

    def __init__(self, eng: Engine) -> None:
        from sim import fastkernel_prefetch as fk

        self.fk = fk
        spec, n = eng.spec, eng.num_gpus
        L, J = spec.num_moe_layers, spec.num_experts
        self.J, self.num_gpus = J, n
        caps = [c.capacity for c in eng.caches]
        st = fk.new_state(L * J, L, n, J, max(caps) + 1)
        (
            self.isc,
            self.fsc,
            self.ki,
            self.kf,
            self.gi,
            self.gf,
            self.q,
            self.hf,
            self.hi,
            self.lg,
            self.scratch,
            self.cf,
            self.ci,
            self.bk,
            self.bp,
            self.vs,
            self.work,
        ) = st
        self.ordk = np.zeros(max(64, 2 * J), np.int64)
        self.ordp = np.zeros(max(64, 2 * J), np.float64)
        isc, fsc, ki, gi = self.isc, self.fsc, self.ki, self.gi
        isc[fk.I_EBYTES] = eng.caches[0].expert_bytes
        isc[fk.I_J] = J
        isc[fk.I_NGPU] = n
        isc[fk.I_CHUNK] = eng.links.links[0].chunk
        # the policy's compiled gate, called in the kernel in place of its gate hooks
        cg = compiled_gate_of(eng)
        self.gate: tuple | None = None
        if cg is not None:
            from sim.engine_prefetch_gate import gate_args

            try:
                self.gate = gate_args(cg, fk)
            except ImportError:  # a numba without its dispatcher-to-function conversion
                self.gate = None  # (a private helper): the Python hooks, as before
        isc[fk.I_HOOKGATE] = int(eng._h_gate and self.gate is None)
        isc[fk.I_HOOKUSED] = int(eng._h_used)
        fsc[fk.F_BW] = eng.links.links[0].bw
        fsc[fk.F_LAT] = eng.links.links[0].lat
        ki[:, fk.K_DEV] = np.asarray(eng.dev_table, dtype=np.int64).reshape(-1)
        for g, cache in enumerate(eng.caches):
            gi[g, fk.G_CAP] = cache.capacity
            gi[g, fk.G_INORDER] = int(cache._in_order)
            gf = self.gf
            gf[g, fk.GF_LATEST] = cache._latest
            for i, name in enumerate(V.COUNTERS):
                gi[g, fk.G_C0 + i] = getattr(cache.counters, name)
            for key in cache.entries:  # their dict order
                isc[fk.I_INS] += 1
                ki[key[0] * J + key[1], fk.K_INS] = isc[fk.I_INS]
            for key, e in cache._recency.items():  # plainly resident, oldest first
                k = key[0] * J + key[1]
                ki[k, fk.K_STATE] = fk.RESIDENT
                ki[k, fk.K_USES] = e.uses
                self.kf[k, fk.KF_LAST], self.kf[k, fk.KF_LOADED] = e.last_used, e.loaded_at
                fk._append(ki, gi, k)
                gi[g, fk.G_COUNT] += 1
        isc[fk.I_GATESEQ] = eng.gate_seq
        isc[fk.I_STAMP] = eng.links.stamp
        self.plan = np.array([(m, int(h)) for m, h, _ in eng.plan], dtype=np.int64)
        self.et = np.zeros(1, np.float64)
        self.timing = eng.timing
        self._eng = eng
        self._per_rows: dict[tuple[int, int], tuple[float, float, float, float]] = {}
        self.one_row_off = np.zeros(2, np.int64)
        self.one_req_out = np.zeros((1, 2), np.int64)
        # the policy's victim choice in the kernel, where it offers one (KernelVictims)
        self._kv = eng.policy.kernel_victims() if not by_recency(eng.policy) else None
        if self._kv is not None:
            if self._kv.kind != "expected-time":
                raise ValueError(f"unknown kernel victims {self._kv.kind!r}")
            self.vs = fk.victim_state(self._kv, self.vs[6].shape[0])
            self.vs[0][fk.V_MIN] = VICTIM_INDEX_MIN
            assert (
                fk.V_ON, fk.V_G, fk.V_IT, fk.V_ROWS, fk.V_DIRTY, fk.V_CHANCE, fk.V_EV, fk.VF_TIE
            ) == (KV_ON, KV_G, KV_IT, KV_ROWS, KV_DIRTY, KV_CHANCE, KV_EV, KV_TIE)  # fmt: skip
        self.vi = self.vs[0]
        self.iscm, self.fscm = memoryview(isc), memoryview(self.fsc)  # reads as Python numbers
        # the kernels' compiled entries for this run's argument types (engine_prefetch_step)
        self.entries: dict[Any, Any] = {}
        self.vim = memoryview(self.vi)  # the log's length read as a Python int (_flush)
        self.state = (
            self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf, self.q, self.hf, self.hi,
            self.lg, self.scratch, self.cf, self.ci, self.bk, self.bp, self.vs,
        )  # fmt: skip
        self.keys = eng.key_table
        self.experts_shape = (L, J)
        # the current entry object of each cached key (one per load, as the cache makes)
        self._live: dict[int, V.LiveEntry] = {}
        self._dev_of = ki[:, fk.K_DEV].tolist()
        self._key_of = [key for row in eng.key_table for key in row]  # by key index
        # element reads without numpy scalars (the arrays are never reallocated)
        self.kim, self.kfm, self.gim = memoryview(ki), memoryview(self.kf), memoryview(gi)
        self.gfm, self.qm = memoryview(self.gf), memoryview(self.q)
        self._bw = float(fsc[fk.F_BW])  # the links' bandwidth (fixed for the run)
        self.keybuf = np.zeros(max(caps) + 1, np.int64)
        if not by_recency(eng.policy):  # victims scored by the policy, called back
            isc[fk.I_PYSCORE] = 1
            self._scores = eng.links.scores
        # a policy asking the executor about a link hears the kernel's link
        self._view = getattr(eng.policy.ctx, "executor", None) if eng.policy.ctx else None
        if self._view is not None:
            self._view.link_state = self.link_state  # type: ignore[method-assign]
            self._view.residency = V.residency_of(self)  # type: ignore[method-assign]
        assert (_G_BUSY, _G_SEG, _G_QH, _G_QN, _GF_START, _GF_END, _K_JREM) == (
            fk.G_BUSY, fk.G_SEG, fk.G_QH, fk.G_QN, fk.GF_START, fk.GF_END, fk.K_JREM
        )  # fmt: skip
        assert (_V_NLOG, _ADDED) == (fk.V_NLOG, fk.ADDED)
        # the engine's drains (iteration start and end) apply orders through the kernel
        eng._apply = self.apply  # type: ignore[method-assign]
        # what a hook reads of the caches comes from the arrays until export
        assert (fk.K_STATE, fk.K_PINS, fk.K_USES, fk.K_DEV, fk.K_PROT, fk.K_BYPF, fk.K_PFUSED) == (
            V.K_STATE, V.K_PINS, V.K_USES, V.K_DEV, V.K_PROT, V.K_BYPF, V.K_PFUSED
        )  # fmt: skip
        assert (fk.KF_LAST, fk.KF_LOADED, fk.G_COUNT) == (V.KF_LAST, V.KF_LOADED, V.G_COUNT)
        # the entries dicts stay the caches' own (a policy may hold them from bind): the
        # kernel logs who enters and leaves, applied before any Python reads (_flush)
        self._dicts = [cache.entries for cache in eng.caches]
        self.cand_arrays: list[V.LiveCandidateArrays] = []
        for g, cache in enumerate(eng.caches):
            d = cache.entries
            for key in list(d):
                k = key[0] * J + key[1]
                d[key] = self._live[k] = V.LiveEntry(self, k, key)
            cache.counters = V.live_counters(self, g)
            cands = cache._cands = V.LiveCands(self, g)  # type: ignore[assignment]
            arr = V.LiveCandidateArrays(self, g, cache.capacity + 1, cands)
            self.cand_arrays.append(arr)
            cache.candidate_arrays = arr.refresh  # type: ignore[method-assign]
            # ExpertCache._arr (which fMoE's one-call admission reads) is these arrays,
            # filled at the read when a candidate changed
            cache.__dict__["_live_arr"] = arr
            cache.__class__ = V.LiveCache
        eng.links.call_at = self.call_at  # type: ignore[method-assign]
        # the kernel's call backs, bound once (_enter sets them at every entry)
        self._victim_cb, self._callback_cb = self._victim, self._callback
        self._warm_up()

    def _warm_up(self) -> None:
        """Load (or compile) the kernels now, not inside the timed event loop."""
        fk = self.fk
        nxt, t = self.fsc[fk.F_NXT], self.fsc[fk.F_T]
        self.fsc[fk.F_NXT] = np.inf
        self._enter()
        args = (
            *self.state, self.work, self.ordk, self.ordp, np.zeros((1, 1, 1), np.int64),
            np.zeros(2, np.int64), self.et, np.zeros((0, 2), np.int64), np.zeros((1, 2), np.int64),
        )  # fmt: skip
        if self.gate is None:
            fk.iteration(*args)
        else:
            fk.iteration_gate(*args, *self.gate, np.zeros((0, 0, 0), np.float64))
        self.fsc[fk.F_NXT], self.fsc[fk.F_T] = nxt, t
        fk.apply_orders(*self.state, self.ordk, self.ordp, 0.0)
        self.advance(-np.inf)
        self._eng.caches[0].candidate_arrays()  # its kernel too

    # -- entering and leaving the kernel ----------------------------------------------------
    def _enter(self) -> None:
        """Before each kernel call: the call backs, and what the policy's victim choice
        reads now (each entry: runs of this process may interleave)."""
        fk = self.fk
        fk.VICTIM[0] = self._victim_cb
        fk.CALLBACK[0] = self._callback_cb
        if self._kv is not None:
            self._kv.state(self.vi, self.vs[1])

    def _flush(self) -> None:
        """Apply the kernel's membership log to the caches' entries dicts: a new entry
        object per load (at the dict's end), a removed one frozen with its fields then
        (what the Python cache's dropped entry keeps) when anything still holds it."""
        vim = self.vim
        n = vim[_V_NLOG]
        if not n:
            return
        vim[_V_NLOG] = 0
        mlog = self.vs[6]
        # only the kind and key columns as Python ints (a frozen entry reads its row)
        log = mlog[:n, :2].tolist()
        live, dicts, dev, key_of = self._live, self._dicts, self._dev_of, self._key_of
        kim, kfm = self.kim, self.kfm
        new, cls, getrefcount = object.__new__, V.LiveEntry, sys.getrefcount
        for i, (kind, k) in enumerate(log):
            key = key_of[k]
            if kind == _ADDED:  # LiveEntry(self, k, key), without the call
                e = live[k] = new(cls)
                e._i, e._f, e._k, e.key = kim, kfm, k, key
                dicts[dev[k]][key] = e
                continue
            e = dicts[dev[k]].pop(key)
            del live[k]
            if getrefcount(e) > 2:  # held (e and getrefcount's): frozen as it left
                V.freeze(e, mlog[i].tolist(), self.vs[7][i].tolist())

    def _callback(self, code: int) -> None:
        """The kernel's call back (sim.fastkernel_prefetch.CALLBACK)."""
        self._flush()
        fk = self.fk
        if code == fk.CB_FLUSH:
            return
        kv = self._kv
        assert kv is not None
        if code == fk.CB_CHANCE:
            kv.make_chance()
        elif code == fk.CB_TABLE:
            kv.make_table()
        kv.state(self.vi, self.vs[1])

    # -- the links' face ----------------------------------------------------------------
    @property
    def due(self) -> float:
        return float(self.fsc[self.fk.F_DUE])

    def advance(self, t: float) -> None:
        self._enter()
        self.fk.advance(*self.state, float(t))
        self._flush()

    def run_calls(self) -> None:
        """Links.run_calls: every pending delayed order, in time order with the links."""
        self._enter()
        self.fk.run_calls(*self.state)
        self._flush()

    def call_at(self, when: float, fn: Any) -> None:
        """Links.call_at for the engine's delayed drains (``partial(_apply, dec, stamp)``):
        the orders are queued in the kernel, which applies them at ``when``."""
        dec, stamp = fn.args
        self.add_call(when, dec, stamp)

    def add_call(self, when: float, dec: PrefetchDecision, stamp: int) -> None:
        """Queue ``dec``'s orders (made at gate ``stamp``) to be applied at ``when``."""
        fk, isc = self.fk, self.isc
        self._orders(dec)
        need = int(isc[fk.I_BUFTOP]) + len(dec.cancel) + len(dec.enqueue)
        if need > self.bk.shape[0] or isc[fk.I_NCALL] + 1 > self.cf.shape[0]:
            self._grow_calls(need)
        fk.add_call(
            isc, self.fsc, self.gi, self.gf, self.cf, self.ci, self.bk, self.bp, self.ordk,
            self.ordp, float(when), int(stamp),
        )  # fmt: skip

    def _grow_calls(self, need: int) -> None:
        """Larger call and order buffers (contents kept); the state tuple follows."""
        n = max(2 * self.bk.shape[0], 2 * need)
        self.bk = np.concatenate([self.bk, np.zeros(n - self.bk.shape[0], np.int64)])
        self.bp = np.concatenate([self.bp, np.zeros(n - self.bp.shape[0], np.float64)])
        m = 2 * self.cf.shape[0]
        self.cf = np.concatenate([self.cf, np.zeros(m - self.cf.shape[0], np.float64)])
        self.ci = np.concatenate([self.ci, np.zeros((m - self.ci.shape[0], 5), np.int64)])
        self.state = (*self.state[:11], self.cf, self.ci, self.bk, self.bp, self.vs)

    # -- the policy's view ----------------------------------------------------------------
    def sync(self) -> None:
        """The links' gate stamp, as a hook and its drain read it (the caches' entries and
        counters are read from the arrays, see :class:`LiveEntries`)."""
        self._eng.links.stamp = int(self.isc[self.fk.I_STAMP])

    def entry(self, k: int) -> CacheEntry:
        """The (live) cache entry of key index ``k``."""
        e = self._live.get(k)
        if e is None:
            J = self.J
            e = self._live[k] = V.LiveEntry(self, k, self.keys[k // J][k % J])
        return e

    def _victim(self, g: int, n: int) -> int:
        """The kernel's call back for a victim: the policy's scorer over the candidates in
        scratch[:n], the lowest score going first (ties to the lowest key), as
        ExpertCache._victim."""
        self._flush()  # the scorer may read the caches' entries
        live, entry = self._live, self.entry
        group = [live.get(k) or entry(k) for k in self.scratch[:n].tolist()]
        return _lowest(group, self._scores(group))._k  # type: ignore[attr-defined]

    def link_state(self, device: int) -> LinkState:
        """SimExecutorView.link_state of a one-copy link, from the kernel's arrays (the
        same floating-point operations in the same order)."""
        g = device
        gim, kim = self.gim, self.kim
        now = self._eng.env.now
        bw = self._bw
        left_s = 0.0
        k = gim[g, _G_BUSY]
        if k >= 0:
            gfm = self.gfm
            start = gfm[g, _GF_START]
            if start > now:
                now = start
            seg = gim[g, _G_SEG]
            left_s += max(0.0, gfm[g, _GF_END] - now) + max(0, kim[k, _K_JREM] - seg) / bw
        nq = gim[g, _G_QN]
        if nq:  # (an empty queue adds 0.0 to a sum that is never negative: skipped)
            h, cap, qm = gim[g, _G_QH], self.q.shape[1], self.qm
            left_s += sum(kim[qm[g, (h + i) % cap], _K_JREM] for i in range(nq)) / bw
        view = self._view
        if view.hybrid is not None:
            left_s += view.hybrid.pending_fetches[device] * view._copy_s
        return _new_link_state(LinkState, (left_s / 1, bw, view._copy_s))

    def _orders(self, dec: PrefetchDecision, start: int = 0) -> int:
        """Put ``dec`` into the order arrays from ``start`` (0: the first batch, the
        kernel's isc[I_NCAN]/isc[I_NORD]; else the second, I_NCAN2/I_NORD2 from I_SEG2),
        validated as Engine._apply does; returns the end of what it wrote."""
        fk = self.fk
        nc, ne = len(dec.cancel), len(dec.enqueue)
        if start + nc + ne > self.ordk.shape[0]:
            n = 2 * (start + nc + ne)
            self.ordk = np.concatenate([self.ordk[:start], np.zeros(n - start, np.int64)])
            self.ordp = np.concatenate([self.ordp[:start], np.zeros(n - start, np.float64)])
        L, J = self.experts_shape
        ordk, ordp = self.ordk, self.ordp
        for i, (lay, e) in enumerate(dec.cancel, start):
            ordk[i] = lay * J + e
        spec = self._eng.spec
        i = start + nc
        for order in dec.enqueue:
            lay, e, pri = order
            if not (0 <= lay < L and 0 <= e < J and np.isfinite(pri)):
                validate_order(order, spec)
            ordk[i] = lay * J + e
            ordp[i] = pri
            i += 1
        isc = self.isc
        if start:
            isc[fk.I_NCAN2], isc[fk.I_NORD2], isc[fk.I_SEG2] = nc, ne, start
        else:
            isc[fk.I_NCAN], isc[fk.I_NORD] = nc, ne
        return i

    def apply(self, dec: PrefetchDecision, stamp: int, now: float) -> None:
        """Engine._apply on this path (a drain at an iteration's start or end)."""
        fk = self.fk
        if stamp != self.isc[fk.I_STAMP]:
            raise RuntimeError("orders of an earlier gate on the compiled path")
        self._orders(dec)
        self._enter()
        fk.apply_orders(*self.state, self.ordk, self.ordp, float(now))
        self._flush()

    # -- per iteration ----------------------------------------------------------------------
    def expert_times(self, rows: int) -> np.ndarray:
        """Expert compute time by rows routed to it, 0..``rows`` (Timing.expert's values)."""
        et = self.et
        if et.shape[0] <= rows:
            n = max(rows + 1, 2 * et.shape[0])
            new = np.zeros(n, np.float64)
            new[: et.shape[0]] = et
            for tok in range(max(et.shape[0], 1), n):
                new[tok] = self.timing.expert(tok)
            self.et = et = new
        return et

    per_rows = FastPath.per_rows  # the same memoised per-iteration costs

    def export(self, eng: Engine) -> None:
        """Write the arrays back into the caches, links and engine counters (after the run:
        :func:`sim.engine_prefetch_export.export`)."""
        from sim.engine_prefetch_export import export

        export(self, eng)
