"""Host->GPU links of a run: the links (:mod:`sim.link`), the host bus, one event queue.

The model of one link (priorities, preemption, shared bandwidth, stale prefetches) is
:mod:`sim.link`'s docstring.

Link events (a segment of a copy ending) are kept in one time-ordered queue shared by
all links (:class:`Links`), not as simpy events, beside timed calls (the engine's
delayed policy orders, :meth:`Links.call_at`): whoever acts at time t first calls
:meth:`Links.advance` (t), which runs every link event and call up to t in time order
(ties: link events, then calls, each in the order they were scheduled). The engine does
so before each of its actions and runs the queue forward itself while it waits for a
load; simpy callbacks that touch the links (arrivals) advance them to their own time
first. So a copy or a delayed order costs no simpy event, and an idle link costs
nothing. Calls pass ``now`` explicitly: the
engine may run ahead of ``env.now`` when no simpy event lies in between (see
:mod:`sim.engine`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

import simpy

from policies.cache import CacheEntry, EvictionScores, ExpertCache, ExpertKey, ExpertState
from sim.events import EventLog
from sim.link import HostBus, Link, _Channel

__all__ = ["HostBus", "Link", "Links"]

_RESIDENT = ExpertState.RESIDENT  # a global: ExpertState.X costs an enum lookup (~80 ns)
_INF = math.inf  # a global: read per wait step


class Links:
    """All links of a run, the host bus, and what the engine and policy hear from them."""

    def __init__(
        self,
        env: simpy.Environment,
        caches: list[ExpertCache],
        device_of: Callable[[ExpertKey], int],
        num_layers: int,
        *,
        bandwidth_Bps: float,
        latency_s: float,
        concurrency: int,
        chunk_bytes: int,
        host_cap_Bps: float | None,
        scores: EvictionScores,
        log: EventLog | None = None,
    ) -> None:
        self.env = env
        self.device_of = device_of
        self.scores = scores
        self.log = log
        self.bus = HostBus(host_cap_Bps)
        self.last_gate = [0] * num_layers  # gate sequence number of each layer's last gate
        self.stamp = 0  # the current gate sequence number
        self.n_suspended = 0  # preempted copies on all links
        # one sequence for job order and event ties; a C-level counter (called per copy)
        self.next_seq: Callable[[], int] = itertools.count(1).__next__
        # per layer: devices whose cache holds prefetched (protected) entries of it
        self.protected: list[set[int]] = [set() for _ in range(num_layers)]
        self.on_load: Callable[[ExpertKey, bool, float], None] | None = None
        # link events: (time, seq, channel generation, link, channel), earliest first
        self._events: list[tuple[float, int, int, Link, _Channel]] = []
        # timed calls (delayed policy orders): (time, seq, fn), earliest first
        self._calls: list[tuple[float, int, Callable[[float], None]]] = []
        self._call_seq: Callable[[], int] = itertools.count(1).__next__
        self.due = math.inf  # time of the earliest queued event (possibly a stale one)
        self.slot_frees = [0] * len(caches)  # per device: loads finished or cancelled so far
        self.links = [
            Link(
                env,
                d,
                c,
                self,
                bandwidth_Bps=bandwidth_Bps,
                latency_s=latency_s,
                concurrency=concurrency,
                chunk_bytes=chunk_bytes,
                bus=self.bus,
            )
            for d, c in enumerate(caches)
        ]

    def enqueue(self, key: ExpertKey, priority: float, stamp: int, now: float) -> None:
        self.links[self.device_of(key)].enqueue(key, priority, stamp, now)

    def cancel(self, key: ExpertKey, now: float) -> None:
        self.links[self.device_of(key)].cancel(key, now)

    def push(self, end: float, link: Link, ch: _Channel) -> None:
        """Queue the end of ``ch``'s current segment (generation ``ch.gen``) at ``end``."""
        heapq.heappush(self._events, (end, self.next_seq(), ch.gen, link, ch))
        if end < self.due:
            self.due = end

    def call_at(self, when: float, fn: Callable[[float], None]) -> None:
        """Run ``fn(when)`` at ``when`` in time order with the link events, after those at
        the same time (as a simpy event that first advanced the links would), calls of the
        same time in the order they were made. For the engine's delayed policy orders:
        they then cost no simpy event, and waiting for a load runs through them."""
        heapq.heappush(self._calls, (when, self._call_seq(), fn))
        if when < self.due:
            self.due = when

    def run_calls(self) -> None:
        """Run every pending call (and the link events before each): at the end of a run."""
        while self._calls:
            self.advance(self._calls[0][0])

    def next_time(self) -> float:
        """Time of the earliest live link event or call (inf when none is queued)."""
        ev = self._events
        when = math.inf
        while ev:
            _, _, gen, _, ch = ev[0]
            if gen == ch.gen and ch.job is not None:
                when = ev[0][0]
                break
            heapq.heappop(ev)  # a rescheduled or released segment's old event
        calls = self._calls
        if calls and calls[0][0] < when:
            when = calls[0][0]
        if when == math.inf:
            self.due = math.inf
        return when

    def run_until_resident(self, entry: CacheEntry, limit: float) -> bool:
        """Run the queue in time order, as :meth:`advance` (``next_time()``) does at each
        step, until ``entry`` is resident: True; False, leaving the queue as it is, when
        the next live event lies at or after ``limit``. RuntimeError when ``entry`` is not
        resident and nothing is queued (no link carries it).

        Steps to ``due``, not to :meth:`next_time`: ``due`` is never after the earliest
        queued event, and when it is a stale event's time, advancing to it runs nothing
        but drops that event (as ``next_time`` would) and sets ``due`` to the next one;
        so the steps run the same events and calls in the same order, one call less each."""
        while entry.state is not _RESIDENT:
            when = self.due
            if when == _INF:
                raise RuntimeError("waiting for loads that no link carries")
            if limit <= when:
                return False
            self.advance(when)
        return True

    def advance(self, t: float) -> None:
        """Run every link event and call at or before ``t``, in time order (ties: link
        events first, then calls; each kind in scheduling order)."""
        ev, calls = self._events, self._calls
        pop = heapq.heappop
        while True:
            if ev and ev[0][0] <= t and (not calls or ev[0][0] <= calls[0][0]):
                end, _, gen, link, ch = pop(ev)
                if gen == ch.gen and ch.job is not None:
                    link._segment_done(ch, end)
            elif calls and calls[0][0] <= t:
                when, _, fn = pop(calls)
                fn(when)
            else:
                break
        due = ev[0][0] if ev else math.inf
        if calls and calls[0][0] < due:
            due = calls[0][0]
        self.due = due

    def copies_Bps(self) -> float:
        """Host memory bandwidth the copies in flight take now (their links' bandwidths,
        at most the host-side cap)."""
        bw = sum(link.bw for link in self.links if link.active)
        cap = self.bus.cap
        return bw if cap is None or bw < cap else cap

    def slot_freed(self, device: int) -> None:
        self.slot_frees[device] += 1
