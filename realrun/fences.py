"""Slot fences: a copy into a reused slot must not overtake compute still reading it.

When a slot passes to a new expert, kernels that read its previous expert may still be
queued on the compute stream (CUDA runs kernels asynchronously; the host only knows they
were launched). The new expert's copy must wait for them: the residency takes a fence
when it reuses a slot (``CopyJob.after``), and the CUDA mover makes the copy stream wait
for it before the first byte.

Which stream: the one the *compute thread* runs the model on. PyTorch's current CUDA
stream is per thread, and a prefetch's slot is reused on the copy thread, whose current
stream is the device's default stream, not necessarily the model's (a caller may run the
model under ``torch.cuda.stream(s)``). So a fence remembers the compute thread's stream
whenever the compute thread passes a gate (:meth:`SlotFence.observe`) and records on that
stream from whatever thread takes it (:meth:`SlotFence.take`).

On the CPU a layer's compute has finished when its forward returns (and an expert in use
is pinned, never evicted), so there is nothing to wait for: :class:`NoFence`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import torch

S = TypeVar("S")


class SlotFence(Protocol):
    """Where a reused slot's copy must wait (see the module docstring)."""

    def observe(self) -> None:
        """Called on the compute thread: remember the stream it runs the model on."""

    def take(self) -> Any:
        """From any thread: a marker after every kernel queued so far on the remembered
        stream (None: nothing to wait for)."""


class NoFence:
    """The CPU: compute is synchronous, so a reused slot is free at once."""

    def observe(self) -> None:
        """Nothing to remember."""

    def take(self) -> None:
        return None


class StreamFence(Generic[S]):
    """A fence on the compute thread's stream, taken from any thread.

    ``current_stream()`` gives the calling thread's current stream and ``record(stream)``
    a marker after the work queued on it so far (CUDA: an event recorded on the stream).
    Until the first :meth:`observe`, :meth:`take` falls back to the taking thread's own
    current stream (the stream at construction is observed by :func:`fence_for`'s caller).
    """

    def __init__(self, current_stream: Callable[[], S], record: Callable[[S], Any]) -> None:
        self._current = current_stream
        self._record = record
        self._stream: S | None = None

    @property
    def stream(self) -> S | None:
        """The compute stream observed last (None before the first observe)."""
        return self._stream

    def observe(self) -> None:
        self._stream = self._current()  # one rebinding: safe against a concurrent take

    def take(self) -> Any:
        stream = self._stream
        return self._record(stream if stream is not None else self._current())


def _record_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(stream)
    return event


def fence_for(device: torch.device) -> SlotFence:
    """The fence of ``device``'s slots: a CUDA event on the compute stream, or none (CPU)."""
    if device.type != "cuda":
        return NoFence()
    return StreamFence(lambda: torch.cuda.current_stream(device), _record_event)
