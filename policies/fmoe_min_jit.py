"""numba kernel of fMoE's MIN labels (``min_labels``, :mod:`policies.fmoe_minlabel`):
Belady's MIN run on a demand sequence, each demand labelled by whether MIN keeps its
expert until the expert's next demand (OPTgen's question, Hawkeye's training label).
Self-contained (numba's cache keys a kernel on its own file)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def min_labels(keys, step_start, num_keys, capacity):  # noqa: ANN001, ANN201 - numba
    """int8 [N]: 1 where MIN with ``capacity`` slots (loads on demand, the keys of one
    step pinned together, an empty cache at the start) keeps demand n's key until its
    next demand (a hit there), else 0 (evicted first, or never demanded again).

    ``keys`` int [N] in 0..num_keys-1, distinct within a step; ``step_start`` int64
    [S + 1]. A step larger than ``capacity`` evicts nothing it holds and loads over
    capacity for that step (no such step on the caches fMoE runs: the cache holds top-K
    per layer). Victim: the cached key not in the step whose next demand is furthest
    (never demanded again first; ties to the earlier slot). O(N x capacity)."""
    N = keys.shape[0]
    never = N + 1
    nxt = np.full(N, never, np.int64)
    last = np.full(num_keys, -1, np.int64)
    for n in range(N - 1, -1, -1):
        k = keys[n]
        if last[k] >= 0:
            nxt[n] = last[k]
        last[k] = n
    hit = np.zeros(N, np.int8)
    slot_of = np.full(num_keys, -1, np.int64)
    slot_key = np.full(max(capacity, 1) + N, -1, np.int64)  # room for an oversized step
    slot_next = np.zeros(slot_key.shape[0], np.int64)
    step_of = np.full(num_keys, -1, np.int64)
    used = 0
    S = step_start.shape[0] - 1
    for s in range(S):
        for n in range(step_start[s], step_start[s + 1]):
            step_of[keys[n]] = s
        for n in range(step_start[s], step_start[s + 1]):
            k = keys[n]
            q = slot_of[k]
            if q >= 0:
                hit[n] = 1
                slot_next[q] = nxt[n]
                continue
            if used < capacity:
                q = used
                used += 1
            else:
                best = -1
                for c in range(used):
                    if step_of[slot_key[c]] == s:
                        continue
                    if best < 0 or slot_next[c] > slot_next[best]:
                        best = c
                if best < 0:  # every slot holds this step's keys: over capacity
                    q = used
                    used += 1
                else:
                    q = best
                    slot_of[slot_key[q]] = -1
            slot_key[q] = k
            slot_next[q] = nxt[n]
            slot_of[k] = q
    label = np.zeros(N, np.int8)
    for n in range(N):
        if nxt[n] < never and hit[nxt[n]] == 1:
            label[n] = 1
    return label
