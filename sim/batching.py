"""Batchers: when requests join the running batch. A registry maps names to classes."""

from __future__ import annotations

from abc import ABC, abstractmethod

from specs.errors import InputError


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


BATCHERS: dict[str, type[Batcher]] = {"static": StaticBatcher, "continuous": ContinuousBatcher}


def make_batcher(name: str, batch_size: int) -> Batcher:
    try:
        return BATCHERS[name](batch_size)
    except KeyError:
        raise InputError(f"unknown batching {name!r} (known: {', '.join(BATCHERS)})") from None
