"""Residency: which experts sit in which device slot, kept in step with the ExpertCache.

Per device: an :class:`ExpertCache` (the simulator's class: states, pins, protection,
counters), a :class:`SlotPool` (a key's slot is reserved when its load begins and
returned when it is evicted or its load is cancelled) and a :class:`CopyEngine`.

Prefetch semantics follow the simulator's links (sim/links.py), so the two executors
run a policy the same way:

- an order is queued without a slot; the slot is reserved (``begin_load``, which may
  evict) only when the copy starts, on the copy thread; an order whose key is cached by
  then is skipped, and one that finds every slot pinned or loading is dropped;
- an order is stale, and dropped when it reaches the head of the queue, once its layer's
  gate has run after the order was made; a preempted copy of that layer is cancelled at
  that gate unless the layer demands it, or, preempted later, when it would resume;
- a demand load that finds no slot first cancels preempted copies, then waits for a copy
  in flight to land.

One lock guards the caches and pools: the compute thread and the copy threads (starting
prefetches) take it; nobody holds it while waiting for a copy.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from policies.cache import CacheFullError, EvictionScores, ExpertCache, ExpertKey, lru_scores
from policies.cache_scope import LayerScopedCache, make_caches
from policies.placement import Placement
from realrun.copy_engine import (
    CopyEngine,
    CopyJob,
    CpuMover,
    CudaMover,
    JobState,
    LinkEmulation,
    Mover,
)
from realrun.fences import SlotFence, fence_for
from realrun.layout import ExpertLayout
from realrun.store import ExpertStore


class SlotPool:
    """``capacity`` slot rows of ``row_bytes`` on one device; the lowest free slot goes first."""

    def __init__(self, capacity: int, row_bytes: int, device: torch.device) -> None:
        self.device = device
        # zeros, not empty: the pages are touched now, so the first copies into a fresh pool
        # do not pay page faults (measured 29-80 ms instead of 25 ms per 50 MB expert)
        self.rows = torch.zeros(capacity, row_bytes, dtype=torch.uint8, device=device)
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
    fence: SlotFence
    """Where a reused slot's copy waits (realrun.fences): the compute thread's stream."""


@dataclass
class OrderStats:
    """Prefetch orders, under the simulator's names (prefixed ``prefetch_orders``)."""

    orders: int = 0
    skipped_cached: int = 0
    stale: int = 0
    dropped_full: int = 0

    def as_metrics(self) -> dict[str, int]:
        return {
            "prefetch_orders": self.orders,
            "prefetch_orders_skipped_cached": self.skipped_cached,
            "prefetch_orders_stale": self.stale,
            "prefetch_orders_dropped": self.dropped_full,
        }


class Residency:
    """Expert residency over all devices.

    Contract: keys of one layer demanded together fit every device's capacity (the caller
    plans waves), so a demand load always finds a slot once preempted copies are
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
        scores: EvictionScores = lru_scores,
        fences: Callable[[torch.device], SlotFence] = fence_for,
        cache_scope: str = "global",
        top_k: int = 1,
    ) -> None:
        self.store = store
        self.placement = placement
        self.clock = clock
        self.link = link
        self.scores = scores
        self.lock = threading.Lock()
        self.stats = OrderStats()
        self.stall_s = 0.0
        """Seconds the compute thread waited for copies (demand waits and full caches)."""
        self.gate_seq = 0
        self.last_gate = [0] * placement.num_layers
        self._landed: list[tuple[ExpertKey, bool]] = []
        self.devs: list[DeviceSlots] = []
        # global: one pool per device; per-layer: each MoE layer an equal share of it
        caches = make_caches(
            list(capacities), expert_bytes, cache_scope, placement.num_layers, top_k
        )
        self.wave_capacities = [
            c.layer_capacity if isinstance(c, LayerScopedCache) else c.capacity for c in caches
        ]
        """What one layer step may hold at once per device (a wave's limit)."""
        for i, (dev, cap) in enumerate(zip(devices, capacities, strict=True)):
            mover: Mover = CudaMover(dev, chunk_bytes) if dev.type == "cuda" else CpuMover()
            engine = CopyEngine(
                store,
                mover,
                link,
                chunk_bytes,
                name=f"copy{i}",
                starter=self._start,
                resumer=self._resume,
            )
            cache = caches[i]
            fence = fences(dev)
            fence.observe()  # built on the compute thread; each gate observes again
            pool = SlotPool(cap, store.row_bytes, dev)
            self.devs.append(DeviceSlots(i, dev, cache, pool, engine, fence))

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

    # -- copy thread: a prefetch order is about to start --------------------------------------
    def _start(self, job: CopyJob) -> bool:
        with self.lock:
            if self.last_gate[job.key[0]] > job.stamp:
                self.stats.stale += 1
                return False
            d = self.dev(job.key)
            if job.key in d.cache.entries:
                self.stats.skipped_cached += 1
                return False
            try:
                evicted = d.cache.begin_load(
                    job.key, self.clock(), prefetch=True, scores=self.scores
                )
            except CacheFullError:
                self.stats.dropped_full += 1
                return False
            self._give_slot(d, job, evicted)
            return True

    def _resume(self, job: CopyJob) -> bool:
        """A preempted prefetch is about to resume: not once its layer's gate has run since
        the order (the simulator's links drop it then too; its slot is freed at poll)."""
        with self.lock:
            return self.last_gate[job.key[0]] <= job.stamp

    def _give_slot(self, d: DeviceSlots, job: CopyJob, evicted: list[ExpertKey]) -> None:
        for v in evicted:
            d.pool.release(v)
        slot = d.pool.assign(job.key)
        job.dst = d.pool.rows[slot, : job.nbytes]
        # kernels queued on the slot's previous expert finish first; on the compute
        # thread's stream, also when a prefetch starts on the copy thread (realrun.fences)
        job.after = d.fence.take()

    # -- completions (lock held) -----------------------------------------------------------
    def _drain_device(self, d: DeviceSlots) -> None:
        jobs = d.engine.poll()
        if not jobs:
            return
        now = self.clock()
        for job in jobs:
            if job.state is JobState.DONE:
                d.cache.finish_load(job.key, now)
                self._landed.append((job.key, d.cache.entries[job.key].by_prefetch))
            else:  # ABORTED by a cancel or gone stale before resuming: its slot comes back
                if job.stale:
                    self.stats.stale += 1
                self._free_loading(d, job.key)

    def _free_loading(self, d: DeviceSlots, key: ExpertKey) -> None:
        d.cache.cancel_load(key)
        d.pool.release(key)

    def _drain(self) -> None:
        for d in self.devs:
            self._drain_device(d)

    def take_landed(self) -> list[tuple[ExpertKey, bool]]:
        """(key, by_prefetch) of loads finished since the last call."""
        with self.lock:
            self._drain()
            out, self._landed = self._landed, []
            return out

    # -- the compute thread's side ------------------------------------------------------------
    def gate(self, layer: int) -> int:
        """Layer ``layer``'s gate runs now: orders made before for this layer become stale."""
        for d in self.devs:  # the compute thread's stream, for fences taken on copy threads
            d.fence.observe()
        with self.lock:
            self.gate_seq += 1
            self.last_gate[layer] = self.gate_seq
            return self.gate_seq

    def demand(self, keys: Sequence[ExpertKey]) -> list[bool]:
        """Record compute demands for ``keys``, start loads for misses, pin every key.

        Returns hit flags (resident at the moment of demand). Cached keys are pinned first,
        so loading the misses can never evict a key of the same wave.
        """
        with self.lock:
            self._drain()
            hits, missing = [], []
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
            self._demand_load(key)
        return hits

    def _demand_load(self, key: ExpertKey) -> None:
        d = self.dev(key)
        while True:
            with self.lock:
                self._drain_device(d)
                if key in d.cache.entries:  # a prefetch of it started meanwhile
                    if d.cache.is_loading(key):
                        d.engine.promote(key)
                    d.cache.pin(key)
                    return
                d.engine.take_order(key)
                try:
                    evicted = d.cache.begin_load(
                        key, self.clock(), prefetch=False, scores=self.scores
                    )
                except CacheFullError:
                    # every slot pinned or loading: cancel preempted prefetches, else wait
                    dropped = d.engine.drop_queued()
                    for job in dropped:
                        self._free_loading(d, job.key)
                    if dropped:
                        continue
                    if not d.cache.loading_keys():
                        raise
                else:
                    job = CopyJob(key, None, self.store.layouts[key[0]].row_bytes, demand=True)
                    self._give_slot(d, job, evicted)
                    d.cache.pin(key)
                    d.engine.submit(job)
                    return
            self.stall_s += d.engine.wait_any()  # without the lock: a copy must land

    def wait(self, key: ExpertKey) -> float:
        """Block until ``key`` is resident; returns the seconds the caller stalled."""
        d = self.dev(key)
        with self.lock:
            self._drain_device(d)
            if d.cache.is_resident(key):
                return 0.0
        stalled = d.engine.wait(key)
        self.stall_s += stalled
        with self.lock:
            self._drain_device(d)
            if not d.cache.is_resident(key):
                raise RuntimeError(f"expert {key} is not resident after its copy finished")
        return stalled

    def use(self, keys: Sequence[ExpertKey], now: float) -> None:
        with self.lock:
            for key in keys:
                self.dev(key).cache.use(key, now)

    def release(self, keys: Sequence[ExpertKey]) -> None:
        with self.lock:
            for key in keys:
                self.dev(key).cache.unpin(key)

    def drop_stale_preempted(self, layer: int) -> None:
        """After layer ``layer``'s demands: its preempted prefetches ordered before its gate
        are cancelled (the layer did not demand them, or they would be demand loads now)."""
        gate = self.last_gate[layer]
        with self.lock:
            for d in self.devs:
                for job in d.engine.drop_queued(
                    keep=lambda j: j.key[0] != layer or j.stamp >= gate
                ):
                    self.stats.stale += 1
                    self._free_loading(d, job.key)

    def end_layer(self, layer: int) -> None:
        """Layer ``layer`` has run: its predicted-but-unused prefetches lose protection."""
        with self.lock:
            for d in self.devs:
                d.cache.unprotect_layer(layer)

    # -- policy orders ----------------------------------------------------------------------------
    def order(self, key: ExpertKey, priority: float, stamp: int | None = None) -> None:
        """Queue (or re-prioritise) a prefetch order for ``key``; cached keys are skipped.
        ``stamp``: the gate sequence number when the policy made the order (default: now);
        the order is stale once its layer's gate has run after that."""
        d = self.dev(key)
        with self.lock:
            self.stats.orders += 1
            if stamp is None:
                stamp = self.gate_seq
            if d.engine.order(key, priority, stamp):
                return
            if key in d.cache.entries:
                self.stats.skipped_cached += 1
                return
            n = self.store.layouts[key[0]].row_bytes
            d.engine.submit(CopyJob(key, None, n, demand=False, priority=priority, stamp=stamp))

    def cancel(self, key: ExpertKey) -> None:
        """A policy's cancel: drop a queued order or preempted copy, stop one in flight."""
        d = self.dev(key)
        with self.lock:
            job = d.engine.cancel(key)
            if job is not None and job.dst is not None:  # a preempted copy held a slot
                self._free_loading(d, key)

    # -- lifecycle --------------------------------------------------------------------------------
    def preload(self, keys: Sequence[ExpertKey]) -> None:
        """Copy ``keys`` into slots before a run (no-offload); not counted as loads."""
        with self.lock:
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
