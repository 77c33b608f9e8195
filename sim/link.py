"""One host->GPU link: a priority server per GPU, with chunked preemption.

Model (one :class:`Link` per GPU):

- A link carries at most ``concurrency`` copies at once (one *channel* each); demand
  loads go before prefetches, demand loads in FIFO order, prefetches by descending
  priority (FIFO among equal priorities).
- A copy pays the link latency when it starts (or resumes) and then moves its bytes at
  the link bandwidth. Concurrent copies share the link bandwidth equally, and when the
  profile has a host-side cap, all copies on all links share the cap equally too (a
  copy gets min(link bandwidth / copies on its link, cap / copies on all links)). Rates
  change whenever a copy starts or ends; a copy in its latency phase counts as active.
- A demand load that finds every channel busy with prefetches preempts the lowest
  priority one at its next chunk boundary (``chunk_bytes``; a copy still in its latency
  phase stops at once). The preempted copy keeps its cache slot (LOADING) and resumes
  later from where it stopped, paying the latency again.
- A prefetch's cache slot is reserved (``ExpertCache.begin_load``) when its copy starts,
  not when it is queued; a demand load's slot is reserved at demand time
  (:meth:`Link.start_demand`).
- Stale prefetches: a queued order whose layer's gate has run since it was issued is
  dropped when it reaches the head of the queue; a preempted (partial) one is cancelled
  at that gate unless demanded. A policy's cancel removes a queued order, cancels a
  preempted copy, and stops an in-flight prefetch at its next chunk boundary.

The time-ordered event queue the links share, and the run's set of links, are
:class:`sim.links.Links`.

Over 450 lines on purpose: one link's server (channels, priorities, chunked preemption,
host bandwidth share) is one simpy process and its state.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import TYPE_CHECKING

import simpy

from policies.cache import CacheFullError, ExpertCache, ExpertKey, ExpertState

if TYPE_CHECKING:
    from sim.links import Links

_SUSPEND, _CANCEL = 1, 2
_INF = math.inf  # a global: read per demand load


class _Job:
    """One copy: a demand load or a prefetch, possibly partly done."""

    __slots__ = ("key", "demand", "remaining", "priority", "seq", "stamp", "stop", "sink")

    def __init__(
        self, key: ExpertKey, demand: bool, remaining: int, priority: float, seq: int, stamp: int
    ):
        self.key = key
        self.demand = demand
        self.remaining = remaining
        self.priority = priority
        self.seq = seq
        self.stamp = stamp
        self.stop = 0
        self.sink: Transient | None = None  # a transient copy's landing record


class Transient:
    """A copy that lands outside the cache (a low-bit copy into a staging buffer).

    Quacks like a :class:`~policies.cache.CacheEntry` for waiting: ``state`` turns
    RESIDENT and ``loaded_at`` is set when its last byte lands."""

    __slots__ = ("key", "nbytes", "state", "loaded_at")

    def __init__(self, key: ExpertKey, nbytes: int):
        self.key, self.nbytes = key, nbytes
        self.state = ExpertState.LOADING
        self.loaded_at = math.inf


class _Channel:
    """One concurrent copy slot of a link and the segment it is moving."""

    __slots__ = ("index", "job", "gen", "start", "t0", "end", "seg", "rate")

    def __init__(self, index: int):
        self.index = index
        self.job: _Job | None = None
        self.gen = 0  # invalidates queued events of a rescheduled segment
        self.start = 0.0  # when the segment started (incl. latency)
        self.t0 = 0.0  # when its bytes start to flow
        self.end = 0.0
        self.seg = 0  # bytes in this segment
        self.rate = 1.0


class HostBus:
    """The optional shared host-side bandwidth cap: counts copies in flight on all links."""

    def __init__(self, cap_Bps: float | None):
        self.cap = cap_Bps
        self.active = 0
        self.links: list[Link] = []


class Link:
    """The host->GPU link of one device (see the module docstring for the model)."""

    def __init__(
        self,
        env: simpy.Environment,
        device: int,
        cache: ExpertCache,
        owner: Links,
        *,
        bandwidth_Bps: float,
        latency_s: float,
        concurrency: int,
        chunk_bytes: int,
        bus: HostBus,
    ) -> None:
        self.env, self.device, self.cache, self.owner = env, device, cache, owner
        self.ebytes = cache.expert_bytes
        self.bw, self.lat, self.chunk = bandwidth_Bps, latency_s, chunk_bytes
        self.bus = bus
        bus.links.append(self)
        # rates change with other copies only when channels or a cap are shared
        self.shared = concurrency > 1 or bus.cap is not None
        self.channels = [_Channel(i) for i in range(concurrency)]
        # the one channel of a one-copy link (None with several): its scheduling steps
        # below skip _kick's channel loop and _preempt, which have nothing else to do then
        self.ch0 = self.channels[0] if concurrency == 1 else None
        self.demand_q: deque[_Job] = deque()
        self.heap: list[tuple[float, int, ExpertKey]] = []
        self.queued: dict[ExpertKey, _Job] = {}  # prefetches waiting (new or preempted)
        self.suspended: set[ExpertKey] = set()  # preempted: LOADING with a reserved slot
        self.inflight: dict[ExpertKey, _Channel] = {}
        self.active = 0
        self.busy_s = 0.0
        self._busy_t0 = 0.0
        self.bytes_moved = 0
        self.transient_bytes = 0  # of those, bytes of transient (low-bit) copies
        self.stats = {
            "orders": 0,
            "skipped_cached": 0,
            "stale": 0,
            "dropped_full": 0,
            "preemptions": 0,
        }

    # -- engine / policy entry points -----------------------------------------------------
    def start_demand(self, key: ExpertKey, now: float) -> bool:
        """A compute demand missed ``key`` (ABSENT): reserve its cache slot, pinned, and
        start or queue its demand load. When no slot can be freed otherwise, preempted
        prefetches are cancelled (:meth:`free_suspended`) to make one; False, with nothing
        reserved, when even that fails. A queued (not started) prefetch of ``key`` is
        forgotten either way (:meth:`take_queued`)."""
        queued = self.queued
        if queued:  # self.take_queued(key), inlined: once per demand load
            job = queued.get(key)
            if job is not None and key not in self.suspended:
                del queued[key]
        owner = self.owner
        cache, scores = self.cache, owner.scores
        try:
            cache.begin_load(key, now, prefetch=False, scores=scores, pin=True)
        except CacheFullError:
            if not self.free_suspended():
                return False
            try:
                cache.begin_load(key, now, prefetch=False, scores=scores, pin=True)
            except CacheFullError:
                return False
        job = _Job(key, True, self.ebytes, _INF, owner.next_seq(), owner.stamp)
        if not self.demand_q and not self.heap:
            # nothing queued could go first: start on an idle channel as _kick would
            for ch in self.channels:
                if ch.job is None:
                    self._begin(ch, job, now, True)
                    return True
        self.demand_q.append(job)
        self._kick(now)
        return True

    def start_transient(self, key: ExpertKey, nbytes: int, now: float) -> Transient:
        """Copy ``nbytes`` for ``key`` as a demand load that lands in a staging buffer, not
        the cache (no slot, no cache state change): a low-bit copy on a miss. Its job key
        is ``(layer, -1 - expert)`` so it never collides with a fetch of the same expert."""
        sink = Transient(key, nbytes)
        owner = self.owner
        job = _Job((key[0], -1 - key[1]), True, nbytes, _INF, owner.next_seq(), owner.stamp)
        job.sink = sink
        self.demand_q.append(job)
        self._kick(now)
        return sink

    def promote(self, key: ExpertKey, now: float) -> None:
        """A LOADING ``key`` is demanded: make its copy a demand load (no more preemption)."""
        if key in self.suspended:
            job = self.queued.pop(key)
            self._unsuspend(key)
            job.demand, job.stop = True, 0
            self.demand_q.append(job)
            self._kick(now)
            return
        ch = self.inflight.get(key)
        if ch is not None and ch.job is not None:
            ch.job.demand = True
            ch.job.stop = 0  # a shortened segment just continues at its end

    def take_queued(self, key: ExpertKey) -> None:
        """Forget a queued (not started) prefetch of ``key``: it is about to be a demand load."""
        job = self.queued.get(key)
        if job is not None and key not in self.suspended:
            del self.queued[key]

    def enqueue(self, key: ExpertKey, priority: float, stamp: int, now: float) -> None:
        """Queue or re-prioritise a prefetch; keys already cached are skipped."""
        self.stats["orders"] += 1
        job = self.queued.get(key)
        if job is not None:
            if job.priority != priority or job.stamp != stamp:
                job.priority, job.stamp, job.seq = priority, stamp, self.owner.next_seq()
                heapq.heappush(self.heap, (-priority, job.seq, key))
            return
        if key in self.cache.entries:
            self.stats["skipped_cached"] += 1
            return
        job = _Job(key, False, self.ebytes, priority, self.owner.next_seq(), stamp)
        self.queued[key] = job
        heapq.heappush(self.heap, (-priority, job.seq, key))
        ch0 = self.ch0
        # _kick would do nothing on a busy one-copy link with no demand load queued
        if ch0 is None or ch0.job is None or self.demand_q:
            self._kick(now)

    def cancel(self, key: ExpertKey, now: float) -> None:
        """A policy's cancellation: drop a queued order, cancel a preempted or in-flight prefetch."""
        job = self.queued.pop(key, None)
        if job is not None:
            if key in self.suspended:
                self._unsuspend(key)
                self._cancel_slot(key)
            return
        ch = self.inflight.get(key)
        if ch is not None and ch.job is not None and not ch.job.demand:
            self._stop(ch, now, _CANCEL)

    def drop_suspended_of_layer(self, layer: int) -> None:
        """Cancel preempted prefetches of ``layer`` ordered before its gate that just ran
        without demanding them."""
        gate = self.owner.last_gate[layer]
        for key in [k for k in self.suspended if k[0] == layer and self.queued[k].stamp < gate]:
            self._unsuspend(key)
            del self.queued[key]
            self.stats["stale"] += 1
            self._cancel_slot(key)

    def free_suspended(self) -> bool:
        """Cancel every preempted prefetch to free slots for demand loads; True if any."""
        if not self.suspended:
            return False
        for key in sorted(self.suspended):
            self._unsuspend(key)
            del self.queued[key]
            self._cancel_slot(key)
        return True

    def queued_s(self, now: float) -> float:
        """Seconds of copies ahead of a new one at ``now`` (at the full link bandwidth)."""
        left = sum(j.remaining for j in self.demand_q) + sum(
            j.remaining for j in self.queued.values()
        )
        for ch in self.channels:
            if ch.job is not None:
                moved = min(ch.seg, max(0.0, (now - ch.t0) * ch.rate))
                left += ch.job.remaining - moved
        return left / self.bw

    def busy_until(self, now: float) -> float:
        """Busy time so far, counting an ongoing busy period up to ``now``."""
        return self.busy_s + (now - self._busy_t0 if self.active else 0.0)

    # -- scheduling ---------------------------------------------------------------------
    def _kick(self, now: float) -> None:
        for ch in self.channels:
            if ch.job is None:
                job = self._next_job(now)
                if job is None:
                    break
                self._begin(ch, job, now, new_run=True)
        if self.demand_q:
            self._preempt(now)

    def _preempt(self, now: float) -> None:
        if len(self.channels) == 1:  # the loop below for one channel, without its lists
            ch = self.channels[0]
            while self.demand_q:
                job = ch.job
                if job is None or job.demand or job.stop:
                    return  # nothing to stop, or already stopping for the queued demand
                self._stop(ch, now, _SUSPEND)
            return
        while self.demand_q:
            stopping = sum(
                1
                for ch in self.channels
                if ch.job is not None and ch.job.stop and not ch.job.demand
            )
            if len(self.demand_q) <= stopping:
                return
            victims = [
                ch
                for ch in self.channels
                if ch.job is not None and not ch.job.demand and not ch.job.stop
            ]
            if not victims:
                return
            victim = min(victims, key=lambda c: (c.job.priority, -c.job.seq))  # type: ignore[union-attr]
            self._stop(victim, now, _SUSPEND)

    def _next_job(self, now: float) -> _Job | None:
        if self.demand_q:
            return self.demand_q.popleft()
        cache = self.cache
        last_gate = self.owner.last_gate
        while self.heap:
            _, seq, key = heapq.heappop(self.heap)
            job = self.queued.get(key)
            if job is None or job.seq != seq:
                continue  # superseded entry
            del self.queued[key]
            if last_gate[key[0]] > job.stamp:  # its layer has run since the order
                self.stats["stale"] += 1
                if key in self.suspended:
                    self._unsuspend(key)
                    self._cancel_slot(key)
                continue
            if key in self.suspended:
                self._unsuspend(key)
                return job
            if key in cache.entries:
                self.stats["skipped_cached"] += 1
                continue
            try:
                cache.begin_load(key, now, prefetch=True, scores=self.owner.scores)
            except CacheFullError:
                self.stats["dropped_full"] += 1
                continue
            self.owner.protected[key[0]].add(self.device)
            return job
        return None

    def _rate(self) -> float:
        rate = self.bw / self.active
        bus = self.bus
        if bus.cap is not None:
            rate = min(rate, bus.cap / bus.active)
        return rate

    def _begin(self, ch: _Channel, job: _Job, now: float, new_run: bool) -> None:
        ch.job = job
        lat = 0.0
        if new_run:
            self.inflight[job.key] = ch
            if self.active == 0:
                self._busy_t0 = now
            self.active += 1
            self.bus.active += 1
            lat = self.lat
        rate = self._rate() if self.shared else self.bw
        seg = job.remaining
        # pairs, not one 4-tuple assignment (which builds and unpacks a tuple)
        ch.start, ch.t0 = now, now + lat
        ch.seg, ch.rate = seg, rate
        end = ch.end = ch.t0 + seg / rate
        gen = ch.gen = ch.gen + 1  # as _schedule(ch, now), one call less per copy and segment
        # owner.push(end if end > now else now, self, ch), inlined: once per segment
        owner = self.owner
        if not end > now:
            end = now
        heapq.heappush(owner._events, (end, owner.next_seq(), gen, self, ch))
        if end < owner.due:
            owner.due = end
        if new_run and self.shared:
            self._rerate(now, ch)

    def _rerate(self, now: float, skip: _Channel | None) -> None:
        """The number of copies changed: give every other copy in flight its new share."""
        for link in self.bus.links if self.bus.cap is not None else (self,):
            for c in link.channels:
                if c.job is None or c is skip:
                    continue
                rate = link._rate()
                if rate == c.rate:
                    continue
                if now > c.t0:  # keep the bytes moved so far: restart the clock at the new rate
                    c.t0 = now - (now - c.t0) * c.rate / rate
                c.rate = rate
                c.end = c.t0 + c.seg / rate
                link._schedule(c, now)

    def _schedule(self, ch: _Channel, now: float) -> None:
        ch.gen += 1
        # never before now: rounding in a rerate can put the end a hair behind it
        self.owner.push(ch.end if ch.end > now else now, self, ch)

    def _stop(self, ch: _Channel, now: float, kind: int) -> None:
        """Stop ``ch``'s prefetch at its next chunk boundary (at once in its latency phase)."""
        job = ch.job
        assert job is not None
        if job.stop:
            job.stop = max(job.stop, kind)
            return
        job.stop = kind
        if now <= ch.t0:
            ch.seg = 0
            ch.gen += 1
            self._segment_done(ch, now)
            return
        base = self.ebytes - job.remaining
        pos = base + (now - ch.t0) * ch.rate
        boundary = min(math.ceil(pos / self.chunk) * self.chunk, self.ebytes)
        seg = int(boundary - base)
        if seg >= ch.seg:
            return  # the segment already ends at a boundary
        ch.seg = seg
        ch.end = max(ch.t0 + seg / ch.rate, now)
        self._schedule(ch, now)

    def _segment_done(self, ch: _Channel, now: float) -> None:
        job = ch.job
        assert job is not None
        job.remaining -= ch.seg
        self.bytes_moved += ch.seg
        rec = self.owner.log
        if rec is not None and now > ch.start:
            rec.span(
                "h2d",
                self.device,
                f"L{job.key[0]}E{job.key[1]}",
                ch.start,
                now,
                tid=1 + ch.index,
                bytes=ch.seg,
                demand=job.demand,
            )
        if job.remaining > 0 and not (job.stop and not job.demand):
            job.stop = 0
            self._begin(ch, job, now, new_run=False)
            return
        # the channel is free: release it (rates of the others change when shared)
        key = job.key
        del self.inflight[key]
        ch.job = None
        ch.gen += 1
        self.active -= 1
        self.bus.active -= 1
        if self.active == 0:
            self.busy_s += now - self._busy_t0
        if self.shared:
            self._rerate(now, None)
        if job.sink is not None:  # a transient copy: it lands beside the cache
            job.sink.state, job.sink.loaded_at = ExpertState.RESIDENT, now
            self.transient_bytes += job.sink.nbytes
        elif job.remaining <= 0:
            cache, owner = self.cache, self.owner
            cache.finish_load(key, now)
            # count the freed slot, then tell the policy (inline: this runs per copy)
            owner.slot_frees[self.device] += 1
            if owner.on_load is not None:
                owner.on_load(key, cache.entries[key].by_prefetch, now)
        elif job.stop == _SUSPEND:
            self.stats["preemptions"] += 1
            job.stop = 0
            self.suspended.add(key)
            self.owner.n_suspended += 1
            self.queued[key] = job
            heapq.heappush(self.heap, (-job.priority, job.seq, key))
        else:
            self._cancel_slot(key)
        if self.demand_q or self.heap:
            if self.ch0 is None or ch.job is not None:  # (on_load may have started one)
                self._kick(now)
            else:  # _kick on the free one channel: what _next_job picks goes first, so
                job = self._next_job(now)  # _preempt would find nothing to stop
                if job is not None:
                    self._begin(ch, job, now, True)

    def _unsuspend(self, key: ExpertKey) -> None:
        self.suspended.discard(key)
        self.owner.n_suspended -= 1

    def _cancel_slot(self, key: ExpertKey) -> None:
        self.cache.cancel_load(key)
        self.owner.slot_freed(self.device)
