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
    sizes = seq.step_sizes()
    if sizes.size and int(sizes.max()) > capacity:
        raise ValueError(f"capacity {capacity} is below the largest step ({int(sizes.max())})")
    if nxt is None:
        nxt = next_use(seq)
    keys, start = seq.keys.tolist(), seq.step_start
    steps = seq.num_steps
    slot_of = np.full(seq.num_keys, -1, np.int64)
    slot_key = np.full(capacity, -1, np.int64)
    slot_next = np.full(capacity, NEVER, np.int64)  # position of the key's next demand
    slot_last = np.full(capacity, -1, np.int64)  # position of its last demand
    used = 0
    hits = misses = 0
    for s in range(steps):
        a, b = int(start[s]), int(start[s + 1])
        ahead = (
            horizon
            if iteration_steps is None
            else horizon + iteration_steps - 1 - s % iteration_steps
        )
        seen = int(start[min(s + 1 + ahead, steps)])  # demands before this are foreseen
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
                blind = free & (slot_next >= seen)
                if blind.any():
                    slot = int(np.argmin(np.where(blind, slot_last, NEVER)))
                else:
                    slot = int(np.argmax(np.where(free, slot_next, -1)))
                slot_of[slot_key[slot]] = -1
            slot_of[keys[p]] = slot
            slot_key[slot], slot_next[slot], slot_last[slot] = keys[p], nxt[p], p
    return hits, misses
