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
from typing import Any

import numpy as np
from pydantic import Field

from calibration.errors import InputError
from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    PrefetchDecision,
)
from policies.cache import CacheEntry, ExpertKey, ExpertState
from policies.registry import register_policy


class OracleOptions(PolicyOptions):
    lookahead_layers: int | None = Field(
        default=None,
        ge=1,
        description="layers ahead it prefetches (default: --prefetch-distance, else one iteration, L)",
    )
    horizon_iterations: int = Field(
        default=64, ge=1, description="future iterations of the running requests it reads"
    )


@register_policy
class Oracle(Policy):
    name = "oracle"
    description = "reads the trace's future: prefetches exactly what is needed in order, Belady eviction (simulator only)"
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
        self._dirty = False
        self._refused = False
        self._plans = 0

    # -- the future ---------------------------------------------------------------------
    def on_iteration_start(self, ev: IterationStart) -> None:
        if self._requests is None:
            raise InputError(
                "policy 'oracle' reads the trace's future: the executor must call bind_future(workload) "
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
        if self._refused:  # a slot may have become free to evict
            self._dirty = True

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
        ctx, L, J = self.ctx, self._L, self._J
        self._plans += 1
        now_global = self._base + self._cur
        self._pending = {k: s for k, s in self._pending.items() if s > now_global}
        start = self._cur + 1
        end = min(self._cur + self._window, (self._H + 1) * L - 1)
        sims: dict[int, list] = {}  # device -> [free, heap, cached set, stopped]
        ndev = ctx.placement.num_devices
        stopped = 0
        self._refused = False
        for s in range(start, end + 1):
            k, layer = divmod(s, L)
            for e in np.flatnonzero(self._used[k, layer]):
                key = (layer, int(e))
                t = float(s * J + key[1])
                d = ctx.placement.device_of(key)
                sim = sims.get(d)
                if sim is None:
                    sim = sims[d] = self._device_sim(d)
                if sim[3] or key in sim[2]:
                    continue
                if sim[0] > 0:
                    sim[0] -= 1
                else:
                    heap = sim[1]
                    if (
                        not heap or -heap[0][1] <= t
                    ):  # nothing evictable, or every victim is needed sooner
                        sim[3] = True
                        self._refused = True
                        stopped += 1
                        if stopped == ndev:
                            return
                        continue
                    victim = heapq.heappop(heap)[2]
                    sim[2].discard(victim)
                sim[2].add(key)
                heapq.heappush(sim[1], (1, -t, key))
                self._pending[key] = self._base + s
                self.prefetch(layer, int(e), 1.0 / (1.0 + (s - start) * J + int(e)))

    def _device_sim(self, d: int) -> list:
        """[free slots, heap of (protected, -next use, key) over evictable keys, cached keys, stopped]."""
        cache = self.ctx.caches[d]
        heap = [
            (1 if ent.protected else 0, -self._next_use(k), k)
            for k, ent in cache.entries.items()
            if ent.state is ExpertState.RESIDENT and ent.pins == 0
        ]
        heapq.heapify(heap)
        cached = set(cache.entries)
        extra = [
            k for k in self._pending if k not in cached and self.ctx.placement.device_of(k) == d
        ]
        cached.update(extra)
        return [cache.capacity - len(cache.entries) - len(extra), heap, cached, False]

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: minus the next use (never used again: -inf)."""
        return -self._next_use(entry.key)

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "lookahead_layers": getattr(self, "_window", None),
            "plans": getattr(self, "_plans", 0),
        }
