"""The inference engine process: batches, iterations, layers, expert compute per GPU.

Per iteration: the policy sees ``on_iteration_start``; the head (embedding + LM head)
runs; then every decoder layer in order: its dense part (attention, norms, gate, shared
experts; a dense decoder layer costs only this), a pipeline hand-off when the layer is on
the next GPU, and for an MoE layer the executor's overhead (``compute.layer_overhead``,
calibrated; 0 in published profiles) and then, for MoE layer l:

1. the gate: ``on_gate(l)`` (orders of an ``async_search`` policy from this hook are
   enqueued ``gate_search_s`` of the iteration's rows later, from ``on_iteration_start``
   ``start_search_s`` of its rows later; both ``policy_search_s`` unless calibrated);
2. demands: per GPU, each distinct expert routed there is demanded (a hit iff resident)
   and pinned; a miss is a demand load (a LOADING key is promoted to one), which goes
   before every prefetch and preempts one at its next chunk boundary;
3. compute: each GPU runs its resident experts, then the loaded ones in the order they
   land (``expert_time_s`` of the rows routed to each; with the calibrated
   ``experts_wait_for_loads``, all of them once the last lands, as the real executor's
   one fused call does), the GPUs in parallel; the layer
   ends when the last GPU finishes, plus the expert-parallel activation exchange when
   there are several GPUs. When a GPU's cache cannot hold the layer's experts at once,
   that GPU runs them in waves (compute, release, load the next ones);
4. at the layer end the experts are used and unpinned, predicted-but-unused prefetches
   of l lose their protection, and the policy sees ``on_expert_used`` per expert.

The policy's ``decide_prefetch`` is drained after every observe call (the call is
skipped when the policy keeps the base implementation and has queued nothing: the
result would be empty); orders issued in ``on_gate`` are applied after that layer's
demand loads are queued, so demand loads go first.

Clock: the engine keeps its own time ``t`` >= ``env.now`` and only yields to simpy when a
simpy event (an arrival) lies at or before its next action. Link events (copies
landing) and delayed orders (:meth:`sim.links.Links.call_at`) are not simpy events:
before each action the engine runs the links' own time-ordered queue up to ``t``
(:meth:`sim.links.Links.advance`), and while it waits for a load it runs that queue
forward itself. Between two such points nothing else can happen,
so acting at ``t`` directly is the same as scheduling a timeout to it, without the cost.
Wave processes (a cache smaller than a layer needs) wait on simpy's clock instead, since
several may run side by side.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import numpy as np
import simpy

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationGates,
    IterationStart,
    Policy,
    PrefetchDecision,
    RequestArrival,
    validate_order,
)
from policies.cache import ExpertCache, ExpertKey, ExpertState
from policies.placement import Placement
from sim.batching import make_batcher
from sim.config import SimConfig
from sim.events import EventLog
from sim.iteration import Iteration, RequestState, build_iteration, stack_field
from sim.links import Link, Links
from sim.timing import Timing
from specs.model_spec import ModelSpec
from traces.types import Workload

Proc = Generator[simpy.Event, Any, Any]
# states as globals: ExpertState.X costs an enum class lookup (~80 ns) per read
_LOADING, _RESIDENT = ExpertState.LOADING, ExpertState.RESIDENT


class _GpuPlan:
    """One GPU's experts of an MoE layer that were not resident at demand.

    One per GPU, reused by every layer step: :meth:`Engine._demand` resets it at the GPU's
    first miss of a layer step (new plans per step, the dict finding them and a hit/miss
    dict cost ~6% of an lru layer step). ``comp`` is set by the engine before each use;
    ``defer`` needs no reset: a layer step ends only once its waves took all of it."""

    __slots__ = ("g", "cache", "link", "stamp", "comp", "load", "pend", "defer", "work")

    def __init__(self, g: int, cache: ExpertCache, link: Link):
        self.g, self.cache, self.link = g, cache, link
        self.stamp = -1  # the gate sequence number of the layer step it was last reset for
        self.comp = 0.0  # compute time of the GPU's experts resident at demand
        self.load = 0.0  # compute time of the others
        self.pend: list[tuple[ExpertKey, float]] = []  # loading (pinned): (key, compute time)
        self.defer: list[tuple[ExpertKey, float]] = []  # no slot yet: later waves
        self.work = 0.0  # its compute time in the last timeline (with copy interference)


def _landed(pending: list[tuple[dict, ExpertKey]]) -> bool:
    """True when every (cache entries, key) pair is resident."""
    resident = _RESIDENT
    return all(entries[k].state is resident for entries, k in pending)


def _layer_views(a: np.ndarray | None) -> list[np.ndarray] | None:
    """``a[:, layer]`` of every layer of a [B, L, ...] array (views), None for None."""
    return None if a is None else list(a.swapaxes(0, 1))


def _overrides(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


class Engine:
    """Runs a workload through batches and iterations on simpy's clock (see module doc)."""

    def __init__(
        self,
        env: simpy.Environment,
        cfg: SimConfig,
        workload: Workload,
        policy: Policy,
        caches: list[ExpertCache],
        links: Links,
        placement: Placement,
        timing: Timing,
        closed_loop: bool,
        log: EventLog | None = None,
    ) -> None:
        self.env, self.cfg, self.policy = env, cfg, policy
        self.spec: ModelSpec = cfg.model
        self.caches, self.links, self.timing, self.log = caches, links, timing, log
        self.states = [RequestState(r, i) for i, r in enumerate(workload.requests)]
        self.closed = closed_loop
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.more_coming = True
        self._arrived: simpy.Event | None = None
        self.batcher = make_batcher(cfg.batching, cfg.batch_size)
        self.iterations = 0
        self.layer_steps = 0
        self.stall_s = 0.0
        self.end_s = 0.0
        self.gate_seq = 0
        self.delayed_orders = 0
        self.search_s = cfg.hardware.compute.policy_search_s if policy.async_search else 0.0
        # executor time per MoE layer step besides compute (0 unless calibrated)
        self.compute_model = cfg.hardware.compute
        self.after_loads = cfg.hardware.compute.experts_wait_for_loads
        # compute on a GPU runs this many times as long while its host link carries a copy
        # (measured by calibrate bench; an emulated link shares the CPU's cores and memory)
        self.interference = cfg.hardware.compute.copy_interference
        self.interferes = self.interference != 1.0
        self._plain_decide = not _overrides(policy, "decide_prefetch")
        self._h_arrival = _overrides(policy, "on_request_arrival")
        self._h_start = _overrides(policy, "on_iteration_start")
        self._h_gate = _overrides(policy, "on_gate")
        self._h_used = _overrides(policy, "on_expert_used")
        self._h_end = _overrides(policy, "on_iteration_end")
        self._pass_gates = policy.precomputes_from_gates and self._h_gate
        if _overrides(policy, "on_load_finished"):
            links.on_load = self._on_load
        self.has_probs = workload.has_gate_probs
        self.has_look = workload.has_lookahead
        self.has_emb = workload.has_embeddings
        spec, n = self.spec, cfg.hardware.num_gpus
        self.num_gpus = n
        # every key (layer, expert) made once: the demand path reads them instead of building
        # a tuple per expert, and the caches' dict lookups then find the very same object
        self.key_table = [
            [(lay, e) for e in range(spec.num_experts)] for lay in range(spec.num_moe_layers)
        ]
        self.plans = [_GpuPlan(g, caches[g], links.links[g]) for g in range(n)]
        # (MoE layers, experts): read per order; num_moe_layers is a property that counts
        self.experts_shape = (spec.num_moe_layers, spec.num_experts)
        self.dev_table = [
            [placement.device_of((lay, e)) for e in range(spec.num_experts)]
            for lay in range(spec.num_moe_layers)
        ]
        dense = set(spec.dense_layers)
        stages = [i * n // spec.num_layers for i in range(spec.num_layers)]
        moe_index = {d: i for i, d in enumerate(spec.moe_layer_ids)}
        # (moe layer index or -1, pipeline hand-off before this decoder layer, stage GPU)
        self.plan = [
            (-1 if i in dense else moe_index[i], i > 0 and stages[i] != stages[i - 1], stages[i])
            for i in range(spec.num_layers)
        ]

    # -- policy plumbing ------------------------------------------------------------------
    def _drain(self, now: float, delayed: bool = False, latency: float | None = None) -> None:
        """Apply the policy's decisions (when ``delayed``, after ``latency``, by default
        ``policy_search_s``: a timed call on the links' clock, after their events up to then)."""
        p = self.policy
        if self._plain_decide and not p._enqueue and not p._cancel:  # nothing to drain
            return
        dec = p.decide_prefetch()
        if not dec:
            return
        stamp = self.links.stamp
        wait = self.search_s if latency is None else latency
        if delayed and wait > 0:
            self.delayed_orders += len(dec.enqueue)
            self.links.call_at(now + wait, partial(self._apply, dec, stamp))
            return
        self._apply(dec, stamp, now)

    def _apply(self, dec: PrefetchDecision, stamp: int, now: float) -> None:
        links = self.links
        for key in dec.cancel:
            links.cancel(key, now)
        (L, J), dev = self.experts_shape, self.dev_table
        finite = math.isfinite
        for order in dec.enqueue:
            lay, e, pri = order  # a NamedTuple: one unpacking, not three attribute reads
            if not (0 <= lay < L and 0 <= e < J and finite(pri)):
                validate_order(order, self.spec)  # raises the one-line InputError
            links.links[dev[lay][e]].enqueue((lay, e), pri, stamp, now)

    def _on_load(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self.policy.on_load_finished(key, by_prefetch, now)
        self._drain(now)

    def _notify_arrival(self, s: RequestState, now: float) -> None:
        if not self._h_arrival:
            return
        req = s.req
        emb = req.prompt_embedding
        if emb is None and req.routing.embeddings is not None:
            emb = req.routing.embeddings[: req.prompt_len].astype(np.float32).mean(axis=0)
        self.policy.on_request_arrival(
            RequestArrival(req.request_id, req.prompt_len, req.prompt_text, emb)
        )
        self._drain(now)

    # -- arrivals and batching --------------------------------------------------------------
    def _wake(self) -> None:
        ev, self._arrived = self._arrived, None
        if ev is not None:
            ev.succeed()

    def arrivals(self) -> Proc:
        """Requests enter the waiting queue at their trace arrival times."""
        env = self.env
        for s in sorted(self.states, key=lambda s: (s.req.arrival_s, s.index)):
            dt = s.req.arrival_s - env.now
            if dt > 0:
                yield env.timeout(dt)
            s.arrival_s = s.req.arrival_s
            self.waiting.append(s)
            self.links.advance(env.now)  # the policy may order prefetches: links first
            self._notify_arrival(s, env.now)
            self._wake()
        self.more_coming = False
        self._wake()

    def run(self) -> Proc:
        """The engine process: admit, iterate, until every request has finished."""
        env, links = self.env, self.links
        t = 0.0
        if self.closed:
            self.waiting.extend(self.states)
            self.more_coming = False
        else:
            env.process(self.arrivals())
        while True:
            if env.peek() <= t:
                yield env.timeout(t - env.now)
                t = max(t, env.now)
            if links.due <= t:
                links.advance(t)
            for _ in range(
                self.batcher.admit(len(self.waiting), len(self.running), self.more_coming)
            ):
                s = self.waiting.popleft()
                s.start_s = t
                if self.closed:
                    s.arrival_s = t
                    self._notify_arrival(s, t)
                self.running.append(s)
            if not self.running:
                if not self.more_coming and not self.waiting:
                    break
                if t > env.now:
                    yield env.timeout(t - env.now)
                self._arrived = env.event()
                yield self._arrived
                t = max(t, env.now)
                continue
            t = yield from self._iteration(t)
        self.end_s = t
        links.run_calls()  # orders of the last searches still start their copies

    # -- one iteration ----------------------------------------------------------------------
    def _iteration_start(
        self, it: Iteration, batch: list[RequestState], t: float, gates: IterationGates | None
    ) -> None:
        ids: list[str] = []
        pos, pre = [], []
        for s, sl in zip(batch, it.slices, strict=True):
            n = sl.stop - sl.start
            ids.extend([s.req.request_id] * n)
            pos.append(np.arange(sl.start, sl.stop))
            pre.append(np.full(n, s.next_iter == 0))
        emb = stack_field(batch, it.slices, "embeddings") if self.has_emb else None
        ev = IterationStart(
            self.iterations, tuple(ids), np.concatenate(pos), np.concatenate(pre), emb, t, gates
        )
        self.policy.on_iteration_start(ev)
        # an iteration start's search (fMoE's semantic search) grows with the rows
        latency = self.compute_model.start_search_s(len(ids)) if self.search_s > 0 else 0.0
        self._drain(t, delayed=True, latency=latency)

    def _iteration(self, t: float) -> Proc:
        env, policy, timing, log = self.env, self.policy, self.timing, self.log
        links = self.links
        # simpy's next event time (arrivals): it changes only while the engine yields, so
        # peek then (peek costs a raised IndexError when simpy's queue is empty, as it
        # mostly is)
        peek = env.peek
        nxt = peek()
        batch = self.running
        it = build_iteration(batch, self.spec.num_experts)
        self.iterations += 1
        rows = it.rows
        dense_t = timing.dense(rows, it.context)
        head_t = timing.head(len(batch))
        hand_t = timing.handoff(rows) if self.num_gpus > 1 else 0.0
        exch_t = timing.exchange(rows)
        over_t = self.compute_model.layer_overhead(policy.name, rows)
        # an async policy's gate search over this iteration's rows
        search_t = self.compute_model.gate_search_s(rows) if self.search_s > 0 else 0.0
        weights = probs = look = None
        ids_l = w_l = probs_l = look_l = None
        if self._h_gate:
            weights = stack_field(batch, it.slices, "topk_weights")
            probs = stack_field(batch, it.slices, "gate_probs") if self.has_probs else None
            look = stack_field(batch, it.slices, "lookahead") if self.has_look else None
            # each layer's rows, a[:, layer], made at once (in C) for the gate outputs
            ids_l, w_l, probs_l, look_l = map(_layer_views, (it.ids, weights, probs, look))
        if self._h_start:
            if nxt <= t:
                yield env.timeout(t - env.now)
                t = max(t, env.now)
                nxt = peek()
            if links.due <= t:
                links.advance(t)
            gates = None
            if self._pass_gates:  # replaying a trace: the policy may do its searches at once
                gates = IterationGates(it.ids, weights, probs)
            self._iteration_start(it, batch, t, gates)
        if self.interferes:
            t, nxt = yield from self._links_at(t, nxt)
            head_t = self._interfered(0, head_t)
        if log is not None:
            log.span("compute", 0, "head", t, t + head_t)
        t += head_t
        h_gate, h_used, all_items = self._h_gate, self._h_used, it.items
        plain = self._plain_decide
        # per-step counters as locals, written back after the last layer (nothing reads
        # them meanwhile; the run always finishes its iterations): ~40 ns less per update
        gate_seq, stall, steps = self.gate_seq, self.stall_s, self.layer_steps
        demand, land_ahead, protected = self._demand, self._land_ahead, links.protected
        interferes = self.interferes
        for moe, hand, stage in self.plan:
            if hand:
                t += hand_t
            layer_t = dense_t
            if interferes:
                t, nxt = yield from self._links_at(t, nxt)
                layer_t = self._interfered(stage, dense_t)
            if log is not None:
                log.span("compute", stage, "dense", t, t + layer_t)
            t += layer_t
            if moe < 0:
                continue
            t += over_t
            layer = moe
            if nxt <= t:
                yield env.timeout(t - env.now)
                t = max(t, env.now)
                nxt = peek()
            if links.due <= t:
                links.advance(t)  # copies up to the gate, before its orders go stale
            gate_seq += 1
            links.stamp = links.last_gate[layer] = gate_seq
            if h_gate:
                assert ids_l is not None and w_l is not None
                policy.on_gate(
                    GateOutput(
                        self.iterations,
                        layer,
                        ids_l[layer],
                        w_l[layer],
                        None if probs_l is None else probs_l[layer],
                        None if look_l is None else look_l[layer],
                        t,
                    )
                )
            items = all_items[layer]
            slow, used, comp, missed = demand(layer, items, t)
            if interferes:  # GPUs without misses compute now; the others once loads land
                waiting = () if slow is None else {p.g for p in slow}
                comp = [c if g in waiting else self._interfered(g, c) for g, c in enumerate(comp)]
            if h_gate:  # after the demand loads: they go first
                self._drain(t, delayed=True, latency=search_t)
            if links.n_suspended:
                for link in links.links:
                    if link.suspended:
                        link.drop_suspended_of_layer(layer)
            if slow is None:  # every expert resident: the GPUs just compute
                t_layer = t + max(comp)
                if log is not None:
                    self._log_compute(used, layer, items, t)
            else:
                ideal = top = max(comp)
                for p in slow:
                    c = p.comp = comp[p.g]
                    c += p.load
                    if c > ideal:  # max(ideal, c)
                        ideal = c
                # the common case, no simpy
                t_layer = land_ahead(slow, t, t + top, nxt) if log is None else None
                if t_layer is None:
                    t_layer, t = yield from self._wait_compute(slow, comp, used, layer, items, t)
                    nxt = peek()
                if interferes:  # compute as the timelines ran it, interference included
                    ideal = max([top] + [p.work for p in slow])
                stall += t_layer - t - ideal
            t = t_layer + exch_t
            if nxt <= t:
                yield env.timeout(t - env.now)
                t = max(t, env.now)
                nxt = peek()
            if links.due <= t:
                links.advance(t)
            for cache, key in used:
                cache.use(key, t, True)  # unpin
            if protected[layer]:
                self._unprotect(layer)
            self._attribute(batch, it, layer, missed)
            if h_used:
                for e, tok in items:
                    policy.on_expert_used((layer, e), tok, t)
                    # _drain's early return, tested here: this runs per expert used
                    if not plain or policy._enqueue or policy._cancel:
                        self._drain(t)
            steps += 1
        self.gate_seq, self.stall_s, self.layer_steps = gate_seq, stall, steps
        if nxt <= t:
            yield env.timeout(t - env.now)
            t = max(t, env.now)
        if links.due <= t:
            links.advance(t)
        for s in batch:
            if s.next_iter == 0:
                s.first_token_s = t
            s.last_token_s = t
            s.next_iter += 1
        self.running = [s for s in batch if not s.done]
        if self._h_end:
            finished = tuple(s.req.request_id for s in batch if s.done)
            policy.on_iteration_end(
                IterationEnd(self.iterations, tuple(s.req.request_id for s in batch), finished, t)
            )
            self._drain(t)
        return t

    # -- one MoE layer ----------------------------------------------------------------------
    def _demand(
        self, layer: int, items: list[tuple[int, int]], t: float
    ) -> tuple[list[_GpuPlan] | None, list[tuple[ExpertCache, ExpertKey]], list[float], list[int]]:
        """Demand and pin every expert the layer routes to; start loading the misses.

        Returns the plans of the GPUs with misses (None when every expert was resident),
        the pinned (cache, key) pairs to release at the layer end, the compute time of the
        resident experts per GPU, and the experts that missed.
        """
        caches, plans = self.caches, self.plans  # pairs: a 4-tuple assignment builds a tuple
        dev, keys = self.dev_table[layer], self.key_table[layer]
        stamp = self.links.stamp  # this layer step's gate sequence number
        et = self.timing._expert
        comp = [0.0] * self.num_gpus
        used: list[tuple[ExpertCache, ExpertKey]] = []
        missed: list[int] = []
        slow: list[_GpuPlan] = []
        absent: list[tuple[_GpuPlan, ExpertKey, float]] = []
        resident, loading = _RESIDENT, _LOADING
        for e, tok in items:
            g = dev[e]
            cache = caches[g]
            key = keys[e]
            ct = et.get(tok)
            if ct is None:
                ct = self.timing.expert(tok)
            state = cache.demand_and_pin(key)  # pinned unless absent
            if state is resident:
                comp[g] += ct
                used.append((cache, key))
                continue
            missed.append(e)
            p = plans[g]
            if p.stamp != stamp:  # the GPU's first miss of this layer step
                p.stamp, p.load, p.pend = stamp, 0.0, []
                slow.append(p)
            p.load += ct
            if state is loading:  # make it a demand load
                p.link.promote(key, t)
                p.pend.append((key, ct))
                used.append((cache, key))
            else:
                absent.append((p, key, ct))
        # misses load only once every cached key of the layer is pinned, so a miss never
        # evicts an expert the same layer is about to use (as the real executor does)
        for p, key, ct in absent:
            if p.link.start_demand(key, t):
                p.pend.append((key, ct))
                used.append((p.cache, key))
            else:
                p.defer.append((key, ct))
        return slow or None, used, comp, missed

    def _timeline(self, p: _GpuPlan, t: float) -> float:
        """When GPU p finishes: ``p.comp`` of resident experts first, then the loaded ones
        as they land (or, with ``experts_wait_for_loads``, everything once the last lands)."""
        scale = 1.0
        if self.interferes:  # as the link stands once the layer's loads have landed
            if p.link.active:
                scale = self.interference
            p.work = (p.comp + sum(ct for _, ct in p.pend)) * scale
        tg = t + p.comp * scale  # x 1.0 is exact
        entries = p.cache.entries
        if self.after_loads and p.pend:  # one fused call over the layer's experts
            start = max(t, max(entries[k].loaded_at for k, _ in p.pend))
            if scale == 1.0:  # (start + comp) + loading: the sum's rounding as without
                end = start + p.comp + sum(ct for _, ct in p.pend)
            else:
                end = start + p.work
            if self.log is not None:
                self.log.span("compute", p.g, f"L{p.pend[0][0][0]}", start, end, wait=start - t)
            return end
        pend = (
            p.pend
            if len(p.pend) < 2
            else sorted(p.pend, key=lambda kc: (entries[kc[0]].loaded_at, kc[0]))
        )
        for key, ct in pend:
            ct *= scale
            ready = entries[key].loaded_at
            start = ready if ready > tg else tg
            if self.log is not None:
                self.log.span(
                    "compute", p.g, f"L{key[0]}E{key[1]}", start, start + ct, wait=start - tg
                )
            tg = start + ct
        return tg

    def _interfered(self, g: int, seconds: float) -> float:
        """``seconds`` of compute on GPU g, longer while its link carries a copy."""
        return seconds * self.interference if self.links.links[g].active else seconds

    def _links_at(self, t: float, nxt: float) -> Generator[Any, Any, tuple[float, float]]:
        """Bring the links up to ``t`` (yielding first to a simpy event at or before it,
        as before every action); returns (t, the next simpy event time)."""
        if nxt <= t:
            yield self.env.timeout(t - self.env.now)
            t = max(t, self.env.now)
            nxt = self.env.peek()
        if self.links.due <= t:
            self.links.advance(t)
        return t, nxt

    def _log_compute(
        self,
        used: list[tuple[ExpertCache, ExpertKey]],
        layer: int,
        items: list[tuple[int, int]],
        t: float,
        skip: set[ExpertKey] | None = None,
    ) -> None:
        """Spans of the experts that were resident at demand, back to back per GPU from t."""
        assert self.log is not None
        tokens = dict(items)
        cursor = [t] * self.num_gpus
        for cache, key in used:
            if skip and key in skip:
                continue
            g = cache.device
            ct = self._interfered(g, self.timing.expert(tokens[key[1]]))
            self.log.span("compute", g, f"L{layer}E{key[1]}", cursor[g], cursor[g] + ct)
            cursor[g] += ct

    def _wait_compute(
        self,
        slow: list[_GpuPlan],
        comp: list[float],
        used: list[tuple[ExpertCache, ExpertKey]],
        layer: int,
        items: list[tuple[int, int]],
        t: float,
    ) -> Proc:
        """Wait for the layer's loads (running waves where needed); returns (layer end, t)."""
        env = self.env
        procs = []
        out: dict[int, float] = {}
        if self.log is not None:  # experts resident at demand run first, from t
            self._log_compute(used, layer, items, t, skip={k for p in slow for k, _ in p.pend})
        if any(p.defer for p in slow):
            if t > env.now:  # waves act on the clock: be at t first
                yield env.timeout(t - env.now)
                t = max(t, env.now)
            waving = {p.g for p in slow if p.defer}
            for p in slow:
                if p.defer:
                    mine = [k for c, k in used if c.device == p.g]
                    procs.append(env.process(self._waves(p, t, out, mine)))
            used[:] = [(c, k) for c, k in used if c.device not in waving]  # waves release their own
        pending = [(p.cache.entries, k) for p in slow if not p.defer for k, _ in p.pend]
        if procs:  # wave processes act on simpy's clock: wait on it too
            yield from self._wait_clocked(lambda: _landed(pending))
        else:
            yield from self._wait_ahead(pending)
        yield from procs
        end = t + max(comp)
        for p in slow:
            tg = out[p.g] if p.g in out else self._timeline(p, t)
            if tg > end:
                end = tg
        return end, t

    def _waves(self, p: _GpuPlan, t: float, out: dict[int, float], mine: list[ExpertKey]) -> Proc:
        """A GPU whose cache cannot hold the layer's experts at once: compute what is pinned,
        release it, load the next experts, repeat. Pinned keys of this GPU are released
        here (the engine skips them at the layer end)."""
        env, cache = self.env, p.cache
        tg = t
        links = self.links
        while True:
            pending = [(cache.entries, k) for k, _ in p.pend]
            yield from self._wait_clocked(lambda: _landed(pending))  # noqa: B023
            tg = self._timeline(p, tg)
            p.comp = 0.0
            if tg > env.now:
                yield env.timeout(tg - env.now)
            now = env.now
            links.advance(now)
            for key in mine:
                cache.use(key, now, unpin=True)
            p.pend, mine = [], []
            while p.defer:
                key, ct = p.defer[0]
                if key in cache.entries:  # a prefetch got there meanwhile
                    cache.pin(key)
                    p.link.promote(key, now)
                elif not p.link.start_demand(key, now):
                    break
                p.defer.pop(0)
                p.pend.append((key, ct))
                mine.append(key)
            if not p.defer and not p.pend:
                break
            if not p.pend:  # every slot holds an in-flight prefetch: wait for one to land
                frees = links.slot_frees
                before = frees[p.g]
                yield from self._wait_clocked(lambda: frees[p.g] != before)  # noqa: B023
            tg = max(tg, env.now)
        out[p.g] = tg

    def _land_ahead(self, slow: list[_GpuPlan], t: float, end: float, nxt: float) -> float | None:
        """Run the link events forward until every loading key of ``slow`` has landed, as
        :meth:`_wait_ahead` does, without a generator, and return when the layer's compute
        ends (``end``: when the GPUs' resident experts are done); None (nothing lost, the
        caller then waits with :meth:`_wait_compute`) when a GPU runs waves or a simpy
        event (the next at ``nxt``) comes before the next link event."""
        links, resident = self.links, _RESIDENT
        for p in slow:
            if p.defer:
                return None
        # link events schedule no simpy event (on_load drains undelayed): nxt stays
        for p in slow:
            entries = p.cache.entries
            for key, _ in p.pend:
                entry = entries[key]
                # often landed already, with an earlier key's events: then skip the call
                if entry.state is not resident and not links.run_until_resident(entry, nxt):
                    return None
        for p in slow:
            tg = self._timeline(p, t)
            if tg > end:
                end = tg
        return end

    def _wait_ahead(self, pending: list[tuple[dict, ExpertKey]]) -> Proc:
        """Run the link events forward until every pending key is resident, without simpy
        events unless one (an arrival) comes first: then yield to it.

        Only for the engine itself, while no wave process runs (nothing else waits on
        the links), so running the links ahead of ``env.now`` is safe."""
        env, links = self.env, self.links
        while not _landed(pending):
            when = links.next_time()
            if when == math.inf:
                raise RuntimeError("waiting for loads that no link carries")
            nxt = env.peek()
            if nxt <= when:
                yield env.timeout(max(nxt - env.now, 0.0))
                continue
            links.advance(when)

    def _wait_clocked(self, done: Callable[[], bool]) -> Proc:
        """Wait until ``done()``, moving simpy's clock to each link event on the way (for
        wave processes, which act at ``env.now`` and may run side by side)."""
        env, links = self.env, self.links
        while not done():
            when = links.next_time()
            if when == math.inf:
                raise RuntimeError("waiting for a link event that no link will produce")
            if when > env.now:
                yield env.timeout(when - env.now)
            links.advance(env.now)

    def _unprotect(self, layer: int) -> None:
        """The layer has passed: its prefetched entries lose their protection."""
        devices = self.links.protected[layer]
        for g in devices:  # any order: each call changes only its own device's cache
            self.caches[g].unprotect_layer(layer)
        devices.clear()

    def _attribute(
        self, batch: list[RequestState], it: Iteration, layer: int, missed: list[int]
    ) -> None:
        """Per-request hits and demands: the distinct experts each request's rows used
        (``missed``: those of the layer that were not resident at demand)."""
        if it.per_request is None:
            s = batch[0]
            n = len(it.items[layer])
            s.demands += n
            s.hits += n - len(missed)
            return
        for s, lists in zip(batch, it.per_request, strict=True):
            experts = lists[layer]
            s.demands += len(experts)
            s.hits += sum(e not in missed for e in experts)
