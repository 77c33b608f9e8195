"""Timing-free replay: play a workload through a policy and one ExpertCache per device.

Prefetches land instantly, so the hit rate is an upper bound for what the policy reaches
with real transfer times; tests use the replay to check policies and the cache protocol.

What the replay models (and the simulator does with time):

- Batching: static batches of ``batch_size`` requests in arrival order. A batch's
  requests arrive (``on_request_arrival``) when the batch starts; it runs one prefill
  iteration (all prompt rows of its requests) and then decode iterations (one row per
  unfinished request) until all finish.
- Observe order per iteration: ``on_iteration_start``, then per MoE layer
  ``on_gate_now`` and ``on_gate``,
  the layer's demands, ``on_expert_used`` per expert, and ``on_iteration_end``;
  ``decide_prefetch`` follows every observe call (``on_load_finished`` included).
- Demands: a layer demands its distinct experts in ascending expert id. A device whose
  share of the layer exceeds its capacity runs the layer in waves: a wave demands its
  keys (a miss is a demand load, evicting by ``policy.eviction_scores``), pins them all,
  computes (``cache.use``), unpins, then reports ``on_expert_used`` for each key.
  After the layer, ``cache.unprotect_layer(l)`` lifts the protection of its prefetches.
- Prefetch orders are validated (``validate_order``; a non-existent expert is an
  InputError), applied best priority first, and land at once through ``begin_load`` with
  eviction; an order for a cached key is a no-op, one that finds every slot pinned is
  dropped. An order for an expert the running layer routed to and has not demanded yet
  is late: its gate already ran, so a real copy issued then could not beat the demand
  load. It is applied only after the layer computed (it can serve a later iteration).
- Time is a logical clock that ticks once per event, so recency scores are exact; with no
  time, a policy's ``async_search`` delay does not apply either.

Over 450 lines on purpose: the timing-free replay mirrors the simulator's per-step
protocol in one loop, so the two can be compared line by line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationGates,
    IterationStart,
    Policy,
    PolicyContext,
    PrefetchDecision,
    PrefetchOrder,
    RequestArrival,
    has_gate_now,
    validate_order,
)
from policies.cache import CacheCounters, CacheFullError, ExpertCache, ExpertKey
from policies.placement import Placement
from specs.errors import InputError
from traces.types import Request, Workload


@dataclass
class RequestHits:
    """Distinct (layer, expert) demands of one request per iteration, and how many hit."""

    demands: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / demands; 0.0 for a request with no demands."""
        return self.hits / self.demands if self.demands else 0.0


@dataclass
class ReplayResult:
    """What a replay measured. ``counters`` are CacheCounters summed over devices.

    ``hit_rate`` = hits / demands (0.0 when nothing was demanded); ``prefetch_accuracy``
    = prefetches_timely / prefetches_issued: resident at their first demand (0.0 when no
    prefetch was issued).
    ``decisions`` (when ``record_decisions`` was set) logs, in order, every order as
    ("order", iteration, running layer, layer, expert, priority) and every eviction as
    ("evict", iteration, running layer, layer, expert); the running layer is -1 between
    layers.
    """

    policy: str
    hit_rate: float
    counters: dict[str, int]
    prefetch_accuracy: float
    per_request: dict[str, RequestHits]
    capacities: list[int]
    iterations: int = 0
    layer_steps: int = 0
    extra_waves: int = 0
    prefetches_dropped: int = 0
    prefetches_deferred: int = 0
    wall_s: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    decisions: list[tuple] | None = None

    @property
    def layer_steps_per_s(self) -> float:
        return self.layer_steps / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the decision log is left out)."""
        skip = ("per_request", "decisions")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["layer_steps_per_s"] = self.layer_steps_per_s
        out["per_request"] = {
            rid: {"demands": h.demands, "hits": h.hits, "hit_rate": h.hit_rate}
            for rid, h in self.per_request.items()
        }
        return out


def replay(
    workload: Workload,
    policy: Policy,
    *,
    capacity_experts: int | None = None,
    cache_bytes: int | None = None,
    num_devices: int = 1,
    batch_size: int = 1,
    prefetch_distance: int | None = None,
    seed: int = 0,
    training: Workload | None = None,
    record_decisions: bool = False,
) -> ReplayResult:
    """Play ``workload`` through ``policy`` with instant prefetches; see the module doc.

    The budget is a total over devices, in experts (``capacity_experts``) or bytes
    (``cache_bytes``), split by :meth:`Placement.split_budget`; with neither, every expert
    fits. The policy is bound, then fitted on ``training`` (when given), then given the
    workload's future when it ``reads_future``. Raises InputError for bad arguments, a
    budget below top-K, or an order naming a non-existent expert.
    """
    spec = workload.spec
    workload.validate()
    if training is not None:
        training.validate("training: ")
    if capacity_experts is not None and cache_bytes is not None:
        raise InputError("give the cache budget as capacity_experts or cache_bytes, not both")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if num_devices < 1:
        raise InputError(f"num_devices must be >= 1, got {num_devices}")
    if prefetch_distance is not None and prefetch_distance < 1:
        raise InputError(f"prefetch_distance must be >= 1, got {prefetch_distance}")
    if cache_bytes is not None:
        if cache_bytes < 0:
            raise InputError(f"cache_bytes must be >= 0, got {cache_bytes}")
        capacity_experts = int(cache_bytes // spec.expert_bytes)
    if capacity_experts is None:
        capacity_experts = spec.total_experts
    placement = Placement(spec.num_moe_layers, spec.num_experts, num_devices)
    shares = placement.split_budget(capacity_experts, spec.top_k)
    caches = [ExpertCache(cap, spec.expert_bytes, device=d) for d, cap in enumerate(shares)]
    ctx = PolicyContext(spec, placement, caches, prefetch_distance=prefetch_distance, seed=seed)

    policy.bind(ctx)
    if training is not None:
        policy.fit(training)
    if policy.reads_future:
        policy.bind_future(workload)
    if policy.preload_all:
        for d, cache in enumerate(caches):
            need = placement.experts_on(d)
            if cache.capacity < need:
                raise InputError(
                    f"policy {policy.name!r} keeps every expert resident: device {d} needs {need} "
                    f"slots, the budget gives it {cache.capacity}"
                )
            cache.preload(
                (layer, e)
                for layer in range(spec.num_moe_layers)
                for e in range(spec.num_experts)
                if placement.device_of((layer, e)) == d
            )

    runner = _Replayer(workload, policy, ctx, record_decisions)
    t0 = time.perf_counter()
    runner.run(batch_size)
    wall = time.perf_counter() - t0

    total = CacheCounters()
    for cache in caches:
        total = total.add(cache.counters)
    return ReplayResult(
        policy=policy.name,
        hit_rate=total.hits / total.demands if total.demands else 0.0,
        counters=total.as_dict(),
        prefetch_accuracy=total.prefetches_timely / total.prefetches_issued
        if total.prefetches_issued
        else 0.0,
        per_request=runner.per_request,
        capacities=list(shares),
        iterations=runner.iteration,
        layer_steps=runner.layer_steps,
        extra_waves=runner.extra_waves,
        prefetches_dropped=runner.dropped,
        prefetches_deferred=runner.deferred,
        wall_s=wall,
        metadata=policy.metadata(),
        decisions=runner.log,
    )


class _Replayer:
    """One replay's mutable state; ``run`` drives the whole workload."""

    def __init__(
        self, workload: Workload, policy: Policy, ctx: PolicyContext, record: bool
    ) -> None:
        self.workload = workload
        self.spec = workload.spec
        self.policy = policy
        self.ctx = ctx
        self.caches = ctx.caches
        self.ndev = ctx.placement.num_devices
        self.tick = 0.0
        self.iteration = 0
        self.cur_layer = -1  # layer whose gate ran last in this iteration (-1: none yet)
        self.late: list[PrefetchOrder] = []
        self.awaiting: set[int] = set()  # experts of cur_layer routed but not demanded yet
        self.landed: set[ExpertKey] = set()  # prefetches landed in the current round
        self.layer_steps = 0
        self.extra_waves = 0
        self.dropped = 0
        self.deferred = 0
        self.per_request: dict[str, RequestHits] = {}
        self.log: list[tuple] | None = [] if record else None
        # layers that may hold protected entries, per device: only landed prefetches are protected
        self.protected_layers: list[set[int]] = [set() for _ in self.caches]
        self.caps = [c.capacity for c in self.caches]

    # -- protocol helpers -----------------------------------------------------------
    def now(self) -> float:
        self.tick += 1.0
        return self.tick

    def observe(self, hook: Any, *args: Any) -> None:
        """Call an observe hook as an executor event, then apply what the policy decided."""
        hook(*args)
        if self.landed:
            self.landed = set()
        dec = self.policy.decide_prefetch()
        if dec.enqueue or dec.cancel:
            self.drain(dec)

    def drain(self, decision: PrefetchDecision, replayed: bool = False) -> None:
        """Apply a decision and whatever the policy decides when its prefetches land.

        ``replayed``: the decision holds deferred orders, already validated and logged.
        """
        queue = [decision]
        while queue:
            dec = queue.pop(0)
            for key in dec.cancel:  # loads finish at once, so only a loading key could be cancelled
                cache = self.ctx.cache_of(key)
                if cache.is_loading(key):
                    cache.cancel_load(key)
            for order in sorted(dec.enqueue, key=lambda o: -o.priority):
                if not replayed:
                    validate_order(order, self.spec)
                    if self.log is not None:
                        self.log.append(
                            (
                                "order",
                                self.iteration,
                                self.cur_layer,
                                order.layer,
                                order.expert,
                                order.priority,
                            )
                        )
                if order.layer == self.cur_layer and order.expert in self.awaiting:
                    self.late.append(order)
                    self.deferred += 1
                    continue
                if self.land(order.key):
                    self.policy.on_load_finished(order.key, True, self.tick)
                    nxt = self.policy.decide_prefetch()
                    if nxt:
                        queue.append(nxt)
            replayed = False  # later decisions in the queue are the policy's new ones

    def land(self, key: ExpertKey) -> bool:
        """A prefetch of ``key`` lands now; False when cached already or no slot can be freed."""
        cache = self.ctx.cache_of(key)
        if key in cache.entries or key in self.landed:
            return False
        now = self.now()
        try:
            evicted = cache.begin_load(key, now, prefetch=True, scores=self.policy.eviction_scores)
        except CacheFullError:
            self.dropped += 1
            return False
        cache.finish_load(key, now)
        self.landed.add(key)
        self.protected_layers[cache.device].add(key[0])
        self._log_evictions(evicted)
        return True

    def flush_late(self) -> None:
        """Apply orders deferred during the layer that just computed."""
        self.awaiting.clear()  # every expert of the layer was demanded: nothing is late now
        if self.late:
            orders, self.late = self.late, []
            self.landed = set()
            self.drain(PrefetchDecision(orders), replayed=True)

    def _log_evictions(self, evicted: list[ExpertKey]) -> None:
        if self.log is not None:
            for key in evicted:
                self.log.append(("evict", self.iteration, self.cur_layer, key[0], key[1]))

    # -- the run ----------------------------------------------------------------------
    def run(self, batch_size: int) -> None:
        order = sorted(
            range(len(self.workload.requests)),
            key=lambda i: (self.workload.requests[i].arrival_s, i),
        )
        reqs = [self.workload.requests[i] for i in order]
        for start in range(0, len(reqs), batch_size):
            self.run_batch(reqs[start : start + batch_size])

    def run_batch(self, batch: list[Request]) -> None:
        for req in batch:
            self.per_request[req.request_id] = RequestHits()
            self.observe(self.policy.on_request_arrival, _arrival(req, self.tick))
        for step in range(max(r.num_iterations for r in batch)):
            active = [r for r in batch if step < r.num_iterations]
            self.run_iteration(active, step)

    def run_iteration(self, active: list[Request], step: int) -> None:
        spec = self.spec
        L = spec.num_moe_layers
        slices = [r.iteration_rows(step) for r in active]
        counts = [s.stop - s.start for s in slices]
        row_req = np.repeat(np.arange(len(active)), counts)
        positions = np.concatenate([np.arange(s.start, s.stop) for s in slices])
        ids = np.concatenate(
            [r.routing.topk_ids[s] for r, s in zip(active, slices, strict=True)]
        ).astype(np.int64)
        weights = np.concatenate(
            [r.routing.topk_weights[s] for r, s in zip(active, slices, strict=True)]
        )
        probs = _gather(active, slices, "gate_probs")
        look = _gather(active, slices, "lookahead")
        emb = _gather(active, slices, "embeddings")
        request_ids = tuple(active[i].request_id for i in row_req)
        self.cur_layer = -1
        self.observe(
            self.policy.on_iteration_start,
            IterationStart(
                iteration=self.iteration,
                request_ids=request_ids,
                positions=positions,
                prefill=np.full(positions.size, step == 0),
                embeddings=emb,
                now=self.now(),
                gates=IterationGates(ids, weights, probs)
                if self.policy.precomputes_from_gates
                else None,
            ),
        )
        J = spec.num_experts
        hit = np.zeros((L, J), dtype=bool)
        for layer in range(L):
            gate = GateOutput(
                iteration=self.iteration,
                layer=layer,
                topk_ids=ids[:, layer],
                topk_weights=weights[:, layer],
                probs=None if probs is None else probs[:, layer],
                lookahead=None if look is None else look[:, layer],
                now=self.now(),
            )
            self.run_layer(gate, hit[layer])
        # per request: its distinct (layer, expert) demands and which of them hit
        codes = np.unique(
            ((row_req[:, None, None] * L + np.arange(L)[None, :, None]) * J + ids).ravel()
        )
        owner = codes // (L * J)
        demands = np.bincount(owner, minlength=len(active))
        hits = np.bincount(owner, weights=hit.ravel()[codes % (L * J)], minlength=len(active))
        self.cur_layer = -1  # every layer passed: orders now target the next iteration
        finished = tuple(r.request_id for r in active if step == r.num_iterations - 1)
        for i, r in enumerate(active):
            h = self.per_request[r.request_id]
            h.demands += int(demands[i])
            h.hits += int(hits[i])
        self.observe(
            self.policy.on_iteration_end,
            IterationEnd(
                self.iteration, tuple(r.request_id for r in active), finished, now=self.now()
            ),
        )
        self.iteration += 1

    def run_layer(self, gate: GateOutput, hit: np.ndarray) -> None:
        """Gate, demands in waves, uses; marks ``hit[e]`` for the layer's experts that hit."""
        layer = gate.layer
        J = self.spec.num_experts
        ndev = self.ndev
        tokens = np.bincount(gate.topk_ids.ravel(), minlength=J)
        experts = np.flatnonzero(tokens).tolist()
        counts = tokens.tolist()
        self.cur_layer = layer
        self.awaiting = set(experts)
        self.layer_steps += 1
        if has_gate_now(self.policy):
            self.observe(self.policy.on_gate_now, gate)
        self.observe(self.policy.on_gate, gate)
        if ndev == 1:
            per_dev = [experts]
        else:
            per_dev = [[] for _ in range(ndev)]
            for e in experts:
                per_dev[(layer * J + e) % ndev].append(e)
        caps = self.caps
        waves = max(-(-len(p) // caps[d]) for d, p in enumerate(per_dev))
        if waves > 1:
            self.extra_waves += waves - 1
        policy = self.policy
        for w in range(waves):
            wave: list[tuple[ExpertCache, ExpertKey]] = []
            for d, p in enumerate(per_dev):
                cache = self.caches[d]
                wave.extend((cache, (layer, e)) for e in p[w * caps[d] : (w + 1) * caps[d]])
            for cache, key in wave:
                self.awaiting.discard(key[1])
                if cache.demand(key):
                    hit[key[1]] = True
                    cache.pin(key)
                    continue
                now = self.now()
                evicted = cache.begin_load(key, now, prefetch=False, scores=policy.eviction_scores)
                cache.finish_load(key, now)
                self._log_evictions(evicted)
                cache.pin(key)  # before the policy reacts, so its prefetches cannot evict it
                self.observe(policy.on_load_finished, key, False, now)
            for cache, key in wave:
                cache.use(key, self.now())
            for cache, key in wave:
                cache.unpin(key)
            for _, key in wave:
                self.observe(policy.on_expert_used, key, counts[key[1]], self.now())
        self.flush_late()
        for d, cache in enumerate(self.caches):
            if layer in self.protected_layers[d]:
                cache.unprotect_layer(layer)
                self.protected_layers[d].discard(layer)


def _arrival(req: Request, now: float) -> RequestArrival:
    emb = req.prompt_embedding
    if emb is None and req.routing.embeddings is not None:
        emb = req.routing.embeddings[: req.prompt_len].mean(axis=0)
    return RequestArrival(req.request_id, req.prompt_len, req.prompt_text, emb)


def _gather(active: list[Request], slices: list[slice], attr: str) -> np.ndarray | None:
    """Rows of an optional routing array for the batch; None unless every request has it."""
    arrays = [getattr(r.routing, attr) for r in active]
    if any(a is None for a in arrays):
        return None
    return np.concatenate([a[s] for a, s in zip(arrays, slices, strict=True)])
