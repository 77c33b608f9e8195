"""Run a policy's observe/decide calls on a searcher thread (fMoE step 7).

The inference loop publishes events with :meth:`AsyncPolicyRunner.submit`. A gate
output runs ``on_gate_now`` and then ``on_gate`` (the search), with the orders of the
first delivered before the second starts: they need no search, so they do not wait for it. The orders
the searcher produces either go straight to a ``deliver(tag, decision)`` callback, called
on the searcher thread as soon as each search is done (fMoE's searcher issues its
prefetches itself; the callback must be thread-safe), or, without one, wait to be
collected with :meth:`AsyncPolicyRunner.drain_orders` (merged) or
:meth:`AsyncPolicyRunner.drain_tagged`. Either way they come grouped by the ``tag`` the
event that produced them was submitted with: an executor tags events with its clock, so
orders keep the time the policy was asked, not the time they were applied. The policy's
search never runs on the inference path. Generic over any :class:`Policy`.

Queue bound (``maxsize`` events) and what happens when it is full:
- ``on_full="block"`` (default): ``submit`` waits for room (back-pressure; the searcher
  can never fall more than ``maxsize`` events behind);
- ``on_full="drop"``: gate outputs and expert-use/load notifications are dropped instead
  (counted in ``dropped``); once a gate output of an iteration is dropped, that
  iteration's later gate outputs are dropped too, so the policy never sees a prefix with
  a hole. Request arrivals and iteration starts/ends always block: they carry state the
  policy must not lose.

``eviction_score`` is called by the executor's cache on its own thread and reads the
policy's state directly; policies used here must keep that read safe (fMoE swaps its
prediction array whole instead of writing into it).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PrefetchDecision,
    RequestArrival,
    has_gate_now,
)
from policies.cache import ExpertKey


@dataclass(frozen=True)
class ExpertUsed:
    """Event form of :meth:`Policy.on_expert_used`."""

    key: ExpertKey
    tokens: int
    now: float = 0.0


@dataclass(frozen=True)
class LoadFinished:
    """Event form of :meth:`Policy.on_load_finished`."""

    key: ExpertKey
    by_prefetch: bool
    now: float = 0.0


Event = RequestArrival | IterationStart | GateOutput | IterationEnd | ExpertUsed | LoadFinished
_STOP = object()


def dispatch(policy: Policy, ev: Event) -> None:
    """Call the observe hook of ``policy`` matching the event's type (a gate output:
    ``on_gate_now`` then ``on_gate``, the order executors guarantee)."""
    if isinstance(ev, GateOutput):
        policy.on_gate_now(ev)
        policy.on_gate(ev)
    elif isinstance(ev, ExpertUsed):
        policy.on_expert_used(ev.key, ev.tokens, ev.now)
    elif isinstance(ev, IterationStart):
        policy.on_iteration_start(ev)
    elif isinstance(ev, IterationEnd):
        policy.on_iteration_end(ev)
    elif isinstance(ev, LoadFinished):
        policy.on_load_finished(ev.key, ev.by_prefetch, ev.now)
    elif isinstance(ev, RequestArrival):
        policy.on_request_arrival(ev)
    else:
        raise TypeError(f"not a policy event: {type(ev).__name__}")


class AsyncPolicyRunner:
    """A searcher thread feeding ``policy`` from a bounded queue.

    Contract: one producer thread calls submit/drain_orders/flush/close; the policy is
    touched only by the searcher thread after :meth:`start` (plus ``eviction_score``,
    see the module doc). An exception raised by the policy (or by ``deliver``) stops the
    searcher and is re-raised by the next submit, drain_orders, flush or close.
    """

    def __init__(
        self,
        policy: Policy,
        maxsize: int = 256,
        on_full: Literal["block", "drop"] = "block",
        deliver: Callable[[object, PrefetchDecision], None] | None = None,
    ) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', got {on_full!r}")
        self.policy = policy
        self.on_full = on_full
        self.deliver = deliver
        self.dropped = 0
        self._q: queue.Queue[object] = queue.Queue(maxsize)
        self._lock = threading.Lock()
        self._out: list[tuple[object, PrefetchDecision]] = []
        self._error: BaseException | None = None
        self._failed = False  # once the policy raised, the searcher only drains the queue
        self._dropping_iteration: int | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> AsyncPolicyRunner:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"policy-{self.policy.name}", daemon=True
            )
            self._thread.start()
        return self

    def close(self, timeout: float | None = 10.0) -> None:
        """Process what is queued, stop the thread, re-raise a policy error if any."""
        if self._thread is not None:
            if self._thread.is_alive():
                self._q.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        self._raise_pending()

    def __enter__(self) -> AsyncPolicyRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producer side ----------------------------------------------------------------
    def submit(self, ev: Event, tag: object = None) -> bool:
        """Publish an event; False when it was dropped (``on_full="drop"`` only). The orders
        the policy makes after this event come back from :meth:`drain_tagged` with ``tag``."""
        self._raise_pending()
        if self._thread is None:
            raise RuntimeError("AsyncPolicyRunner.submit before start()")
        if self.on_full == "drop" and isinstance(ev, GateOutput | ExpertUsed | LoadFinished):
            if isinstance(ev, GateOutput) and ev.iteration == self._dropping_iteration:
                self.dropped += 1
                return False
            try:
                self._q.put_nowait((ev, tag))
                return True
            except queue.Full:
                self.dropped += 1
                if isinstance(ev, GateOutput):
                    self._dropping_iteration = ev.iteration
                return False
        self._put_blocking((ev, tag))
        return True

    def _put_blocking(self, ev: object) -> None:
        # poll so a searcher that died while we wait surfaces its error instead of hanging
        while True:
            try:
                self._q.put(ev, timeout=0.05)
                return
            except queue.Full:
                self._raise_pending()

    def flush(self) -> None:
        """Wait until the searcher has processed everything submitted so far."""
        self._raise_pending()
        while self._q.unfinished_tasks and self._error is None:
            with self._q.all_tasks_done:
                self._q.all_tasks_done.wait(0.05)
        self._raise_pending()

    def drain_orders(self) -> PrefetchDecision:
        """Orders and cancellations the searcher produced since the last drain (merged)."""
        out = PrefetchDecision()
        for _, dec in self.drain_tagged():
            out.enqueue.extend(dec.enqueue)
            out.cancel.extend(dec.cancel)
        return out

    def drain_tagged(self) -> list[tuple[object, PrefetchDecision]]:
        """As :meth:`drain_orders`, in the order produced, as (tag, decision) pairs: the
        tag given to :meth:`submit` with the event after which the policy decided them
        (consecutive events of one tag share one pair)."""
        self._raise_pending()
        with self._lock:
            out, self._out = self._out, []
        return out

    # -- searcher side ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is _STOP:
                    return
                if not self._failed:
                    ev, tag = item  # type: ignore[misc]
                    if isinstance(ev, GateOutput) and has_gate_now(self.policy):
                        # the gate's orders that need no search go out before it runs
                        self.policy.on_gate_now(ev)
                        self._emit(tag)
                        self.policy.on_gate(ev)
                    else:
                        dispatch(self.policy, ev)
                    self._emit(tag)
            except BaseException as exc:  # surfaced on the producer thread
                self._error = exc
                self._failed = True
            finally:
                self._q.task_done()

    def _emit(self, tag: object) -> None:
        """Deliver (or keep for a drain) what the policy decided since the last emit."""
        dec = self.policy.decide_prefetch()
        if dec and self.deliver is not None:
            self.deliver(tag, PrefetchDecision(list(dec.enqueue), list(dec.cancel)))
        elif dec:
            with self._lock:
                out = self._out
                if out and out[-1][0] == tag:
                    out[-1][1].enqueue.extend(dec.enqueue)
                    out[-1][1].cancel.extend(dec.cancel)
                else:
                    out.append((tag, PrefetchDecision(list(dec.enqueue), list(dec.cancel))))

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
