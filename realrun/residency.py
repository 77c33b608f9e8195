"""Residency: which experts sit in which device slot, kept in step with the ExpertCache.

Per device: an :class:`ExpertCache` (the simulator's class: states, pins, protection,
counters), a :class:`SlotPool` (the slot buffers; a key's slot is reserved when its load
begins and returned when it is evicted or cancelled) and a :class:`CopyEngine`. All cache
calls happen on the caller's (compute) thread; the copy threads only fill slots and
report completions, which :meth:`Residency.drain` turns into ``finish_load``.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policies.cache import CacheFullError, EvictionScore, ExpertCache, ExpertKey, lru_score
from policies.placement import Placement
from realrun.copy_engine import CopyEngine, CopyJob, CpuMover, CudaMover, LinkEmulation, Mover
from realrun.layout import ExpertLayout
from realrun.store import ExpertStore


class SlotPool:
    """``capacity`` slot rows of ``row_bytes`` on one device; the lowest free slot goes first."""

    def __init__(self, capacity: int, row_bytes: int, device: torch.device) -> None:
        self.device = device
        self.rows = torch.empty(capacity, row_bytes, dtype=torch.uint8, device=device)
        self._free = list(range(capacity))
        self.slot_of: dict[ExpertKey, int] = {}
        self._views: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def capacity(self) -> int:
        return int(self.rows.shape[0])

    def assign(self, key: ExpertKey) -> int:
        if key in self.slot_of:
            raise RuntimeError(f"{key} already has slot {self.slot_of[key]}")
        slot = heapq.heappop(self._free)
        self.slot_of[key] = slot
        return slot

    def release(self, key: ExpertKey) -> None:
        heapq.heappush(self._free, self.slot_of.pop(key))

    def views(self, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """The whole pool as fused tensors [S, ...] in ``layout`` (cached; no copy)."""
        v = self._views.get(id(layout))
        if v is None:
            v = self._views[id(layout)] = layout.views(self.rows)
        return v


@dataclass
class DeviceSlots:
    """Everything one device owns for experts."""

    index: int
    device: torch.device
    cache: ExpertCache
    pool: SlotPool
    engine: CopyEngine


class Residency:
    """Expert residency over all devices, driven by the compute thread.

    Contract: keys of one layer demanded together fit every device's capacity (the caller
    plans waves), so a demand load always finds a slot after queued prefetches are
    cancelled or in-flight copies land.
    """

    def __init__(
        self,
        store: ExpertStore,
        expert_bytes: int,
        placement: Placement,
        devices: Sequence[torch.device],
        capacities: Sequence[int],
        link: LinkEmulation | None = None,
        chunk_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.store = store
        self.placement = placement
        self.clock = clock
        self.link = link
        self.devs: list[DeviceSlots] = []
        for i, (dev, cap) in enumerate(zip(devices, capacities, strict=True)):
            mover: Mover = CudaMover(dev, chunk_bytes) if dev.type == "cuda" else CpuMover()
            self.devs.append(
                DeviceSlots(
                    i,
                    dev,
                    ExpertCache(capacity=cap, expert_bytes=expert_bytes, device=i),
                    SlotPool(cap, store.row_bytes, dev),
                    CopyEngine(store, mover, link, chunk_bytes, name=f"copy{i}"),
                )
            )
        self._landed: list[tuple[ExpertKey, bool]] = []
        self.stall_s = 0.0
        """Seconds the compute thread waited for copies (demand waits and full caches)."""

    # -- queries --------------------------------------------------------------------------
    @property
    def caches(self) -> list[ExpertCache]:
        return [d.cache for d in self.devs]

    @property
    def capacities(self) -> list[int]:
        return [d.cache.capacity for d in self.devs]

    def dev(self, key: ExpertKey) -> DeviceSlots:
        return self.devs[self.placement.device_of(key)]

    def slot(self, key: ExpertKey) -> int:
        return self.dev(key).pool.slot_of[key]

    # -- completions ------------------------------------------------------------------------
    def drain(self) -> None:
        """Turn finished copies into RESIDENT keys (remembered for :meth:`take_landed`)."""
        for d in self.devs:
            self._drain_device(d)

    def _drain_device(self, d: DeviceSlots) -> None:
        jobs = d.engine.poll()
        if not jobs:
            return
        now = self.clock()
        for job in jobs:
            d.cache.finish_load(job.key, now)
            self._landed.append((job.key, d.cache.entries[job.key].by_prefetch))

    def take_landed(self) -> list[tuple[ExpertKey, bool]]:
        """(key, by_prefetch) of loads finished since the last call."""
        self.drain()
        out, self._landed = self._landed, []
        return out

    # -- demand -------------------------------------------------------------------------------
    def demand(self, keys: Sequence[ExpertKey], score: EvictionScore = lru_score) -> list[bool]:
        """Record compute demands for ``keys``, start loads for misses, pin every key.

        Returns hit flags (resident at the moment of demand). Cached keys are pinned first,
        so loading the misses can never evict a key of the same wave.
        """
        self.drain()
        hits = []
        missing = []
        for key in keys:
            d = self.dev(key)
            hits.append(d.cache.demand(key))
            if key in d.cache.entries:
                if d.cache.is_loading(key):
                    d.engine.promote(key)
                d.cache.pin(key)
            else:
                missing.append(key)
        for key in missing:
            self._load(key, demand=True, priority=float("inf"), score=score)
            self.dev(key).cache.pin(key)
        return hits

    def wait(self, key: ExpertKey) -> float:
        """Block until ``key`` is resident; returns the seconds the caller stalled."""
        d = self.dev(key)
        stalled = 0.0
        if not d.cache.is_resident(key):
            stalled = d.engine.wait(key)
            self.stall_s += stalled
            self._drain_device(d)
        if not d.cache.is_resident(key):
            raise RuntimeError(f"expert {key} is not resident after its copy finished")
        return stalled

    def release(self, keys: Sequence[ExpertKey]) -> None:
        for key in keys:
            self.dev(key).cache.unpin(key)

    def unprotect_layer(self, layer: int) -> None:
        for d in self.devs:
            d.cache.unprotect_layer(layer)

    # -- prefetch ------------------------------------------------------------------------------
    def prefetch(self, key: ExpertKey, priority: float, score: EvictionScore = lru_score) -> bool:
        """Start a prefetch of ``key`` unless it is cached or no slot can be freed; True if started."""
        d = self.dev(key)
        if key in d.cache.entries:
            if d.cache.is_loading(key):
                d.engine.reprioritize(key, priority)
            return False
        if not d.cache.can_make_room():
            return False
        return self._load(key, demand=False, priority=priority, score=score)

    def cancel(self, key: ExpertKey) -> bool:
        """Cancel a queued, unpinned prefetch of ``key``; True if it was cancelled."""
        d = self.dev(key)
        e = d.cache.entries.get(key)
        if e is None or not d.cache.is_loading(key) or e.pins or not d.engine.cancel(key):
            return False
        d.cache.cancel_load(key)
        d.pool.release(key)
        return True

    def _load(self, key: ExpertKey, *, demand: bool, priority: float, score: EvictionScore) -> bool:
        d = self.dev(key)
        while True:
            try:
                evicted = d.cache.begin_load(key, self.clock(), prefetch=not demand, score=score)
                break
            except CacheFullError:
                if not demand:
                    return False
                # every slot is pinned or loading: drop a queued prefetch, else let a copy land
                victim = d.engine.cancel_lowest_prefetch()
                if victim is not None:
                    d.cache.cancel_load(victim)
                    d.pool.release(victim)
                    continue
                if not d.cache.loading_keys():
                    raise
                self.stall_s += d.engine.wait_any()
                self._drain_device(d)
        for v in evicted:
            d.pool.release(v)
        slot = d.pool.assign(key)
        n = self.store.layouts[key[0]].row_bytes
        job = CopyJob(key, d.pool.rows[slot, :n], n, demand=demand, priority=priority)
        if d.device.type == "cuda":  # kernels queued on the slot's previous expert finish first
            job.after = torch.cuda.Event()
            job.after.record(torch.cuda.current_stream(d.device))
        d.engine.submit(job)
        return True

    # -- lifecycle --------------------------------------------------------------------------------
    def preload(self, keys: Sequence[ExpertKey]) -> None:
        """Copy ``keys`` into slots before a run (no-offload); not counted as loads."""
        for key in keys:
            d = self.dev(key)
            slot = d.pool.assign(key)
            n = self.store.layouts[key[0]].row_bytes
            row = d.pool.rows[slot, :n]
            if d.device.type == "cpu":
                self.store.read_into(key[0], key[1], 0, n, row)
            else:
                src = self.store.host_row(*key)
                row.copy_(src if src is not None else self.store.read_row(*key))
            d.cache.preload([key], now=self.clock())

    def close(self) -> None:
        for d in self.devs:
            d.engine.close()
