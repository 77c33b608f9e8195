"""Timing helpers for microbenchmarks: device-synchronised timers, interleaved rounds.

Measurement points are visited round-robin (every point once per round) rather than one
point at a time, so a burst of load from other processes spreads over all points
instead of skewing one of them.

A point's figure is the lower quartile of its samples (:func:`robust_time`), not the
median: on a shared machine other processes only ever add time (time slices, cache and
memory-bandwidth theft), and bursts of such load lasting seconds moved medians of the
same point by up to 70 % between two bench runs here, the lower quartile by far less.
It is the machine's own cost with the least contention still typical of it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TypeVar

import numpy as np
import torch

K = TypeVar("K", bound=Hashable)
Tick = Callable[[int], None]


def load_average() -> float | None:
    """The 1-minute load average (runnable processes; None where the OS has none): timings
    on a shared machine are only as good as this was low while they ran."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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


QUANTILE = 0.25


def robust_time(samples: Iterable[float]) -> float:
    """The lower quartile of ``samples`` (see the module docstring)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")
    return float(np.quantile(xs, QUANTILE))


def spread_of(samples: Iterable[float]) -> float | None:
    """(q75 - q25) / median of ``samples``: the repeats' relative spread (None for fewer
    than two samples or a zero median)."""
    xs = sorted(samples)
    if len(xs) < 2:
        return None
    q25, med, q75 = np.quantile(xs, [0.25, 0.5, 0.75])
    return float((q75 - q25) / med) if med > 0 else None


def interleaved_times(
    points: Mapping[K, Callable[[], float]],
    repeats: int,
    tick: Tick = _no_tick,
    burst: int = 2,
) -> dict[K, float]:
    """:func:`robust_time` per point over ``repeats`` rounds of ``burst`` measurements each.

    Each callable runs one measurement and returns its seconds (so it may exclude its own
    setup). Every visit to a point first runs it once unrecorded: the caches, prefetchers
    and allocator state the previous point left (a 128-token GEMM before a 1-token GEMV
    slows the latter by ~15 % on a CPU) would otherwise bias small points.
    ``tick(1)`` is called after every visit.
    """
    if repeats < 1 or burst < 1:
        raise ValueError("repeats and burst must be >= 1")
    samples: dict[K, list[float]] = {k: [] for k in points}
    for _ in range(repeats):
        for k, fn in points.items():
            fn()
            samples[k].extend(fn() for _ in range(burst))
            tick(1)
    return {k: robust_time(v) for k, v in samples.items()}
