"""Batchers: when requests join the running batch. A registry maps names to classes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from specs.errors import InputError
from traces.types import Workload


class Batcher(ABC):
    """Decides, at an iteration boundary, how many waiting requests to admit (FCFS)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size

    @abstractmethod
    def admit(self, waiting: int, running: int, more_coming: bool) -> int:
        """How many of the ``waiting`` requests join now (0: start no new one yet)."""


class StaticBatcher(Batcher):
    """Batches of B: start when B requests wait (or no more will arrive), run to completion."""

    def admit(self, waiting: int, running: int, more_coming: bool) -> int:
        if running:
            return 0
        if waiting >= self.batch_size or not more_coming:
            return min(waiting, self.batch_size)
        return 0


class ContinuousBatcher(Batcher):
    """Iteration-level batching: fill free slots (up to B running) at every iteration."""

    def admit(self, waiting: int, running: int, more_coming: bool) -> int:
        return max(0, min(waiting, self.batch_size - running))


class ScheduleBatcher(Batcher):
    """Replays a recorded schedule: request i (in trace order) joins once ``iterations()``
    forward passes have run since the start, ``schedule[i]`` (non-decreasing; a served
    trace's ``tags["served_iteration"]``). With nothing running, the next request joins
    at once and the rest of the schedule shifts by the gap (a subset of a trace, say after
    a train/test split, keeps its spacing). The batch size is the schedule's."""

    def __init__(self, schedule: list[int], iterations: Callable[[], int]) -> None:
        super().__init__(batch_size=max(1, len(schedule)))
        self.schedule = schedule
        self.iterations = iterations
        self.admitted = 0
        self.shift = 0

    def admit(self, waiting: int, running: int, more_coming: bool) -> int:
        now = self.iterations()
        k = self.admitted
        if k < len(self.schedule) and not running and self.schedule[k] - self.shift > now:
            self.shift = self.schedule[k] - now
        n = 0
        while (
            k + n < len(self.schedule) and n < waiting and self.schedule[k + n] - self.shift <= now
        ):
            n += 1
        self.admitted += n
        return n


def schedule_batcher(workload: Workload, iterations: Callable[[], int]) -> ScheduleBatcher:
    """The batcher of ``--arrivals schedule``: each request's ``served_iteration`` tag (a
    trace written by ``fmoe serve --capture``); InputError naming the first request without
    one or out of order."""
    schedule: list[int] = []
    for r in workload.requests:
        it = r.tags.get("served_iteration")
        if type(it) is not int or it < 0:
            raise InputError(
                f"request {r.request_id!r}: --arrivals schedule needs an integer "
                "tags.served_iteration >= 0 (traces written by fmoe serve --capture)"
            )
        if schedule and it < schedule[-1]:
            raise InputError(
                f"request {r.request_id!r}: served_iteration {it} comes before the previous "
                f"request's {schedule[-1]} (the schedule must be in trace order)"
            )
        schedule.append(it)
    return ScheduleBatcher(schedule, iterations)


BATCHERS: dict[str, type[Batcher]] = {"static": StaticBatcher, "continuous": ContinuousBatcher}


def make_batcher(name: str, batch_size: int) -> Batcher:
    try:
        return BATCHERS[name](batch_size)
    except KeyError:
        raise InputError(f"unknown batching {name!r} (known: {', '.join(BATCHERS)})") from None
