"""Timing helpers for microbenchmarks: device-synchronised timers and interleaved medians.

Measurement points are visited round-robin (every point once per round) rather than one
point at a time, so a burst of load from other processes spreads over all points
instead of skewing one of them; each point's figure is the median of its rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch

K = TypeVar("K", bound=Hashable)
Tick = Callable[[int], None]


def _no_tick(_n: int) -> None:
    """Default progress callback: nothing."""


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds ``fn`` takes, the device synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved_medians(
    points: Mapping[K, Callable[[], float]],
    repeats: int,
    tick: Tick = _no_tick,
    warmup: int = 1,
) -> dict[K, float]:
    """Median seconds per point over ``repeats`` rounds (after ``warmup`` unrecorded rounds).

    Each callable runs one measurement and returns its seconds (so it may exclude its own
    setup); ``tick(1)`` is called after every recorded measurement.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    samples: dict[K, list[float]] = {k: [] for k in points}
    for r in range(warmup + repeats):
        for k, fn in points.items():
            s = fn()
            if r >= warmup:
                samples[k].append(s)
                tick(1)
    return {k: statistics.median(v) for k, v in samples.items()}
