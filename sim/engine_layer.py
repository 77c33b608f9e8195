"""One MoE layer step of the engine: demands, compute timelines, waiting for loads, waves.

A mixin of :class:`sim.engine.Engine` (see that module's docstring for the model); it
reads the per-run state :class:`sim.engine_setup.EngineSetup` builds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from typing import Any

import simpy

from policies.base import MissAction, Policy
from policies.cache import ExpertCache, ExpertKey, ExpertState
from sim.iteration import Iteration, RequestState
from sim.links import Link

Proc = Generator[simpy.Event, Any, Any]
# states as globals: ExpertState.X costs an enum class lookup (~80 ns) per read
_LOADING, _RESIDENT = ExpertState.LOADING, ExpertState.RESIDENT
_FETCH = MissAction.FETCH


class GpuPlan:
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


class LayerSteps:
    """The engine's MoE-layer methods (a mixin; the state is :class:`EngineSetup`'s)."""

    # set by EngineSetup.__init__ (declared here for readers and type checkers)
    env: simpy.Environment
    caches: list[ExpertCache]
    plans: list[GpuPlan]
    num_gpus: int
    policy: Policy
    h_miss: bool
    ask_loading: bool
    pending_fetches: list[int]
    now_hint: float
    _serve_aside: Callable[..., None]

    def _demand(
        self, layer: int, items: list[tuple[int, int]], t: float
    ) -> tuple[list[GpuPlan] | None, list[tuple[ExpertCache, ExpertKey]], list[float], list[int]]:
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
        slow: list[GpuPlan] = []
        absent: list[tuple[GpuPlan, ExpertKey, float]] = []
        resident, loading = _RESIDENT, _LOADING
        h_miss = self.h_miss
        if h_miss:
            self.now_hint = t
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
            if h_miss and (state is not loading or self.ask_loading):
                act = self.policy.miss_action(key, tok, t)
                if act is _FETCH:
                    if state is not loading:  # decided now, its copy starts after the loop:
                        self.pending_fetches[g] += 1  # later decisions see it queued
                else:
                    if state is loading:  # its copy goes on as a prefetch, unpinned
                        cache.unpin(key)
                    self._serve_aside(act, g, key, tok, ct, t)
                    continue
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
        if h_miss:
            self.pending_fetches = [0] * self.num_gpus
        # misses load only once every cached key of the layer is pinned, so a miss never
        # evicts an expert the same layer is about to use (as the real executor does)
        for p, key, ct in absent:
            if p.link.start_demand(key, t):
                p.pend.append((key, ct))
                used.append((p.cache, key))
            else:
                p.defer.append((key, ct))
        return slow or None, used, comp, missed

    def _timeline(self, p: GpuPlan, t: float) -> float:
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
        slow: list[GpuPlan],
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

    def _waves(self, p: GpuPlan, t: float, out: dict[int, float], mine: list[ExpertKey]) -> Proc:
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

    def _land_ahead(self, slow: list[GpuPlan], t: float, end: float, nxt: float) -> float | None:
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
