"""A policy for tests that keeps every event it observes (no prefetch; LRU eviction)."""

from __future__ import annotations

from policies.base import GateOutput, IterationEnd, IterationStart, Policy, RequestArrival


class EventRecorder(Policy):
    """Keeps request arrivals, iteration starts and ends and gates in ``events``, in order."""

    name = "test-recorder"

    def bind(self, ctx):
        super().bind(ctx)
        self.events: list = []

    def on_request_arrival(self, ev: RequestArrival) -> None:
        self.events.append(ev)

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.events.append(ev)

    def on_gate(self, ev: GateOutput) -> None:
        self.events.append(ev)

    def on_iteration_end(self, ev: IterationEnd) -> None:
        self.events.append(ev)
