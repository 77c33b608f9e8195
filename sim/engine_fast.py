"""The engine's compiled path: an iteration's layer steps in one numba call.

For the common case, a policy that only evicts (lru, lfu, no-offload:
``Policy.kernel_eviction``)
on links that carry one copy at a time, the per-layer-step work (demands, evictions,
copies, compute timelines, waiting for loads) runs in :func:`sim.fastkernel.iteration`
on arrays that mirror the caches and links. Arrivals, batching and iteration set-up stay
in Python and simpy, as in :mod:`sim.engine`; the kernel returns wherever the engine
would yield to simpy, and resumes after. Results are identical to the Python engine's
(the reference): same floats in the same order. After the run the arrays are written
back into the :class:`~policies.cache.ExpertCache` and :class:`~sim.link.Link` objects,
so metrics read them as always. An iteration with waves on a machine of several GPUs
runs on the Python engine (the arrays written back before it and reloaded after).

Which engine runs: the environment variable ``FMOE_SIM_ENGINE``: ``python`` (the
reference engine always: for debugging), ``compiled`` (the compiled path whenever the
run qualifies), ``auto`` (default: compiled when the run qualifies and is large enough
to repay loading numba, ``AUTO_MIN_STEPS`` layer steps). :func:`why_not_compiled`
names the first reason a run does not qualify.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.base import Policy
from policies.cache import CacheEntry, ExpertCache, ExpertState
from specs.errors import InputError

if TYPE_CHECKING:
    from sim.engine import Engine
    from sim.engine_prefetch import PrefetchPath
    from sim.links import Links

ENGINE_ENV = "FMOE_SIM_ENGINE"
ENGINES = ("auto", "compiled", "python")
# below about this many layer steps, loading numba and the kernel (~0.5 s per process,
# measured) costs more than the Python engine takes (~10 us a step) for the whole run
AUTO_MIN_STEPS = 50_000
# hooks a compiled run's policy must leave to Policy (on_expert_used: unless its
# KernelEviction's counts stand for it)
_HOOKS = (
    "on_request_arrival",
    "on_iteration_start",
    "on_gate_now",
    "on_gate",
    "on_load_finished",
    "on_iteration_end",
    "decide_prefetch",
    "miss_action",
)


def engine_choice() -> str:
    """The ``FMOE_SIM_ENGINE`` setting (``auto`` when unset); InputError when unknown."""
    v = os.environ.get(ENGINE_ENV, "auto").strip().lower() or "auto"
    if v not in ENGINES:
        raise InputError(f"{ENGINE_ENV}={v!r}: expected one of {', '.join(ENGINES)}")
    return v


def _overrides(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


def why_not_compiled(eng: Engine) -> str:
    """Why the compiled path cannot run ``eng``'s run ('' when it can)."""
    policy = eng.policy
    if "kernel_eviction" not in type(policy).__dict__:
        return f"policy {policy.name!r} does not define kernel_eviction"
    spec = policy.kernel_eviction()
    if spec is None or spec.kind not in ("recency", "count_then_recency"):
        return f"policy {policy.name!r} has no kernel eviction order"
    for hook in _HOOKS:
        if _overrides(policy, hook):
            return f"policy {policy.name!r} overrides {hook}"
    if _overrides(policy, "on_expert_used") and spec.counts is None:
        return f"policy {policy.name!r} overrides on_expert_used without counts"
    if policy.async_search or policy._enqueue or policy._cancel:
        return "the policy orders prefetches"
    if eng.log is not None:
        return "an event log is recorded"
    if eng.interferes:
        return "copies interfere with compute"
    return why_not_plain_start(eng)


def why_not_plain_start(eng: Engine) -> str:
    """Why ``eng``'s links or caches are not what both compiled paths model ('' when they
    are): links that carry one copy at a time with no host-side cap, plain
    :class:`ExpertCache` caches whose entries start plainly resident."""
    hw = eng.cfg.hardware
    if hw.link.concurrency != 1 or hw.host_bandwidth_cap_Bps is not None:
        return "links carry several copies at once"
    for cache in eng.caches:
        if type(cache) is not ExpertCache:
            return f"cache type {type(cache).__name__}"
        for e in cache.entries.values():
            if e.state is not ExpertState.RESIDENT or e.pins or e.protected or e.by_prefetch:
                return "a cache starts with an entry that is not plainly resident"
    return ""


def use_compiled(eng: Engine, steps_estimate: int) -> bool:
    """Whether ``eng`` runs the compiled path (see the module docstring)."""
    choice = engine_choice()
    if choice == "python":
        return False
    if choice == "auto" and steps_estimate < AUTO_MIN_STEPS:
        return False
    if why_not_compiled(eng):
        from sim.engine_prefetch_rules import by_recency, why_not_prefetch

        # auto: the prefetching path only where the kernel picks victims itself (a
        # recency scorer, or the policy's KernelVictims: fmoe); with a scorer called back
        # it measured slower (mixtral-offloading: docs/simulator.md)
        if choice == "auto" and not by_recency(eng.policy) and eng.policy.kernel_victims() is None:
            return False
        if why_not_prefetch(eng):
            return False
    if choice == "auto":
        try:  # a broken numba install leaves auto on the Python engine, not failing
            import sim.fastkernel  # noqa: F401
        except ImportError:
            return False
    return True


# compiled paths built in this process, by kind ("evict", "prefetch"): for benchmarks
BUILT = {"evict": 0, "prefetch": 0}


def make_fast_path(eng: Engine) -> FastPath | PrefetchPath:
    """The compiled path's state for a run :func:`use_compiled` admitted: the evict-only
    kernel's when the run qualifies for it, else the prefetching one's
    (:mod:`sim.engine_prefetch`)."""
    if not why_not_compiled(eng):
        BUILT["evict"] += 1
        return FastPath(eng)
    from sim.engine_prefetch import PrefetchPath

    BUILT["prefetch"] += 1
    return PrefetchPath(eng)


def write_back_device(eng: Engine, g: int, fk: Any, gi: np.ndarray, gf: np.ndarray) -> None:
    """Device ``g``'s scalars from a compiled path's per-GPU arrays back into its cache
    and link (both compiled paths' export; ``fk`` is the kernel module whose column
    names index ``gi`` / ``gf``)."""
    cache = eng.caches[g]
    cache._n_loading = int(gi[g, fk.G_NLOAD])
    cache._in_order = bool(gi[g, fk.G_INORDER])
    cache._latest = float(gf[g, fk.GF_LATEST])
    link = eng.links.links[g]
    link.busy_s = float(gf[g, fk.GF_BUSYS])
    link._busy_t0 = float(gf[g, fk.GF_BUSYT0])
    link.active = int(gi[g, fk.G_ACTIVE])
    link.bytes_moved = int(gi[g, fk.G_BYTES])
    eng.links.slot_frees[g] = int(gi[g, fk.G_FREES])


def batch_ids(
    fp: FastPath | PrefetchPath, batch: list[Any], slices: list[slice]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An iteration's top-K rows for a compiled path ``fp``: the rows of ``batch`` (its
    requests' slices, in the trace's dtype), each request's first row (n + 1 offsets) and
    a zeroed per-request (demands, hits) array; one request reuses ``fp``'s own arrays."""
    n = len(batch)
    if n == 1:
        return batch[0].req.routing.topk_ids[slices[0]], fp.one_row_off, fp.one_req_out
    ids = np.concatenate([s.req.routing.topk_ids[sl] for s, sl in zip(batch, slices, strict=True)])
    row_off = np.fromiter(
        accumulate((sl.stop - sl.start for sl in slices), initial=0), np.int64, n + 1
    )
    return ids, row_off, np.zeros((n, 2), np.int64)


def add_request_counts(batch: list[Any], req_out: np.ndarray) -> None:
    """Add a kernel's per-request (demands, hits) rows ``req_out`` [B, 2] to the batch's
    requests, in batch order (one row: read and zeroed in place, the common case)."""
    if len(batch) == 1:
        s = batch[0]
        s.demands += int(req_out[0, 0])
        s.hits += int(req_out[0, 1])
        req_out[0] = 0
        return
    for s, (dem, hit) in zip(batch, req_out.tolist(), strict=True):
        s.demands += dem
        s.hits += hit


class FastPath:
    """The arrays of the compiled path for one run, and the links' face the engine's run
    loop and arrivals use (``due``, ``advance``, ``run_calls``)."""

    prefetching = False  # (sim.engine_prefetch.PrefetchPath: True)

    def __init__(self, eng: Engine) -> None:
        from sim import fastkernel as fk

        self.fk = fk
        spec, n = eng.spec, eng.num_gpus
        L, J = spec.num_moe_layers, spec.num_experts
        self.J = J
        caps = [c.capacity for c in eng.caches]
        st = fk.new_state(L * J, n, J, max(caps) + 1)
        self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf, self.q, self.work = st
        isc, fsc, ki, gi = self.isc, self.fsc, self.ki, self.gi
        ev = eng.policy.kernel_eviction()
        assert ev is not None
        if ev.kind == "recency":
            isc[fk.I_EVICT] = fk.EVICT_RECENCY
        else:
            isc[fk.I_EVICT] = fk.EVICT_RUN_USES if ev.run_counts else fk.EVICT_USES
        fsc[fk.F_SCALE] = ev.scale
        if ev.counts is not None:
            counts = ev.counts
            assert counts.dtype == np.int64 and counts.flags.c_contiguous
            self.run_uses = counts.reshape(-1)  # a view: the kernel adds to the policy's array
            isc[fk.I_COUNTS] = 1
        else:
            self.run_uses = np.zeros(1, np.int64)
        isc[fk.I_AFTER] = int(eng.after_loads)
        isc[fk.I_EBYTES] = eng.caches[0].expert_bytes
        isc[fk.I_J] = J
        isc[fk.I_NGPU] = n
        isc[fk.I_GATESEQ] = eng.gate_seq
        fsc[fk.F_BW] = eng.links.links[0].bw
        fsc[fk.F_LAT] = eng.links.links[0].lat
        fsc[fk.F_STALL] = eng.stall_s
        ki[:, fk.K_DEV] = np.asarray(eng.dev_table, dtype=np.int64).reshape(-1)
        for g, cache in enumerate(eng.caches):
            gi[g, fk.G_CAP] = cache.capacity
        self.import_state(eng)
        # the plan of decoder layers: (MoE layer index or -1, hand-off before it)
        self.plan = np.array([(m, int(h)) for m, h, _ in eng.plan], dtype=np.int64)
        self.et = np.zeros(1, np.float64)  # expert compute time by rows, grown on demand
        self.timing = eng.timing
        # what the per-iteration driver reads, as attributes (no module lookups)
        self.kernel = fk.iteration
        self.state = (self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf, self.q, self.work)
        self.F_T, self.F_NXT, self.I_PHASE, self.PH_HEAD = fk.F_T, fk.F_NXT, fk.I_PHASE, fk.PH_HEAD
        self.YIELD_T, self.WAIT, self.YIELD_TO, self.NO_LINK = (
            fk.YIELD_T,
            fk.WAIT,
            fk.YIELD_TO,
            fk.NO_LINK,
        )
        self.F_NOW, self.F_TO = fk.F_NOW, fk.F_TO
        self.num_gpus = n
        assert (fk.F_HAND, fk.F_EXCH, fk.F_OVER, fk.F_HEAD) == tuple(
            range(fk.F_DENSE + 1, fk.F_DENSE + 5)
        )
        self.F_ITER = slice(fk.F_DENSE, fk.F_DENSE + 5)
        self.one_row_off = np.zeros(2, np.int64)
        self.one_req_out = np.zeros((1, 2), np.int64)
        self._per_rows: dict[tuple[int, int], tuple[float, float, float, float]] = {}
        self._eng = eng
        self.python: Links | None = None  # set while the Python engine runs an iteration
        self.min_cap = min(caps)
        self.top_k = spec.top_k
        self.wave_counts = np.zeros(n, np.int64)
        self.python_iterations = 0
        self._warm_up()

    def needs_waves(self, ids: np.ndarray, rows: int) -> bool:
        """Whether a layer of this iteration routes more distinct experts to a GPU than its
        cache holds (see :func:`sim.fastkernel.needs_waves`)."""
        if rows * self.top_k <= self.min_cap:
            return False
        return bool(self.fk.needs_waves(ids, self.ki, self.gi, self.wave_counts, self.J))

    def per_rows(self, rows: int, batch: int) -> tuple[float, float, float, float]:
        """(hand-off, exchange, executor overhead, head) times of an iteration of ``rows``
        rows and ``batch`` requests, as the Python engine computes them (memoised)."""
        key = (rows, batch)
        v = self._per_rows.get(key)
        if v is None:
            eng = self._eng
            timing = eng.timing
            v = self._per_rows[key] = (
                timing.handoff(rows) if eng.num_gpus > 1 else 0.0,
                timing.exchange(rows),
                eng.compute_model.layer_overhead(eng.policy.name, rows),
                timing.head(batch),
            )
        return v

    def _warm_up(self) -> None:
        """Load (or compile) the kernels now, not inside the timed event loop: an empty
        plan runs no layer and leaves the state as it was."""
        fk = self.fk
        nxt, t = self.fsc[fk.F_NXT], self.fsc[fk.F_T]
        self.fsc[fk.F_NXT] = np.inf
        fk.iteration(
            self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf, self.q, self.work,
            np.zeros((1, 1, 1), np.int64), np.zeros(2, np.int64), self.et,
            np.zeros((0, 2), np.int64), np.zeros((1, 2), np.int64), self.run_uses,
        )  # fmt: skip
        self.fsc[fk.F_NXT], self.fsc[fk.F_T] = nxt, t
        self.advance(-np.inf)
        _ = self.due
        fk.needs_waves(np.zeros((1, 1, 1), np.int64), self.ki, self.gi, self.wave_counts, self.J)

    _COUNTERS = (
        ("demands", "G_DEMANDS"),
        ("hits", "G_HITS"),
        ("misses", "G_MISSES"),
        ("loads", "G_LOADS"),
        ("demand_loads", "G_DLOADS"),
        ("evictions", "G_EVICTIONS"),
        ("bytes_loaded", "G_BYTESLOADED"),
    )

    # -- the links' face ----------------------------------------------------------------
    @property
    def due(self) -> float:
        if self.python is not None:
            return self.python.due
        return float(self.fsc[self.fk.F_DUE])  # the kernels keep it current

    def advance(self, t: float) -> None:
        if self.python is not None:  # an iteration on the Python engine: its links
            self.python.advance(t)
            return
        fk = self.fk
        fk.advance(self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf, self.q, float(t))

    def run_calls(self) -> None:
        """No timed calls on this path (no policy orders)."""

    # -- per iteration ------------------------------------------------------------------
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

    # -- to and from the Python objects ---------------------------------------------------
    def import_state(self, eng: Engine) -> None:
        """Load the caches, links and engine counters into the arrays (at the start, and
        after an iteration the Python engine ran). The links must be idle, as they are
        between iterations on this path (every layer step waits for its loads)."""
        fk, J = self.fk, self.J
        isc, fsc, ki, kf, gi, gf = self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf
        ki[:, fk.K_STATE] = fk.ABSENT
        ki[:, fk.K_PINS] = 0
        gi[:, fk.G_HEAD] = gi[:, fk.G_TAIL] = -1
        gi[:, fk.G_COUNT] = gi[:, fk.G_NLOAD] = 0
        for g, cache in enumerate(eng.caches):
            link = eng.links.links[g]
            if link.active or link.demand_q or link.queued:
                raise RuntimeError(f"link {g} is not idle between iterations")
            gi[g, fk.G_INORDER] = int(cache._in_order)
            gf[g, fk.GF_LATEST] = cache._latest
            for name, col in self._COUNTERS:
                gi[g, getattr(fk, col)] = getattr(cache.counters, name)
            for key, e in cache._recency.items():  # recency order, oldest first
                k = key[0] * J + key[1]
                ki[k, fk.K_STATE] = fk.RESIDENT
                ki[k, fk.K_USES] = e.uses
                kf[k, fk.KF_LAST], kf[k, fk.KF_LOADED] = e.last_used, e.loaded_at
                fk._append(ki, gi, k)
                gi[g, fk.G_COUNT] += 1
            gf[g, fk.GF_BUSYS] = link.busy_s
            gf[g, fk.GF_BUSYT0] = link._busy_t0
            gi[g, fk.G_ACTIVE] = 0
            gi[g, fk.G_BYTES] = link.bytes_moved
            gi[g, fk.G_FREES] = eng.links.slot_frees[g]
        isc[fk.I_GATESEQ] = eng.gate_seq
        isc[fk.I_STEPS] = eng.layer_steps
        fsc[fk.F_STALL] = eng.stall_s
        fsc[fk.F_DUE] = np.inf

    def export(self, eng: Engine) -> None:
        """Write the arrays back into the caches, links and engine counters (after the
        run, and before an iteration the Python engine runs)."""
        fk, J = self.fk, self.J
        isc, fsc, ki, kf, gi, gf = self.isc, self.fsc, self.ki, self.kf, self.gi, self.gf
        states = {fk.LOADING: ExpertState.LOADING, fk.RESIDENT: ExpertState.RESIDENT}
        for g, cache in enumerate(eng.caches):
            c = cache.counters
            for name, col in self._COUNTERS:
                setattr(c, name, int(gi[g, getattr(fk, col)]))
            entries: dict = {}
            k = int(gi[g, fk.G_HEAD])
            while k >= 0:
                key = eng.key_table[k // J][k % J]
                entries[key] = CacheEntry(
                    key,
                    states[int(ki[k, fk.K_STATE])],
                    float(kf[k, fk.KF_LOADED]),
                    float(kf[k, fk.KF_LAST]),
                    int(ki[k, fk.K_USES]),
                    int(ki[k, fk.K_PINS]),
                )
                k = int(ki[k, fk.K_NEXT])
            cache.entries.clear()
            cache.entries.update(entries)
            cache._recency.clear()
            cache._recency.update(entries)
            cache._cands = {  # nothing is protected on this path
                k: e for k, e in entries.items() if e.state is ExpertState.RESIDENT and not e.pins
            }
            write_back_device(eng, g, fk, gi, gf)
        eng.gate_seq = int(isc[fk.I_GATESEQ])
        eng.links.stamp = eng.gate_seq
        eng.layer_steps = int(isc[fk.I_STEPS])
        eng.stall_s = float(fsc[fk.F_STALL])


Proc = Generator[Any, Any, Any]


class FastSteps:
    """The engine's compiled iteration (a mixin of :class:`sim.engine.Engine`)."""

    _fast: FastPath | PrefetchPath | None

    def _iteration_fast(self: Engine, t: float) -> Proc:  # type: ignore[misc]
        """:meth:`sim.engine.Engine._iteration` for a run on the compiled path (the same
        steps: this sets up the iteration, the kernel runs its layers)."""
        fp = self._fast
        assert fp is not None
        if fp.prefetching:  # a prefetching policy's run (sim.engine_prefetch)
            from sim.engine_prefetch_step import iteration_prefetch

            return (yield from iteration_prefetch(self, fp, t))  # type: ignore[arg-type]
        env = self.env
        batch = self.running
        slices, rows, context = self._batch_rows(batch)
        n = len(batch)
        ids, row_off, req_out = batch_ids(fp, batch, slices)
        if ids.dtype != np.int64:
            ids = ids.astype(np.int64)
        if fp.num_gpus > 1 and fp.needs_waves(ids, rows):  # waves on one of several GPUs:
            # this iteration on the Python engine (wave processes interleave on simpy's clock)
            fp.export(self)
            fp.python = self.links
            fp.python_iterations += 1
            t = yield from self._iteration(t)
            fp.python = None
            fp.import_state(self)
            return t
        self.iterations += 1
        fsc = fp.fsc
        # F_DENSE, F_HAND, F_EXCH, F_OVER, F_HEAD in one assignment
        fsc[fp.F_ITER] = (self.timing.dense(rows, context), *fp.per_rows(rows, n))
        fsc[fp.F_T] = t
        fsc[fp.F_NXT] = env.peek()
        fsc[fp.F_NOW] = env.now
        fp.isc[fp.I_PHASE] = fp.PH_HEAD
        kernel, state, plan, run_uses = fp.kernel, fp.state, fp.plan, fp.run_uses
        et = fp.et if fp.et.shape[0] > rows else fp.expert_times(rows)
        while True:
            code = kernel(*state, ids, row_off, et, plan, req_out, run_uses)
            if code == 0:  # DONE
                break
            if code == fp.YIELD_T:  # an arrival at or before the engine's next action
                t = float(fsc[fp.F_T])
                yield env.timeout(t - env.now)
                fsc[fp.F_T] = max(t, env.now)
            elif code == fp.WAIT:  # an arrival before the next link event
                yield env.timeout(max(float(fsc[fp.F_NXT]) - env.now, 0.0))
            elif code == fp.YIELD_TO:  # a wave steps simpy's clock (LayerSteps._waves)
                yield env.timeout(float(fsc[fp.F_TO]) - env.now)
            elif code == fp.NO_LINK:
                raise RuntimeError("waiting for loads that no link carries")
            else:
                raise RuntimeError("the compiled path met a state only the Python engine handles")
            fsc[fp.F_NXT] = env.peek()
            fsc[fp.F_NOW] = env.now
        t = float(fsc[fp.F_T])
        add_request_counts(batch, req_out)
        self._finish_iteration(batch, t)
        return t
