"""The inference engine process: batches, iterations, layers, expert compute per GPU.

Per iteration: the policy sees ``on_iteration_start``; the head (embedding + LM head)
runs; then every decoder layer in order: its dense part (attention, norms, gate, shared
experts; a dense decoder layer costs only this), a pipeline hand-off when the layer is on
the next GPU, and for an MoE layer the executor's overhead (``compute.layer_overhead``,
calibrated; 0 in published profiles) and then, for MoE layer l:

1. the gate: ``on_gate_now(l)`` then ``on_gate(l)`` (orders of an ``async_search``
   policy from ``on_gate`` need its search: they are enqueued ``gate_search_s`` of the
   iteration's rows later, from ``on_iteration_start`` ``start_search_s`` of its rows
   later, both ``policy_search_s`` unless calibrated; orders from ``on_gate_now`` need
   none and are enqueued at once, after the demand loads);
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

import numpy as np

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationGates,
    IterationStart,
)
from sim.engine_fast import FastSteps
from sim.engine_hybrid import HybridSteps
from sim.engine_layer import LayerSteps, Proc
from sim.engine_setup import EngineSetup
from sim.iteration import Iteration, RequestState, batch_rows, build_iteration, stack_field


def _layer_views(a: np.ndarray | None) -> list[np.ndarray] | None:
    """``a[:, layer]`` of every layer of a [B, L, ...] array (views), None for None."""
    return None if a is None else list(a.swapaxes(0, 1))


class Engine(EngineSetup, LayerSteps, HybridSteps, FastSteps):
    """Runs a workload through batches and iterations on simpy's clock (see module doc).

    Built by :class:`~sim.engine_setup.EngineSetup` (per-run state, policy plumbing);
    each MoE layer step's demands and waits are :class:`~sim.engine_layer.LayerSteps`',
    miss actions other than a fetch :class:`~sim.engine_hybrid.HybridSteps`'; runs that
    qualify take the compiled path, :class:`~sim.engine_fast.FastSteps` (same results)."""

    _batch_rows = staticmethod(batch_rows)

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
            self.clock.advance(env.now)  # the policy may order prefetches: links first
            self._notify_arrival(s, env.now)
            self._wake()
        self.more_coming = False
        self._wake()

    def run(self) -> Proc:
        """The engine process: admit, iterate, until every request has finished."""
        env, links = self.env, self.clock
        iteration = self._iteration if self._fast is None else self._iteration_fast
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
            t = yield from iteration(t)
        self.end_s = t
        links.run_calls()  # orders of the last searches still start their copies
        if self._fast is not None:
            self._fast.export(self)

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
        h_now = self._h_gate_now
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
            now_dec = None
            if h_gate:
                assert ids_l is not None and w_l is not None
                gev = GateOutput(
                    self.iterations,
                    layer,
                    ids_l[layer],
                    w_l[layer],
                    None if probs_l is None else probs_l[layer],
                    None if look_l is None else look_l[layer],
                    t,
                )
                if h_now:  # the orders that need no search, kept apart from the search's
                    policy.on_gate_now(gev)
                    if not plain or policy._enqueue or policy._cancel:
                        now_dec = policy.decide_prefetch()
                policy.on_gate(gev)
            items = all_items[layer]
            slow, used, comp, missed = demand(layer, items, t)
            if interferes:  # GPUs without misses compute now; the others once loads land
                waiting = () if slow is None else {p.g for p in slow}
                comp = [c if g in waiting else self._interfered(g, c) for g, c in enumerate(comp)]
            # after the demand loads: they go first (_drain's early return, tested here);
            # on_gate_now's orders at once, on_gate's after the search
            if now_dec:
                self._apply(now_dec, links.stamp, t)
            if h_gate and (not plain or policy._enqueue or policy._cancel):
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
            if self.side:  # CPU tasks or low-bit copies of this layer step
                t_layer = yield from self._side_wait(t, t_layer)
                nxt = peek()
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
        self._finish_iteration(batch, t)
        return t

    def _finish_iteration(self, batch: list[RequestState], t: float) -> None:
        """The batch's tokens are out at ``t``: token times, finished requests leave."""
        policy = self.policy
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
