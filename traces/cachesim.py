"""Fast cache simulations over a demand sequence (numba kernels).

The model is the simulator's for a cache that loads only on demand. A layer step's keys
that are resident when the step starts are hits; every other key of the step is a miss
and is loaded, evicting a cached key when the cache is full. While the cache can hold the
whole step, the step's keys are pinned together and never evicted for each other; a step
larger than the cache runs in waves, and its keys may go once used.

:func:`min_run` runs MIN (Belady) at one capacity in O(N log N) with a lazy max-heap
(numba for large inputs, pure Python for small ones, :mod:`traces.cachesim_jit`): it
evicts the key whose next use is furthest ahead (a key never used again first), the
step's own keys excepted unless the step runs in waves; in waves the key just loaded
may go too once used. It is the optimum over every cache schedule of this model (the
fewest misses, so the fewest loads), checked against a brute force in the tests.

:func:`stack_histogram` runs Mattson's stack algorithm for LRU, LFU or MIN, giving every
capacity at once in one pass of O(N x distinct keys): the cache of size c always holds
the top c keys of the stack, so a demand found at depth d hits every cache of size >= d
(exact because the priorities do not depend on the size: the inclusion property).
Priorities, lowest evicted first, with the keys of the current step above all others
(the pinning; so at every size that holds a step, its resident keys are hits):
- LRU: last use;
- LFU: uses over the whole run so far, then last use (the ``lfu`` policy with
  ``scope="run"``);
- MIN: the soonest next use ranks highest (Belady's OPT stack).
The stack processes a step's keys in ascending order, one at a time, so for a cache
smaller than a step (waves) a key demanded later in the step may be evicted before it is
counted, and the curves there are a one-at-a-time approximation of waves; at sizes that
hold every step the stack's MIN equals :func:`min_run`.
"""

from __future__ import annotations

import heapq

import numpy as np

from traces.demand import JIT_MIN_DEMANDS, NEVER, DemandSequence, next_use

KINDS = {"lru": 0, "lfu": 1, "min": 2}  # as traces.cachesim_jit's LRU, LFU, MIN


def _min_python(keys, step_start, nxt, num_keys, capacity, lo_step, hi_step, initial, free_init):
    """:func:`traces.cachesim_jit._min_kernel` in pure Python, the same steps (for small
    inputs, where importing numba costs more than it saves). Returns (hits, misses)."""
    st = step_start[lo_step : hi_step + 1].tolist()
    lo, hi = st[0], st[-1]
    ks = keys[lo:hi].tolist()
    nx = [v if v < hi else NEVER for v in nxt[lo:hi].tolist()]
    cur: dict[int, int] = {}  # cached key -> its next use
    stamp: dict[int, int] = {}
    heap: list[tuple[int, int]] = []  # (-next use, key): a max-heap on the next use
    if free_init:
        for i, k in enumerate(ks):
            if len(cur) >= capacity:
                break
            if k not in cur:
                cur[k] = lo + i
                heap.append((-(lo + i), k))
    else:
        first: dict[int, int] = {}
        for i in range(len(ks) - 1, -1, -1):
            first[ks[i]] = lo + i
        for k in initial.tolist():
            if k not in cur and len(cur) < capacity:
                cur[k] = first.get(k, NEVER)
                heap.append((-cur[k], k))
    heapq.heapify(heap)
    push, pop, cur_get, stamp_get = heapq.heappush, heapq.heappop, cur.get, stamp.get
    hits = misses = 0
    for s in range(lo_step, hi_step):
        a, b = st[s - lo_step] - lo, st[s - lo_step + 1] - lo
        waves = b - a > capacity
        missing = []
        for i in range(a, b):  # hits first: what is resident when the step starts
            k = ks[i]
            if k in cur:
                hits += 1
                v = nx[i]
                cur[k] = v
                stamp[k] = s
                push(heap, (-v, k))
            else:
                missing.append(i)
        stash = []
        for i in missing:
            k = ks[i]
            misses += 1
            v = nx[i]
            cur[k] = v
            stamp[k] = s
            push(heap, (-v, k))
            while len(cur) > capacity:  # evict the key used furthest ahead
                v, c = pop(heap)
                if cur_get(c) != -v:
                    continue  # stale
                if not waves and stamp_get(c) == s:  # pinned with the step: keep aside
                    stash.append((v, c))
                    continue
                del cur[c]
        for e in stash:
            push(heap, e)
    return hits, misses


def min_run(
    seq: DemandSequence,
    capacity: int,
    *,
    nxt: np.ndarray | None = None,
    initial: np.ndarray | None = None,
    steps: tuple[int, int] | None = None,
    free_start: bool = False,
    jit: bool | None = None,
) -> tuple[int, int]:
    """(hits, misses) of MIN with ``capacity`` slots over ``seq`` (or its ``steps`` range).

    ``initial``: keys cached before the first step (a warm start; default empty).
    ``free_start``: start instead from the best possible cache (the first ``capacity``
    distinct keys of the range, Belady's choice), so ``misses`` is the fewest loads any
    schedule must make inside the range. ``nxt``: :func:`traces.demand.next_use` of
    ``seq`` (computed when None). ``jit``: the numba kernel (True) or pure Python
    (False); by default numba from ``JIT_MIN_DEMANDS`` demands on. Both give the same
    result. Contract: ``capacity >= 1``.
    """
    if capacity < 1:
        raise ValueError("capacity must be >= 1")
    lo, hi = steps if steps is not None else (0, seq.num_steps)
    if nxt is None:
        nxt = next_use(seq)
    init = np.zeros(0, np.int64) if initial is None else np.asarray(initial, np.int64)
    args = (seq.keys, seq.step_start, nxt, seq.num_keys, int(capacity), lo, hi, init, free_start)
    if jit is None:
        jit = seq.step_start[hi] - seq.step_start[lo] >= JIT_MIN_DEMANDS
    if jit:
        from traces.cachesim_jit import _min_kernel

        h, m = _min_kernel(*args)
    else:
        h, m = _min_python(*args)
    return int(h), int(m)


def stack_histogram(
    seq: DemandSequence, kind: str, nxt: np.ndarray | None = None, group: int | None = None
) -> np.ndarray:
    """int64 [group + 1]: ``h[d]`` = demands found at stack depth d under ``kind``
    (``lru``, ``lfu`` or ``min``); ``h[1:c + 1].sum()`` is the hits with c slots.

    ``group``: keys ``k`` with equal ``k // group`` share a cache and the others do not
    (``group = J`` gives one cache per layer, each of c slots); default one cache."""
    code = KINDS[kind]
    if kind == "min" and nxt is None:
        nxt = next_use(seq)
    if nxt is None:
        nxt = np.zeros(seq.keys.size, np.int64)
    from traces.cachesim_jit import _stack_kernel

    g = seq.num_keys if group is None else group
    return _stack_kernel(seq.keys, seq.step_start, nxt, seq.num_keys, code, g)


def hits_by_capacity(
    seq: DemandSequence, kind: str, nxt: np.ndarray | None = None, group: int | None = None
) -> np.ndarray:
    """int64: hits with c slots (per ``group``, see :func:`stack_histogram`) at index c."""
    return np.cumsum(stack_histogram(seq, kind, nxt, group))
