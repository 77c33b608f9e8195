"""How far ahead must an eviction see? MIN with a forecast horizon (Belady-H).

The demand-only MIN bound (:func:`traces.cachesim.min_run`) knows every future demand;
LRU knows none. Between them, *Belady-H* knows the next ``horizon`` layer steps exactly
and nothing beyond: on a miss it evicts, among the cached keys not demanded in the
current step, the least recently used key that is not demanded within the next
``horizon`` steps; only when every such key is demanded within the horizon does it evict
the one demanded furthest ahead (MIN's choice). ``horizon=0`` is LRU; a horizon at least
as long as the sequence is MIN.

A policy that forecasts the future (fMoE's maps, a lookahead gate) can at best know the
steps its forecast covers, and then imperfectly, so the hit rate of Belady-H at the
forecast's horizon is an optimistic reference for any eviction driven by that forecast
(a heuristic reference, not a proven bound: a probabilistic forecast may in principle
hedge better than LRU beyond the horizon). It answers "how much of the LRU-to-MIN gap can
knowing the next H iterations close", which is what limits eviction on one GPU, where the
link has no time for prefetches (docs/fmoe.md).

:func:`window_min_run` is the same eviction with the horizon counted in whole
iterations (window-MIN: the next W iterations' routing, the current one included, so
W = 1 is all that a perfect forecast of the running token can know);
:func:`sim.bounds.window_hit_rates` runs it on a simulated run's demand sequence with the
MIN bound's cache, scope and start.

The cache model is :mod:`traces.cachesim`'s: keys of one step pinned together, loads only
on demand, an empty cache at the start; the capacity must hold the largest step (no
waves).
"""

from __future__ import annotations

import numpy as np

from traces.demand import NEVER, DemandSequence, next_use


def horizon_run(
    seq: DemandSequence,
    capacity: int,
    horizon: int,
    nxt: np.ndarray | None = None,
    iteration_steps: int | None = None,
) -> tuple[int, int]:
    """(hits, misses) of Belady-H with ``capacity`` slots over ``seq``, foreseeing the
    next ``horizon`` layer steps (see the module doc).

    ``iteration_steps``: with every iteration exactly this many steps (batch 1: the MoE
    layers), the eviction also sees the rest of the current iteration (what a forecast of
    the running token's later layers can know), then ``horizon`` steps more.

    Contract: ``capacity`` >= the largest step's size (ValueError otherwise) and
    ``horizon >= 0``; ``nxt`` is :func:`traces.demand.next_use` of ``seq`` (computed when
    None). Deterministic: ties (keys never used again) go to the least recently used.
    """
    if horizon < 0:
        raise ValueError("horizon must be >= 0")
    s = np.arange(seq.num_steps, dtype=np.int64)
    ahead = (
        horizon if iteration_steps is None else horizon + iteration_steps - 1 - s % iteration_steps
    )
    seen = seq.step_start[np.minimum(s + 1 + ahead, seq.num_steps)]
    return foresight_run(seq, capacity, seen, nxt)


def window_min_run(
    seq: DemandSequence,
    capacity: int,
    window: int,
    iteration_start: np.ndarray,
    nxt: np.ndarray | None = None,
    initial: np.ndarray | None = None,
) -> tuple[int, int]:
    """(hits, misses) of window-MIN: Belady's choice when the routing of only the next
    ``window`` iterations is known, counted from the current one.

    ``iteration_start``: int [I + 1], the first step of each of the I iterations, then
    ``seq.num_steps`` (strictly increasing from 0). At a step of iteration i the eviction
    sees every demand of iterations i .. i + window - 1 (so ``window=1`` is the rest of
    the running iteration: all that a perfect forecast of the current token can know);
    among the cached keys not pinned by the step it evicts the least recently used one
    not demanded in that window, else (every one is) the one demanded furthest ahead.
    ``window=0`` sees only the current step: LRU. A window of at least I iterations is
    MIN (the same hits as :func:`traces.cachesim.min_run`; a key never used again is
    evicted first either way). ``initial``: keys cached before the first step, least
    recently used first (default empty).

    It is a reference, not a bound on online policies: a policy with a good
    probabilistic forecast beyond the window may beat it, and it is not monotone in
    ``window`` on every sequence (only MIN >= it is a theorem).

    Contract: ``window >= 0``; ``capacity`` >= the largest step (ValueError otherwise);
    ``nxt`` is :func:`traces.demand.next_use` of ``seq`` (computed when None).
    """
    if window < 0:
        raise ValueError("window must be >= 0")
    bounds = np.asarray(iteration_start, np.int64)
    if (
        bounds.size < 1
        or bounds[0] != 0
        or bounds[-1] != seq.num_steps
        or np.any(np.diff(bounds) <= 0)
    ):
        raise ValueError("iteration_start must rise strictly from 0 to the number of steps")
    s = np.arange(seq.num_steps, dtype=np.int64)
    if window == 0:
        last = s + 1
    else:
        it = np.searchsorted(bounds, s, side="right") - 1  # the iteration of each step
        last = bounds[np.minimum(it + window, bounds.size - 1)]
    return foresight_run(seq, capacity, seq.step_start[last], nxt, initial)


def foresight_run(
    seq: DemandSequence,
    capacity: int,
    seen: np.ndarray,
    nxt: np.ndarray | None = None,
    initial: np.ndarray | None = None,
) -> tuple[int, int]:
    """(hits, misses) of the eviction that, at step s, knows exactly the demands before
    position ``seen[s]`` (>= the end of step s) and nothing beyond: on a miss, among the
    cached keys not demanded in step s (pinned), the least recently used one not demanded
    before ``seen[s]``, else the one demanded furthest ahead. The core of
    :func:`horizon_run` and :func:`window_min_run` (their docs give the contract).
    """
    sizes = seq.step_sizes()
    if sizes.size and int(sizes.max()) > capacity:
        raise ValueError(f"capacity {capacity} is below the largest step ({int(sizes.max())})")
    if nxt is None:
        nxt = next_use(seq)
    keys, start = seq.keys.tolist(), seq.step_start
    seen_at = np.asarray(seen, np.int64).tolist()
    slot_of = np.full(seq.num_keys, -1, np.int64)
    slot_key = np.full(capacity, -1, np.int64)
    slot_next = np.full(capacity, NEVER, np.int64)  # position of the key's next demand
    slot_last = np.full(capacity, -1, np.int64)  # position of its last demand
    used = 0
    if initial is not None:
        first = np.full(seq.num_keys, NEVER, np.int64)
        first[seq.keys[::-1]] = np.arange(seq.keys.size - 1, -1, -1)
        for i, k in enumerate(dict.fromkeys(np.asarray(initial, np.int64).tolist())):
            if used == capacity:
                break
            slot_of[k], slot_key[used], slot_next[used] = used, k, first[k]
            slot_last[used] = -capacity + i  # before every demand, in the given order
            used += 1
    hits = misses = 0
    for s in range(seq.num_steps):
        a, b = int(start[s]), int(start[s + 1])
        seen_s = seen_at[s]  # demands before this are foreseen
        missed = []
        for p in range(a, b):
            slot = slot_of[keys[p]]
            if slot >= 0:
                hits += 1
                slot_next[slot], slot_last[slot] = nxt[p], p
            else:
                missed.append(p)
        for p in missed:
            misses += 1
            if used < capacity:
                slot = used
                used += 1
            else:
                free = slot_last < a  # not demanded in this step (pinned otherwise)
                blind = free & (slot_next >= seen_s)
                if blind.any():
                    slot = int(np.argmin(np.where(blind, slot_last, NEVER)))
                else:
                    slot = int(np.argmax(np.where(free, slot_next, -1)))
                slot_of[slot_key[slot]] = -1
            slot_of[keys[p]] = slot
            slot_key[slot], slot_next[slot], slot_last[slot] = keys[p], nxt[p], p
    return hits, misses
