"""The serving engine: one thread runs the model, requests join at iteration boundaries.

Requests (:class:`Job`) wait in a bounded queue; at every iteration boundary the engine
admits them first come, first served until ``max_batch`` run (the simulator's
``ContinuousBatcher``), and runs one packed forward of every running request
(:class:`realrun.continuous.PackedBatch`: a joining request's prompt beside the others'
decode tokens, no padding) on the :class:`~realrun.session.RunSession`, which drives the
policy, the expert caches and the copy engines exactly as ``fmoe run --batching
continuous`` does. Each request's next token is its own choice (realrun.serve.sampling),
so a greedy request gets what it would get alone: the packed forward differs from a solo
one by float rounding only.

A request finishes after the forward that made its last token: ``max_tokens`` reached,
an end-of-sequence token, a stop string, or a cancellation (its client went away) seen
by then. Finished requests are reported to the policy in that iteration's end, as every
executor reports them, and (with ``record``) go to the routing recorder with the tokens
they generated, tagged with the iteration they joined (``served_iteration``): the
simulator's ``--arrivals schedule`` replays that schedule, so the trace reproduces the
server's iterations exactly. A request cancelled before it joined never ran and is not
recorded.

Everything the engine tells a request goes through its ``deliver`` callback, from the
engine thread: :class:`Delta` (new text), then one :class:`Finished` or :class:`Failed`.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from realrun.continuous import PackedBatch
from realrun.prompting import Prompt
from realrun.serve.sampling import SamplingParams, next_tokens
from realrun.serve.text import TextAssembler
from realrun.session import RunSession


@dataclass(frozen=True)
class Delta:
    """New answer text of a request."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The request is over: ``reason`` is ``stop``, ``length`` or ``cancelled``; ``text``
    is the last piece not yet delivered."""

    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The engine could not run the request (an internal error, logged on stderr)."""

    message: str


Event = Delta | Finished | Failed


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests beyond the free batch slots."""


class ShuttingDown(Exception):
    """The engine no longer accepts requests."""


@dataclass
class Job:
    """One request inside the engine. The caller fills the first fields; the engine owns
    the rest. ``deliver`` is called from the engine thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    deliver: Callable[[Event], None]
    prompt_text: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    output_ids: list[int] = field(default_factory=list)
    key: int = -1
    served_iteration: int = -1
    arrival_s: float = 0.0  # on the session's clock
    t_last: float = 0.0
    text: TextAssembler | None = None
    gen: torch.Generator | None = None
    done: bool = False


class EngineListener:
    """What the engine reports as it runs (the metrics implement it); all no-ops here."""

    def queue_changed(self, waiting: int, running: int) -> None:
        """Requests waiting and running now."""

    def first_token(self, job: Job, seconds: float) -> None:
        """``job``'s first token, ``seconds`` after it arrived."""

    def next_token(self, job: Job, seconds: float) -> None:
        """``job``'s later token, ``seconds`` after its previous one."""

    def finished(self, job: Job, reason: str, e2e_s: float) -> None:
        """A request finished (``reason`` as :class:`Finished`)."""

    def iteration(self, engine: ServingEngine) -> None:
        """An iteration ended (engine thread; the session's counters are consistent now)."""


class ServingEngine:
    """Start with :meth:`start`, hand requests to :meth:`submit`, end with :meth:`stop`.

    ``eos_ids`` end a request (the token counts as generated but adds no text);
    ``decode`` turns a request's output ids into text. ``max_batch >= 1`` requests run at
    once; at most ``max_batch + max_queue`` are in the engine (running or waiting)."""

    def __init__(
        self,
        session: RunSession,
        decode: Callable[[list[int]], str],
        *,
        max_batch: int,
        max_queue: int,
        eos_ids: Sequence[int] = (),
        listener: EngineListener | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.session = session
        self.decode = decode
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.eos = frozenset(int(t) for t in eos_ids)
        self.listener = listener or EngineListener()
        self.batch = PackedBatch(session.om.loaded.model)
        self.iterations = 0
        self.recorded: list[tuple[int, int, Any]] = []  # (served iteration, key, trace Request)
        self._keys = itertools.count()
        self._jobs: dict[int, Job] = {}  # running, by key
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fmoe-serve-engine", daemon=True)

    # -- caller side (any thread) ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` or :class:`ShuttingDown` instead."""
        with self._cv:
            if not self._accepting:
                raise ShuttingDown()
            if len(self._waiting) + len(self._jobs) >= self.max_batch + self.max_queue:
                raise QueueFull()
            self._waiting.append(job)
            self._cv.notify()
        self.listener.queue_changed(len(self._waiting), len(self._jobs))

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: it leaves the batch after the forward that runs now (if any)."""
        with self._cv:
            job.cancelled = True
            self._cv.notify()

    def drain(self) -> None:
        """Accept no new request; the ones in the engine keep running."""
        with self._cv:
            self._accepting = False

    def cancel_all(self) -> None:
        """Cancel every request in the engine (each ends as :meth:`cancel` says)."""
        with self._cv:
            for job in [*self._waiting, *self._jobs.values()]:
                job.cancelled = True
            self._cv.notify()

    def stop(self, timeout_s: float | None = None) -> None:
        """Accept nothing more, cancel what waits or runs, and end the thread (after the
        forward that runs now)."""
        with self._cv:
            self._accepting = False
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def running(self) -> int:
        return len(self._jobs)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                joined = self._next_admissions()
                if joined is None:
                    break
                try:
                    self._iteration(joined)
                except Exception:  # a bug or a device error: fail what runs, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail_running("the engine failed while running this request")
        self._cancel_all()

    def _next_admissions(self) -> list[Job] | None:
        """Wait until something can run; pop the jobs that join now (None: stop)."""
        with self._cv:
            while not self._stopping and not self._jobs and not self._waiting:
                self._cv.wait()
            if self._stopping:
                return None
            if any(j.cancelled for j in self._waiting):  # their clients left: free the places
                for job in [j for j in self._waiting if j.cancelled]:
                    self._finish_unstarted(job)  # never ran: nothing to record
                self._waiting = deque(j for j in self._waiting if not j.cancelled)
            joined = []
            while self._waiting and len(self._jobs) + len(joined) < self.max_batch:
                joined.append(self._waiting.popleft())
            for job in joined:
                job.key = next(self._keys)
                self._jobs[job.key] = job
        self.listener.queue_changed(len(self._waiting), len(self._jobs))
        return joined

    def _admit(self, joined: list[Job]) -> None:
        now_s = self.session.now()
        t = time.perf_counter()
        for job in joined:
            job.served_iteration = self.iterations
            job.arrival_s = max(0.0, now_s - (t - job.arrival))
            job.text = TextAssembler(self.decode, job.params.stop)
            job.gen = job.params.generator()
            self.batch.join(job.key, job.prompt_ids)
        self.session.admit([Prompt(j.request_id, j.prompt_ids, j.prompt_text) for j in joined])

    def _iteration(self, joined: list[Job]) -> None:
        if joined:
            self._admit(joined)
        if not self.batch.live:
            return
        live = [self._jobs[lv.index] for lv in self.batch.live]
        rows, forward = self.batch.step([j.request_id for j in live])
        self.session.begin_iteration(rows)
        logits = forward()
        tokens = next_tokens(logits, [j.params for j in live], [j.gen for j in live])
        t = time.perf_counter()
        out: list[tuple[Job, str, str | None]] = []
        for job, tok in zip(live, tokens, strict=True):
            out.append((job, *self._take_token(job, tok, t)))
        finished = tuple(j.request_id for j, _, reason in out if reason is not None)
        self.session.end_iteration(finished)
        self.iterations += 1
        self.batch.advance(tokens)
        self.batch.leave({j.key for j, _, reason in out if reason is not None})
        for job, piece, reason in out:
            if reason is None:
                if piece:
                    job.deliver(Delta(piece))
            else:
                self._finish(job, reason, piece)
        self.listener.iteration(self)

    def _take_token(self, job: Job, tok: int, t: float) -> tuple[str, str | None]:
        """Add ``tok`` to ``job``: the text to send and why it finished (None: it goes on)."""
        first = not job.output_ids
        job.output_ids.append(tok)
        if first:
            self.listener.first_token(job, t - job.arrival)
        else:
            self.listener.next_token(job, t - job.t_last)
        job.t_last = t
        assert job.text is not None
        if tok in self.eos:
            return "", "stop"
        piece = job.text.add(tok)
        if job.text.stopped:
            return piece, "stop"
        if len(job.output_ids) >= job.params.max_tokens:
            return piece, "length"
        if job.cancelled:
            return piece, "cancelled"
        return piece, None

    def _finish(self, job: Job, reason: str, piece: str) -> None:
        """``job`` ran its last forward: record it, free its slot, tell its client."""
        with self._cv:
            self._jobs.pop(job.key, None)
        rec = self.session.recorder
        if rec is not None:
            req = rec.finish_request(job.request_id, len(job.output_ids), job.arrival_s)
            req.tags["served_iteration"] = job.served_iteration
            self.recorded.append((job.served_iteration, job.key, req))
        job.done = True
        rest = job.text.flush() if job.text is not None else ""
        self.listener.finished(job, reason, time.perf_counter() - job.arrival)
        job.deliver(Finished(reason, piece + rest, len(job.prompt_ids), len(job.output_ids)))
        self.listener.queue_changed(len(self._waiting), len(self._jobs))

    def _finish_unstarted(self, job: Job) -> None:
        job.done = True
        self.listener.finished(job, "cancelled", time.perf_counter() - job.arrival)
        job.deliver(Finished("cancelled", "", len(job.prompt_ids), 0))

    def _cancel_all(self) -> None:
        """Stopping: the running requests end where they are; the waiting never start."""
        for job in list(self._jobs.values()):
            self._finish(job, "cancelled", "")
        self.batch.leave({lv.index for lv in self.batch.live})
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for job in waiting:
            self._finish_unstarted(job)
        self.listener.iteration(self)

    def _fail_running(self, message: str) -> None:
        """After an internal error: the running requests fail, the batch starts afresh."""
        rec = self.session.recorder
        with self._cv:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            if rec is not None:
                rec.drop_request(job.request_id)
            job.done = True
            self.listener.finished(job, "error", time.perf_counter() - job.arrival)
            job.deliver(Failed(message))
        self.batch = PackedBatch(self.session.om.loaded.model)
        self.listener.queue_changed(len(self._waiting), 0)

    # -- results -----------------------------------------------------------------------------
    def trace_requests(self) -> list[Any]:
        """Recorded requests (traces.types.Request) in the order they joined the batch."""
        return [req for _, _, req in sorted(self.recorded, key=lambda r: (r[0], r[1]))]
