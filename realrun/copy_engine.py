"""The copy engine: moves packed experts from the host store into device slots.

One engine per device (each GPU has its own host link). A copy thread serves a priority
queue: demand loads (the compute is waiting) always go first, then prefetches by
descending priority, FIFO among equals. Copies move in chunks of ``chunk_bytes``; at
every chunk boundary a running prefetch yields to a waiting demand load (it keeps its
slot and resumes later from where it stopped) or stops if a policy cancelled it. A
prefetch order gets its slot only when its copy starts (the ``starter`` callback), the
same semantics as the simulator's links (sim/links.py).

Backends (a :class:`Mover` copies one chunk):

- :class:`CpuMover`: a plain memory copy (or a file read) into a CPU slot.
- :class:`CudaMover`: an asynchronous copy from pinned host memory on a dedicated copy
  stream, finished by an event the copy thread waits on (never run on a GPU here).

Link emulation (:class:`LinkEmulation`) makes each transfer take at least
``latency + bytes / bandwidth`` (the thread sleeps to an absolute schedule, so sleep
overshoot does not add up), so PCIe-like stalls can be studied on a CPU-only machine. A
prefetch that resumes after being preempted pays the latency again (a new transfer).
Results that used it say so (``emulated_link``).

Over 450 lines on purpose: the queue, the copy thread and its CPU and CUDA movers share
one preemption protocol that is easiest to check side by side.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch

from realrun.store import ExpertStore
from specs.errors import InputError

ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class LinkEmulation:
    """An emulated host->device link: ``gbps`` GB/s (1e9 bytes/s) and a per-transfer latency."""

    gbps: float
    latency_us: float = 0.0

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise InputError(f"--link-gbps must be positive, got {self.gbps}")
        if self.latency_us < 0:
            raise InputError(f"--link-latency-us must be >= 0, got {self.latency_us}")

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9

    def transfer_s(self, nbytes: int) -> float:
        """Time one transfer of ``nbytes`` takes on an idle emulated link."""
        return self.latency_us * 1e-6 + nbytes / self.bytes_per_s

    def describe(self) -> dict[str, Any]:
        return {"emulated_link": True, "link_gbps": self.gbps, "link_latency_us": self.latency_us}


class JobState(Enum):
    QUEUED = "queued"  # waiting (a preempted prefetch waits with its slot)
    STARTING = "starting"  # a slotless prefetch order being given a slot by the starter
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"  # never started, or stopped before any byte: no slot to free
    ABORTED = "aborted"  # stopped mid-copy by a cancel: its slot is freed when polled


@dataclass(eq=False)
class CopyJob:
    """Copy (layer, expert)'s packed row into ``dst`` (a slot row, ``nbytes`` long).

    A prefetch order is queued without a slot (``dst`` None): the engine asks its
    ``starter`` for one when the copy is about to start, as the simulator reserves a
    prefetch's slot when its copy starts, not when it is ordered. ``stamp`` is the gate
    sequence number when the order was made (staleness is the starter's call, and the
    resumer's for a preempted copy about to resume; ``stale`` marks one it stopped).
    """

    key: ExpertKey
    dst: torch.Tensor | None
    nbytes: int
    demand: bool
    priority: float = 0.0
    stamp: int = 0
    state: JobState = JobState.QUEUED
    done_bytes: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    finished_at: float = 0.0
    preemptions: int = 0
    abort: bool = False
    stale: bool = False
    after: Any = None
    """CUDA: an event on the compute stream; the copy must not write before it (the slot's
    previous expert may still be read by kernels queued before the slot was reused)."""
    _version: int = 0


class Mover(Protocol):
    """Copies bytes [lo, hi) of a job's expert row from the store into ``job.dst[lo:hi]``."""

    def copy(self, store: ExpertStore, job: CopyJob, lo: int, hi: int) -> None: ...


class CpuMover:
    """Slots in host memory: a memory copy or a file read, synchronous on the copy thread."""

    def copy(self, store: ExpertStore, job: CopyJob, lo: int, hi: int) -> None:
        store.read_into(job.key[0], job.key[1], lo, hi, job.dst[lo:hi])


class CudaMover:
    """Slots on a CUDA device: copy-stream copies from pinned memory, finished by an event.

    The copy thread waits on each chunk's event (releasing the GIL) before it picks the
    next chunk, so a demand load can overtake a prefetch at a chunk boundary, and a job is
    reported done only once its bytes are on the device: any kernel the compute stream
    launches afterwards sees them. Before its first byte the copy stream waits for
    ``job.after``, recorded on the compute stream when the slot was reused, so kernels
    still queued on the slot's previous expert read it intact. Stores without a host row
    (file) go through a pinned staging buffer.
    """

    def __init__(self, device: torch.device, chunk_bytes: int) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaMover needs a CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._staging: torch.Tensor | None = None
        self._chunk_bytes = chunk_bytes

    def _stage(self, n: int) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self._chunk_bytes, dtype=torch.uint8, pin_memory=True)
        return self._staging[:n]

    def copy(self, store: ExpertStore, job: CopyJob, lo: int, hi: int) -> None:
        src = store.host_row(*job.key)
        if src is None:
            src_chunk = self._stage(hi - lo)
            store.read_into(job.key[0], job.key[1], lo, hi, src_chunk)
        else:
            src_chunk = src[lo:hi]
        with torch.cuda.stream(self.stream):
            if lo == 0 and job.after is not None:
                self.stream.wait_event(job.after)  # write-after-read on the reused slot
            job.dst[lo:hi].copy_(src_chunk, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        event.synchronize()


@dataclass
class EngineStats:
    """What one engine did: bytes moved, time the link was busy, jobs, preemptions."""

    bytes_copied: int = 0
    busy_s: float = 0.0
    jobs_done: int = 0
    jobs_cancelled: int = 0
    preemptions: int = 0


Starter = Callable[[CopyJob], bool]
"""Gives a slotless prefetch its slot (sets ``job.dst``) on the copy thread; False drops it."""

_LIVE = (JobState.QUEUED, JobState.STARTING, JobState.RUNNING)


class CopyEngine:
    """A copy thread with a priority queue; all methods are thread-safe.

    Contract: a key has at most one live job. The caller owns a job's slot until the job
    is reported by :meth:`poll` (DONE or ABORTED) or :meth:`cancel` says it was dropped.
    The starter is called without the engine's lock held, so it may take the caller's;
    so is the ``resumer``, asked before a preempted prefetch resumes: False stops it (an
    ABORTED job marked ``stale``, its slot the caller's to free at :meth:`poll`, as for
    a cancel; a demand that promotes it first keeps it).
    """

    def __init__(
        self,
        store: ExpertStore,
        mover: Mover | None = None,
        link: LinkEmulation | None = None,
        chunk_bytes: int = 1 << 20,
        name: str = "copy",
        starter: Starter | None = None,
        resumer: Starter | None = None,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.store = store
        self.mover: Mover = mover or CpuMover()
        self.link = link
        self.chunk_bytes = chunk_bytes
        self.starter = starter
        self.resumer = resumer
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._heap: list[tuple[int, float, int, int, CopyJob]] = []
        self._jobs: dict[ExpertKey, CopyJob] = {}
        self._completed: list[CopyJob] = []
        self._demand_queued = 0
        self._seq = itertools.count()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"fmoe-{name}", daemon=True)
        self._thread.start()

    # -- caller side --------------------------------------------------------------------
    def submit(self, job: CopyJob) -> None:
        """Queue ``job``. A live slotless order for the same key is superseded (dropped)."""
        with self._cond:
            self._raise_if_failed()
            live = self._jobs.get(job.key)
            if live is not None and live.state in _LIVE:
                if live.dst is not None:
                    raise RuntimeError(f"copy of {job.key} already queued")
                self._drop(live)
            self._jobs[job.key] = job
            self._push(job)
            self._cond.notify_all()

    def promote(self, key: ExpertKey) -> None:
        """Make ``key``'s prefetch copy (which has a slot) a demand load: it goes first, is
        not preempted, and a cancel that has not stopped it yet is withdrawn (one that has
        stopped it is resumed)."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.dst is None:
                return
            if job.state is JobState.ABORTED:  # stopped, not yet polled: resume it
                self._completed.remove(job)
                job.state = JobState.QUEUED
            if job.state not in _LIVE:
                return
            job.abort = False
            if not job.demand:
                job.demand = True
                if job.state is JobState.QUEUED:
                    self._push(job)
            self._cond.notify_all()

    def order(self, key: ExpertKey, priority: float, stamp: int) -> bool:
        """Re-prioritise (and re-stamp) a queued prefetch of ``key``; False if there is none."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.state is not JobState.QUEUED or job.demand:
                return False
            if job.priority != priority or job.stamp != stamp:
                job.priority, job.stamp = priority, stamp
                self._push(job)
            return True

    def has_job(self, key: ExpertKey) -> bool:
        with self._cond:
            job = self._jobs.get(key)
            return job is not None and job.state in _LIVE

    def cancel(self, key: ExpertKey) -> CopyJob | None:
        """A policy's cancel of ``key``'s prefetch.

        A queued one is dropped and returned (the caller frees its slot if it has one); a
        copy in flight stops at its next chunk boundary and is reported ABORTED by
        :meth:`poll` (None is returned). Demand loads are never cancelled.
        """
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.demand:
                return None
            if job.state is JobState.QUEUED:
                self._drop(job)
                return job
            if job.state in (JobState.STARTING, JobState.RUNNING):
                job.abort = True
            return None

    def drop_queued(self, keep=lambda job: False) -> list[CopyJob]:
        """Drop every queued prefetch that has a slot (preempted copies) unless ``keep(job)``."""
        with self._cond:
            out = [
                j
                for j in self._jobs.values()
                if j.state is JobState.QUEUED and j.dst is not None and not j.demand and not keep(j)
            ]
            for j in out:
                self._drop(j)
            return out

    def take_order(self, key: ExpertKey) -> None:
        """Forget a queued slotless order of ``key`` (it is about to be a demand load)."""
        with self._cond:
            job = self._jobs.get(key)
            if job is not None and job.dst is None and job.state is JobState.QUEUED:
                self._drop(job)

    def wait(self, key: ExpertKey) -> float:
        """Block until ``key``'s job is no longer live; returns the seconds spent waiting."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                self._raise_if_failed()
                job = self._jobs.get(key)
                if job is None or job.state not in _LIVE:
                    break
                self._cond.wait()
        return time.perf_counter() - t0

    def wait_any(self) -> float:
        """Block until some copy finishes (at once if one waits in poll() or none is live)."""
        t0 = time.perf_counter()
        with self._cond:
            while not self._completed:
                self._raise_if_failed()
                if not any(j.state in _LIVE and j.dst is not None for j in self._jobs.values()):
                    break
                self._cond.wait()
        return time.perf_counter() - t0

    def poll(self) -> list[CopyJob]:
        """Copies finished (DONE) or stopped by a cancel (ABORTED) since the last poll."""
        with self._cond:
            self._raise_if_failed()
            done, self._completed = self._completed, []
            for job in done:
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
            return done

    def close(self) -> None:
        """Stop the thread (pending jobs are dropped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- internals (hold self._cond) ------------------------------------------------------
    def _push(self, job: CopyJob) -> None:
        job._version += 1
        if job.demand:
            self._demand_queued += 1
        # (class, -priority, seq): demand class 0 first, then higher priority, then FIFO
        heapq.heappush(
            self._heap, (0 if job.demand else 1, -job.priority, next(self._seq), job._version, job)
        )

    def _drop(self, job: CopyJob) -> None:
        job.state = JobState.CANCELLED
        job._version += 1  # its heap entries go stale
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        self.stats.jobs_cancelled += 1
        self._cond.notify_all()

    def _pop(self) -> CopyJob | None:
        while self._heap:
            cls, _, _, version, job = heapq.heappop(self._heap)
            if cls == 0:
                self._demand_queued -= 1
            if version == job._version and job.state is JobState.QUEUED:
                return job
        return None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"copy thread failed: {self._error!r}") from self._error

    # -- copy thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    job = self._pop()
                    while job is None and not self._closed:
                        self._cond.wait()
                        job = self._pop()
                    if self._closed:
                        return
                    job.state = JobState.STARTING if job.dst is None else JobState.RUNNING
                if job.dst is None:
                    if not self._start(job):
                        continue
                elif job.preemptions and not self._resume(job):
                    continue
                self._run(job)
        except BaseException as exc:  # surfaced to the caller on its next call
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def _start(self, job: CopyJob) -> bool:
        """Ask the starter for a slot; False when the order is dropped."""
        ok = self.starter is not None and self.starter(job)
        with self._cond:
            if job.state is JobState.CANCELLED:  # superseded by a demand meanwhile
                return False
            if not ok:
                self._drop(job)
                return False
            if job.abort:  # cancelled while its slot was being reserved
                self._finish(job, JobState.ABORTED)
                return False
            job.state = JobState.RUNNING
            return True

    def _resume(self, job: CopyJob) -> bool:
        """Ask the resumer whether a preempted copy goes on; False when it stopped it."""
        if job.demand or self.resumer is None or self.resumer(job):
            return True
        with self._cond:
            if job.demand:  # promoted meanwhile: it is a demand load now
                return True
            if job.state is not JobState.RUNNING:  # dropped meanwhile (drop_queued, cancel)
                return False
            job.stale = True
            self._finish(job, JobState.ABORTED)
            return False

    def _finish(self, job: CopyJob, state: JobState) -> None:
        job.state = state
        job.finished_at = time.perf_counter()
        self._completed.append(job)
        if state is JobState.DONE:
            self.stats.jobs_done += 1
        self._cond.notify_all()

    def _run(self, job: CopyJob) -> None:
        t0 = time.perf_counter()
        deadline = t0 + (self.link.latency_us * 1e-6 if self.link else 0.0)
        while job.done_bytes < job.nbytes:
            lo = job.done_bytes
            hi = min(lo + self.chunk_bytes, job.nbytes)
            self.mover.copy(self.store, job, lo, hi)
            job.done_bytes = hi
            self.stats.bytes_copied += hi - lo
            if self.link is not None:
                deadline += (hi - lo) / self.link.bytes_per_s
                pause = deadline - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            if job.done_bytes < job.nbytes and not job.demand:
                with self._cond:
                    if job.abort:  # a policy's cancel: stop here
                        self.stats.busy_s += time.perf_counter() - t0
                        self._finish(job, JobState.ABORTED)
                        return
                    if self._demand_queued > 0:  # yield to a waiting demand load
                        job.state = JobState.QUEUED
                        job.preemptions += 1
                        self.stats.preemptions += 1
                        self._push(job)
                        self.stats.busy_s += time.perf_counter() - t0
                        return
        with self._cond:
            self.stats.busy_s += time.perf_counter() - t0
            self._finish(job, JobState.DONE)
