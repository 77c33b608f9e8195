"""``oracle``: reads the trace's future; prefetches exactly what is needed, in the order
needed, and evicts the expert whose next use is farthest away (Belady).

Simulator and replay only (``reads_future``): the real executor refuses it.

It cannot know the batch order in advance (continuous batching depends on timing), so
it derives the demands to come from what it observes plus the workload's routing of
those requests (given by ``bind_future``):

- ``on_iteration_start`` names the rows (request, token position): their routing gives
  every layer's experts for this iteration. The iterations after it are the same
  requests' next positions (a prefill row's request continues at its prompt length, a
  decode row's at position + 1), one row per request that has tokens left, for up to
  ``horizon_iterations``. Requests not yet in a batch are unknown (never used again).
- The next use of (l, e) is its first step in that sequence, steps being
  (iteration offset k, layer l) -> k L + l, refined to step x J + e because a layer
  demands its experts in ascending id (so its waves go in that order); an expert of the
  running layer that compute has not used yet is needed now. ``eviction_score`` is
  minus the next use.
- Prefetch plan (recomputed when something changed): walk the steps after the running
  layer, up to ``lookahead_layers`` ahead, and the experts of each step in ascending id
  (the replay's demand order). On each device, simulate the cache: a key goes in if a
  slot is free, or if the victim the cache will pick (unpinned resident keys, unprotected
  first, then farthest next use, then key) is used later than the key; otherwise that
  device's plan stops. Orders carry priorities that decrease in step order.

In the timing-free replay this places every layer's first wave before its gate, which no
policy can beat; in the simulator the lookahead hides copy latency as far as the links
allow.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    PrefetchDecision,
)
from policies.cache import CacheEntry, ExpertCache, ExpertKey, ExpertState
from policies.registry import register_policy
from specs.errors import InputError


class OracleOptions(PolicyOptions):
    lookahead_layers: int | None = Field(
        default=None,
        ge=1,
        description="layers ahead it prefetches (default: --prefetch-distance, else L)",
    )
    horizon_iterations: int = Field(
        default=64, ge=1, description="future iterations of the running requests it reads"
    )


@register_policy
class Oracle(Policy):
    name = "oracle"
    description = (
        "reads the trace's future: prefetches exactly what is needed in order, Belady "
        "eviction (simulator only)"
    )
    Options = OracleOptions
    reads_future = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._requests: dict[str, Any] | None = None
        self._future_spec: Any = None

    def bind_future(self, workload: Any) -> None:
        """Remember every request's routing; upcoming demands are derived from it."""
        self._requests = {r.request_id: r for r in workload.requests}
        self._future_spec = workload.spec
        self._check_spec()

    def _check_spec(self) -> None:
        if self.ctx is None or self._future_spec is None:
            return
        a, b = self._future_spec, self.ctx.spec
        if (a.num_moe_layers, a.num_experts) != (b.num_moe_layers, b.num_experts):
            raise InputError(
                f"policy 'oracle': the future workload is for {a.name}, the run is for {b.name}"
            )

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self._check_spec()
        L, J = ctx.spec.num_moe_layers, ctx.spec.num_experts
        H = self.options.horizon_iterations
        self._L, self._J, self._H = L, J, H
        self._window = self.options.lookahead_layers or ctx.prefetch_distance or L
        self._used = np.zeros((H + 1, L, J), dtype=bool)  # [iteration offset, layer, expert]
        self._nu1 = np.full((L, J), np.inf)  # next use from the next iteration on
        self._steps = np.arange(L)
        self._lidx = np.arange(L)[None, :, None]
        self._cur = L  # no iteration yet: everything is "next iteration" (unknown: inf)
        self._used_now: set[ExpertKey] = set()
        self._base = 0  # global step of this iteration's layer 0
        self._iters = 0
        self._pending: dict[ExpertKey, int] = {}  # ordered, not landed -> global need step
        self._need_steps = np.zeros(
            0, dtype=np.int64
        )  # (step, expert) pairs to come, in demand order
        self._need_exps = np.zeros(0, dtype=np.int64)
        self._dirty = False
        self._refused: dict[
            int, tuple[bool, float]
        ] = {}  # device -> (no victim at all, need refused)
        self._plans = 0

    # -- the future ---------------------------------------------------------------------
    def on_iteration_start(self, ev: IterationStart) -> None:
        if self._requests is None:
            raise InputError(
                "policy 'oracle' reads the trace's future: the executor must call "
                "bind_future(workload) "
                "(the simulator and the replay do; the real executor cannot)"
            )
        L, H = self._L, self._H
        used = self._used
        used[:] = False
        rids = np.asarray(ev.request_ids, dtype=object)
        positions = np.asarray(ev.positions, dtype=np.int64)
        for rid in dict.fromkeys(ev.request_ids):
            req = self._requests.get(rid)
            if req is None:
                raise InputError(
                    f"policy 'oracle': request {rid!r} is not in the workload given to bind_future"
                )
            pos = positions[rids == rid]
            topk = req.routing.topk_ids
            used[0][self._lidx, topk[pos].astype(np.int64)] = True
            nxt = int(pos.max()) + 1
            m = min(H, topk.shape[0] - nxt)
            if m > 0:
                fut = topk[nxt : nxt + m].astype(np.int64)
                used[1 : m + 1][np.arange(m)[:, None, None], self._lidx, fut] = True
        later = used[1:]
        anyuse = later.any(axis=0)
        first = later.argmax(axis=0) + 1
        self._nu1 = np.where(anyuse, first * L + self._steps[:, None], np.inf)
        self._need_steps, self._need_exps = np.nonzero(used.reshape(-1, self._J))
        self._cur = -1
        self._used_now = set()
        self._base = self._iters * L
        self._iters += 1
        self._dirty = True

    def _next_use(self, key: ExpertKey) -> float:
        """When ``key`` is demanded next: step x J + expert (a layer demands in ascending id)."""
        layer, e = key
        if (layer > self._cur or (layer == self._cur and key not in self._used_now)) and self._used[
            0, layer, e
        ]:
            return float(layer * self._J + e)
        return float(self._nu1[layer, e] * self._J + e)

    # -- observe ------------------------------------------------------------------------
    def on_gate(self, ev: GateOutput) -> None:
        self._cur = ev.layer
        self._used_now = set()
        self._dirty = True

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        if key[0] == self._cur:
            self._used_now.add(key)
        refused = self._refused.get(self.ctx.placement.device_of(key))
        if refused is not None and (refused[0] or self._next_use(key) > refused[1]):
            self._dirty = True  # unpinned, or now used later than what the plan had to refuse

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self._pending.pop(key, None)
        if not by_prefetch:  # a demand load evicted something the plan may have counted on
            self._dirty = True

    def on_iteration_end(self, ev: IterationEnd) -> None:
        self._cur = self._L
        self._dirty = True

    # -- decide -------------------------------------------------------------------------
    def decide_prefetch(self) -> PrefetchDecision:
        if self._dirty and self._requests is not None:
            self._dirty = False
            self._plan()
        return super().decide_prefetch()

    def _plan(self) -> None:
        """Order what the window needs, device by device, as long as Belady allows."""
        ctx, L, J = self.ctx, self._L, self._J
        self._plans += 1
        now_global = self._base + min(self._cur, L - 1)  # after the last layer nothing new ran
        if self._pending:
            self._pending = {k: s for k, s in self._pending.items() if s > now_global}
        cur = self._cur
        start = min(cur + 1, L)  # after the iteration: from the next one's layer 0
        end = min(start + self._window - 1, (self._H + 1) * L - 1)
        lo, hi = np.searchsorted(self._need_steps, [start, end + 1])
        ndev = ctx.placement.num_devices
        views: dict[int, _DeviceView] = {}
        self._refused = {}
        steps, exps = self._need_steps[lo:hi].tolist(), self._need_exps[lo:hi].tolist()
        for s, e in zip(steps, exps, strict=True):
            key = (s % L, e)
            d = (key[0] * J + e) % ndev
            v = views.get(d)
            if v is None:
                v = views[d] = self._device_view(d)
            if v.stopped or key in v.planned or (key in v.cache.entries and key not in v.evicted):
                continue
            if key[0] == cur and key not in self._used_now and self._used[0, cur, e]:
                continue  # the running layer needs it now: a demand load, not a prefetch
            t = float(s * J + e)
            if v.free > 0:
                v.free -= 1
            else:
                heap = v.victims(self._next_use)
                if not heap or -heap[0][1] <= t:  # nothing evictable, or all needed sooner
                    v.stopped = True
                    self._refused[d] = (not heap, t)
                    if len(self._refused) == ndev:
                        return
                    continue
                victim = heapq.heappop(heap)[2]
                v.planned.discard(victim)
                v.evicted.add(victim)
            v.add(key, t)
            self._pending[key] = self._base + s
            self.prefetch(key[0], e, 1.0 / (1.0 + (s - start) * J + e))

    def _device_view(self, d: int) -> _DeviceView:
        cache = self.ctx.caches[d]
        device_of = self.ctx.placement.device_of
        in_flight = {k for k in self._pending if k not in cache.entries and device_of(k) == d}
        return _DeviceView(cache, cache.capacity - len(cache.entries) - len(in_flight), in_flight)

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: minus the next use (never used again: -inf)."""
        return -self._next_use(entry.key)

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "lookahead_layers": getattr(self, "_window", None),
            "plans": getattr(self, "_plans", 0),
        }


@dataclass
class _DeviceView:
    """What one plan assumes about a device's cache as its orders land in turn."""

    cache: ExpertCache
    free: int
    planned: set[ExpertKey]  # keys ordered by this plan or still in flight
    evicted: set[ExpertKey] = field(default_factory=set)  # cached keys the plan pushes out
    stopped: bool = False
    heap: list | None = None  # (protected, -next use, key) of evictable keys, built when needed
    early: list = field(default_factory=list)  # heap items of keys planned before the heap

    def victims(self, next_use: Any) -> list:
        """The heap of what the cache could evict: resident unpinned keys and planned ones."""
        if self.heap is None:
            self.heap = [
                (1 if ent.protected else 0, -next_use(k), k)
                for k, ent in self.cache.entries.items()
                if ent.state is ExpertState.RESIDENT and ent.pins == 0
            ]
            self.heap.extend(self.early)
            heapq.heapify(self.heap)
        return self.heap

    def add(self, key: ExpertKey, t: float) -> None:
        """``key`` lands (protected, needed at ``t``) and becomes a candidate victim itself."""
        self.planned.add(key)
        if self.heap is None:
            self.early.append((1, -t, key))
        else:
            heapq.heappush(self.heap, (1, -t, key))
