"""MIN (Belady) and the stack passes out of core: :func:`traces.cachesim.min_run`'s and
:func:`traces.cachesim.stack_histogram`'s results over a spilled demand sequence
(:class:`traces.demand_file.DemandFile`), in memory independent of its length.

:func:`stack_histograms` runs any number of stack passes (LRU, LFU, MIN; one cache or
one per group) in one read of the chunks; each pass carries its stack between chunks
with global step and demand numbers, so its histogram is the one-pass result exactly.

One forward pass over the chunks runs, with the numba kernel
:func:`traces.cachesim_jit._min_stream`:

- the run's MIN, one cache per device (device ``d`` of ``n`` holds the keys with
  ``key % n == d``), from empty or from given keys (a warm start);
- any number of *windows* (step ranges, e.g. a request's decode iterations), each its own
  MIN from the best free start, every device at once; at most the windows open at one
  time are held (with batch B, about B of them).

Why the results equal :func:`min_run`'s on each device's sub-sequence exactly:

1. Next uses are positions in the whole sequence, not in a device's sub-sequence; the map
   between the two is increasing, so every comparison MIN makes is the same.
2. A window's MIN sees next uses past the window's end as they are, where ``min_run``
   caps them to "never". Keys not demanded again inside the window are interchangeable
   for the rest of it (only whether one is pinned by the current step matters, and both
   prefer an unpinned one), so either choice among them leaves the same hits and misses.
3. A free start (Belady's: the first ``capacity`` distinct keys of the window) is an
   empty start whose first ``min(capacity, distinct keys)`` loads are free: until the
   first eviction both hold the same keys with the same next uses and step stamps, and
   the kernel counts those loads (``fill``, a miss that finds a free slot).
4. Ties between equal next uses (several keys never used again) are broken by heap
   layout, which differs from ``min_run``'s lazy heap (this one is indexed: a hit
   updates its key in place); by (2) the counts do not depend on it.

The tests compare every result with ``min_run`` on random sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from traces.demand_file import ChunkData, DemandFile


@dataclass
class _Cache:
    """MIN's state for one cache per device: per-key arrays shared by the devices (their
    keys are disjoint), one indexed heap and counter row [heap size, used, hits, misses,
    fill] per device (see :func:`traces.cachesim_jit._min_stream`)."""

    pos: np.ndarray
    stamp: np.ndarray
    heaps: list[tuple[np.ndarray, np.ndarray]]
    sc: np.ndarray

    @classmethod
    def empty(cls, num_keys: int, capacities: np.ndarray) -> _Cache:
        heaps = [
            (np.empty(int(c) + 1, np.int64), np.empty(int(c) + 1, np.int64)) for c in capacities
        ]
        return cls(
            np.full(num_keys, -1, np.int64),
            np.full(num_keys, -1, np.int64),
            heaps,
            np.zeros((capacities.size, 5), np.int64),
        )


@dataclass
class StreamResult:
    """``hits``, ``misses``: int64 [devices] of the run's MIN; ``window_loads``: int64
    [windows, devices], each window's MIN misses from the best free start (the fewest
    loads inside it)."""

    hits: np.ndarray
    misses: np.ndarray
    window_loads: np.ndarray


def _run(cache: _Cache, data: ChunkData, lo: int, hi: int, capacities: np.ndarray) -> None:
    from traces.cachesim_jit import _min_stream

    ndev = len(cache.heaps)
    base = data.chunk.step0
    for d, (hv, hk) in enumerate(cache.heaps):
        _min_stream(
            data.keys, data.step_start, data.nxt, lo, hi, base, d, ndev, int(capacities[d]),
            cache.pos, cache.stamp, hv, hk, cache.sc[d],
        )  # fmt: skip


def _warm(cache: _Cache, initial: list[np.ndarray], first: np.ndarray, caps: np.ndarray) -> None:
    """Cache each device's ``initial`` keys (distinct, in order, up to its capacity), each
    with its first use as next use, as ``min_run(initial=...)`` does."""
    from traces.cachesim_jit import _up

    for d, keys in enumerate(initial):
        _, idx = np.unique(keys, return_index=True)
        take = keys[np.sort(idx)][: int(caps[d])]
        hv, hk = cache.heaps[d]
        for j, k in enumerate(take.tolist()):
            hv[j], hk[j] = first[k], k
            _up(hv, hk, cache.pos, j)
        cache.sc[d, 0] = cache.sc[d, 1] = take.size


def min_stream(
    dfile: DemandFile,
    capacities: list[int],
    initial: list[np.ndarray] | None = None,
    windows: tuple[np.ndarray, np.ndarray] | None = None,
) -> StreamResult:
    """MIN over ``dfile`` (finished) with ``capacities[d]`` slots on device d (see the
    module doc). ``initial[d]``: global keys on device d's cache at the start (default
    empty). ``windows``: (start steps, end steps), each window [start, end) non-empty;
    its loads come back in the given order. Contract: every capacity >= 1."""
    caps = np.asarray(capacities, np.int64)
    if caps.size == 0 or (caps < 1).any():
        raise ValueError("capacities must be >= 1")
    K = dfile.num_keys
    main = _Cache.empty(K, caps)
    if initial is not None:
        _warm(main, [np.asarray(x, np.int64) for x in initial], dfile.first, caps)
    ws, we = windows if windows is not None else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ws, we = np.asarray(ws, np.int64), np.asarray(we, np.int64)
    if (we <= ws).any():
        raise ValueError("every window must hold at least one step")
    order = np.argsort(ws, kind="stable")
    loads = np.zeros((ws.size, caps.size), np.int64)
    nxt_w = 0  # next window (in start order) to open
    open_: dict[int, _Cache] = {}
    for data in dfile.chunks():
        s0, s1 = data.chunk.step0, data.chunk.step0 + data.chunk.steps
        _run(main, data, 0, s1 - s0, caps)
        while nxt_w < order.size and ws[order[nxt_w]] < s1:
            open_[int(order[nxt_w])] = _Cache.empty(K, caps)
            nxt_w += 1
        for w in list(open_):
            c = open_[w]
            _run(c, data, max(int(ws[w]), s0) - s0, min(int(we[w]), s1) - s0, caps)
            if we[w] <= s1:
                loads[w] = c.sc[:, 3] - c.sc[:, 4]  # misses less the free start's loads
                del open_[w]
    if open_ or nxt_w < order.size:
        raise ValueError("a window ends past the demand sequence")
    return StreamResult(main.sc[:, 2].copy(), main.sc[:, 3].copy(), loads)


def stack_histograms(dfile: DemandFile, passes: list[tuple[str, int]]) -> list[np.ndarray]:
    """:func:`traces.cachesim.stack_histogram` of the spilled sequence for each
    (kind, group) of ``passes``, in one read of its chunks (after ``dfile.finish()``)."""
    from traces.cachesim import KINDS
    from traces.cachesim_jit import _stack_chunk, _stack_state

    states = [_stack_state(dfile.num_keys, g) for _, g in passes]
    big = dfile.num_demands + 1
    for data in dfile.chunks():
        c = data.chunk
        for (kind, g), state in zip(passes, states, strict=True):
            _stack_chunk(
                data.keys, data.step_start, data.nxt, KINDS[kind], g, c.step0, c.demand0, big,
                *state,
            )  # fmt: skip
    return [state[-1] for state in states]
