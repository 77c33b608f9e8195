"""The copy engine: moves packed experts from the host store into device slots.

One engine per device (each GPU has its own host link). A copy thread serves a priority
queue: demand loads (the compute is waiting) always go first, then prefetches by
descending priority, FIFO among equals. Copies move in chunks of ``chunk_bytes``; at
every chunk boundary a running prefetch yields to a waiting demand load and resumes
later from where it stopped.

Backends (a :class:`Mover` copies one chunk):

- :class:`CpuMover`: a plain memory copy (or a file read) into a CPU slot.
- :class:`CudaMover`: an asynchronous copy from pinned host memory on a dedicated copy
  stream, finished by an event the copy thread waits on (never run on a GPU here).

Link emulation (:class:`LinkEmulation`) makes each transfer take at least
``latency + bytes / bandwidth`` (the thread sleeps to an absolute schedule, so sleep
overshoot does not add up), so PCIe-like stalls can be studied on a CPU-only machine. A
prefetch that resumes after being preempted pays the latency again (a new transfer).
Results that used it say so (``emulated_link``).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch

from calibration.errors import InputError
from realrun.store import ExpertStore

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
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class CopyJob:
    """Copy (layer, expert)'s packed row into ``dst`` (a slot row, ``nbytes`` long)."""

    key: ExpertKey
    dst: torch.Tensor
    nbytes: int
    demand: bool
    priority: float = 0.0
    state: JobState = JobState.QUEUED
    done_bytes: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    finished_at: float = 0.0
    preemptions: int = 0
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


class CopyEngine:
    """A copy thread with a priority queue; all methods are thread-safe.

    Contract: a key has at most one live job; the caller owns the destination slot until
    the job is DONE or cancelled (it must not reuse the slot in between).
    """

    def __init__(
        self,
        store: ExpertStore,
        mover: Mover | None = None,
        link: LinkEmulation | None = None,
        chunk_bytes: int = 1 << 20,
        name: str = "copy",
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.store = store
        self.mover: Mover = mover or CpuMover()
        self.link = link
        self.chunk_bytes = chunk_bytes
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
        """Queue a new job for ``job.key`` (which must have no live job)."""
        with self._cond:
            self._raise_if_failed()
            live = self._jobs.get(job.key)
            if live is not None and live.state in (JobState.QUEUED, JobState.RUNNING):
                raise RuntimeError(f"copy of {job.key} already queued")
            self._jobs[job.key] = job
            self._push(job)
            self._cond.notify_all()

    def promote(self, key: ExpertKey) -> None:
        """Make a pending prefetch of ``key`` a demand load (it goes first, is not preempted)."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.demand or job.state not in (JobState.QUEUED, JobState.RUNNING):
                return
            job.demand = True
            if job.state is JobState.QUEUED:
                self._push(job)
            self._cond.notify_all()

    def reprioritize(self, key: ExpertKey, priority: float) -> None:
        """Change a queued prefetch's priority."""
        with self._cond:
            job = self._jobs.get(key)
            if (
                job is not None
                and job.state is JobState.QUEUED
                and not job.demand
                and job.priority != priority
            ):
                job.priority = priority
                self._push(job)

    def cancel(self, key: ExpertKey) -> bool:
        """Cancel ``key``'s job if it is queued (not being copied right now); True if cancelled."""
        with self._cond:
            job = self._jobs.get(key)
            if job is None or job.state is not JobState.QUEUED:
                return False
            self._cancel(job)
            return True

    def cancel_lowest_prefetch(self) -> ExpertKey | None:
        """Cancel the queued prefetch with the lowest priority; its key, or None if there is none."""
        with self._cond:
            cands = [j for j in self._jobs.values() if j.state is JobState.QUEUED and not j.demand]
            if not cands:
                return None
            job = min(cands, key=lambda j: (j.priority, -j.submitted_at))
            self._cancel(job)
            return job.key

    def is_pending(self, key: ExpertKey) -> bool:
        with self._cond:
            job = self._jobs.get(key)
            return job is not None and job.state in (JobState.QUEUED, JobState.RUNNING)

    def wait(self, key: ExpertKey) -> float:
        """Block until ``key``'s job is done; returns the seconds spent waiting (0 if done)."""
        t0 = time.perf_counter()
        with self._cond:
            while True:
                self._raise_if_failed()
                job = self._jobs.get(key)
                if job is None or job.state in (JobState.DONE, JobState.CANCELLED):
                    break
                self._cond.wait()
        return time.perf_counter() - t0

    def wait_any(self) -> float:
        """Block until some job completes (returns at once if one is waiting in poll())."""
        t0 = time.perf_counter()
        with self._cond:
            while not self._completed:
                self._raise_if_failed()
                if not any(
                    j.state in (JobState.QUEUED, JobState.RUNNING) for j in self._jobs.values()
                ):
                    break
                self._cond.wait()
        return time.perf_counter() - t0

    def poll(self) -> list[CopyJob]:
        """Jobs finished since the last poll, in completion order."""
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

    def _cancel(self, job: CopyJob) -> None:
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
                    job.state = JobState.RUNNING
                self._run(job)
        except BaseException as exc:  # surfaced to the caller on its next call
            with self._cond:
                self._error = exc
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
                    if self._demand_queued > 0:  # yield to a waiting demand load
                        job.state = JobState.QUEUED
                        job.preemptions += 1
                        self.stats.preemptions += 1
                        self._push(job)
                        self.stats.busy_s += time.perf_counter() - t0
                        return
        with self._cond:
            job.state = JobState.DONE
            job.finished_at = time.perf_counter()
            self._completed.append(job)
            self.stats.jobs_done += 1
            self.stats.busy_s += time.perf_counter() - t0
            self._cond.notify_all()
