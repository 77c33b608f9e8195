"""The numba kernels of :mod:`traces.cachesim` and :func:`traces.demand.next_use`.

Imported only for inputs large enough to pay for it: importing numba and loading the
compiled kernels (``cache=True``: compiled once per machine, then loaded) costs about
half a second per process, more than small runs take in pure Python.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NEVER = np.iinfo(np.int64).max  # as traces.demand.NEVER
LRU, LFU, MIN = 0, 1, 2


@njit(cache=True)
def _next_use(keys, num_keys):
    out = np.empty(keys.size, np.int64)
    last = np.full(num_keys, NEVER, np.int64)
    for i in range(keys.size - 1, -1, -1):
        k = keys[i]
        out[i] = last[k]
        last[k] = i
    return out


@njit(cache=True)
def _push(hv, hk, n, v, k):  # max-heap on hv; returns the new size (arrays may grow)
    if n == hv.size:
        hv2 = np.empty(2 * n + 16, np.int64)
        hk2 = np.empty(2 * n + 16, np.int64)
        hv2[:n] = hv[:n]
        hk2[:n] = hk[:n]
        hv, hk = hv2, hk2
    i = n
    hv[i] = v
    hk[i] = k
    while i > 0:
        p = (i - 1) >> 1
        if hv[p] >= hv[i]:
            break
        hv[p], hv[i] = hv[i], hv[p]
        hk[p], hk[i] = hk[i], hk[p]
        i = p
    return hv, hk, n + 1


@njit(cache=True)
def _pop(hv, hk, n):  # removes the top; returns the new size
    n -= 1
    hv[0] = hv[n]
    hk[0] = hk[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and hv[c + 1] > hv[c]:
            c += 1
        if hv[i] >= hv[c]:
            break
        hv[c], hv[i] = hv[i], hv[c]
        hk[c], hk[i] = hk[i], hk[c]
        i = c
    return n


@njit(cache=True)
def _min_kernel(keys, step_start, nxt, num_keys, capacity, lo_step, hi_step, initial, free_init):
    """MIN over steps [lo_step, hi_step) (see :func:`min_run`). ``initial``: keys cached at the start; with
    ``free_init``, instead the first ``capacity`` distinct keys of the range (the best
    free start). Next uses at or after the range end count as never. Returns
    (hits, misses)."""
    lo = step_start[lo_step]
    hi = step_start[hi_step]
    cached = np.zeros(num_keys, np.bool_)
    cur = np.full(num_keys, NEVER, np.int64)  # next use of each cached key
    stamp = np.full(num_keys, -1, np.int64)  # the step a key was last demanded in
    hv = np.empty(max(16, 2 * (hi - lo) + capacity), np.int64)
    hk = np.empty(hv.size, np.int64)
    n = 0
    used = 0
    if free_init:
        for i in range(lo, hi):
            if used >= capacity:
                break
            k = keys[i]
            if not cached[k]:
                cached[k] = True
                cur[k] = i
                hv, hk, n = _push(hv, hk, n, i, k)
                used += 1
    else:
        first = np.full(num_keys, NEVER, np.int64)
        for i in range(hi - 1, lo - 1, -1):
            first[keys[i]] = i
        for j in range(initial.size):
            k = initial[j]
            if not cached[k] and used < capacity:
                cached[k] = True
                cur[k] = first[k]
                hv, hk, n = _push(hv, hk, n, first[k], k)
                used += 1
    hits = 0
    misses = 0
    stash_v = np.empty(64, np.int64)
    stash_k = np.empty(64, np.int64)
    for s in range(lo_step, hi_step):
        a, b = step_start[s], step_start[s + 1]
        waves = b - a > capacity
        for i in range(a, b):  # hits first: what is resident when the step starts
            k = keys[i]
            if cached[k]:
                hits += 1
                v = nxt[i] if nxt[i] < hi else NEVER
                cur[k] = v
                stamp[k] = s
                hv, hk, n = _push(hv, hk, n, v, k)
        ns = 0  # this step's keys popped from the heap, kept aside until the step ends
        for i in range(a, b):
            k = keys[i]
            if stamp[k] == s:
                continue
            misses += 1
            v = nxt[i] if nxt[i] < hi else NEVER
            cached[k] = True
            cur[k] = v
            stamp[k] = s
            hv, hk, n = _push(hv, hk, n, v, k)
            used += 1
            while used > capacity:  # evict the key used furthest ahead
                v, c = hv[0], hk[0]
                n = _pop(hv, hk, n)
                if not cached[c] or cur[c] != v:
                    continue  # stale
                if stamp[c] == s and not waves:  # pinned with the step: keep aside
                    if ns == stash_v.size:
                        stash_v = np.concatenate((stash_v, np.empty(ns, np.int64)))
                        stash_k = np.concatenate((stash_k, np.empty(ns, np.int64)))
                    stash_v[ns] = v
                    stash_k[ns] = c
                    ns += 1
                    continue
                cached[c] = False
                used -= 1
        for j in range(ns):
            hv, hk, n = _push(hv, hk, n, stash_v[j], stash_k[j])
    return hits, misses


@njit(cache=True)
def _stack_kernel(keys, step_start, nxt, num_keys, kind, group):
    """Depth histogram; keys ``k`` with equal ``k // group`` share one stack (one cache)."""
    state = _stack_state(num_keys, group)
    _stack_chunk(keys, step_start, nxt, kind, group, 0, 0, keys.size + 1, *state)
    return state[-1]


@njit(cache=True)
def _stack_state(num_keys, group):
    """Fresh state of :func:`_stack_chunk`: (stack, depth, prio, count, stamp, hist)."""
    ngroups = (num_keys + group - 1) // group
    return (
        np.empty((ngroups, group), np.int64),
        np.zeros(ngroups, np.int64),
        np.zeros(num_keys, np.int64),
        np.zeros(num_keys, np.int64),
        np.full(num_keys, -1, np.int64),
        np.zeros(group + 1, np.int64),  # hist[d]: demands found at depth d (1-based)
    )


@njit(cache=True)
def _stack_chunk(
    keys, step_start, nxt, kind, group, step0, pos0, big, stack, depth, prio, count, stamp, hist
):
    """One chunk of whole steps of the stack pass, state carried in the arrays (updated in
    place). ``step_start`` holds the chunk's offsets from 0; ``step0``/``pos0``: the
    chunk's first step and demand in the whole sequence (stamps and priorities are global,
    so chunks give the one-pass result); ``big``: more than the whole sequence's demands."""
    for ls in range(step_start.size - 1):
        s = step0 + ls
        a, b = step_start[ls], step_start[ls + 1]
        for i in range(a, b):  # the whole step is pinned from its start
            stamp[keys[i]] = s
        for i in range(a, b):
            x = keys[i]
            st = stack[x // group]
            n = depth[x // group]
            d = n
            for j in range(n):
                if st[j] == x:
                    d = j
                    break
            if d < n:
                hist[d + 1] += 1
            else:
                depth[x // group] = n + 1
            if d > 0:
                y = st[0]
                y_in = stamp[y] == s
                for j in range(1, d):
                    z = st[j]
                    z_in = stamp[z] == s
                    # keep the higher priority at depth j, carry the lower one down
                    if y_in > z_in or (y_in == z_in and prio[y] > prio[z]):
                        st[j] = y
                        y, y_in = z, z_in
                st[d] = y
            st[0] = x
            if kind == LRU:
                prio[x] = pos0 + i
            elif kind == LFU:
                count[x] += 1
                prio[x] = count[x] * big + pos0 + i
            else:
                prio[x] = -nxt[i]


# -- out of core (traces/cachesim_stream.py): chunks of a spilled demand sequence ------------
@njit(cache=True)
def _next_chunk(keys, base, last, out, never_out):
    """Backward pass over one chunk (chunks taken last to first): ``out[i]`` = the global
    position of the same key's next demand (``never_out`` for none); ``last[k]``: key k's
    first position from this chunk on (NEVER before it is seen), updated in place."""
    for i in range(keys.size - 1, -1, -1):
        k = keys[i]
        v = last[k]
        out[i] = never_out if v == NEVER else v
        last[k] = base + i


@njit(cache=True)
def _up(hv, hk, pos, i):  # indexed max-heap: move entry i up to its place
    v, k = hv[i], hk[i]
    while i > 0:
        p = (i - 1) >> 1
        if hv[p] >= v:
            break
        hv[i] = hv[p]
        hk[i] = hk[p]
        pos[hk[i]] = i
        i = p
    hv[i] = v
    hk[i] = k
    pos[k] = i


@njit(cache=True)
def _down(hv, hk, pos, n, i):  # indexed max-heap: move entry i down to its place
    v, k = hv[i], hk[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and hv[c + 1] > hv[c]:
            c += 1
        if v >= hv[c]:
            break
        hv[i] = hv[c]
        hk[i] = hk[c]
        pos[hk[i]] = i
        i = c
    hv[i] = v
    hk[i] = k
    pos[k] = i


@njit(cache=True)
def _min_stream(
    keys, step_start, nxt, s_lo, s_hi, step_base, dev, ndev, capacity, pos, stamp, hv, hk, sc
):  # fmt: skip
    """:func:`_min_kernel`'s steps for the keys of device ``dev`` (``key % ndev == dev``)
    over the chunk's steps [s_lo, s_hi), resumable: the cache persists between calls as
    an indexed max-heap on next use (``hv`` values, ``hk`` keys, ``pos[k]``: key k's
    index, -1 when not in the heap; ``hv``/``hk`` hold ``capacity + 1``), ``stamp[k]``
    (the last global step key k was demanded in, -1 never) and the counters ``sc`` =
    [heap size, used, hits, misses, fill]. A key is cached when it is in the heap or
    set aside while pinned inside a step. ``nxt`` holds global positions (NEVER: none),
    ``step_base`` the chunk's first global step. ``fill`` counts misses that found a
    free slot (no eviction): with an empty start that is min(capacity, distinct keys),
    the free start's saving (traces/cachesim_stream.py). Unlike :func:`_min_kernel`'s
    lazy heap, nothing stale is kept: the heap never exceeds the cache, however long
    the run."""
    n, used, hits, misses, fill = sc[0], sc[1], sc[2], sc[3], sc[4]
    stash = np.empty(capacity + 1, np.int64)  # pinned keys set aside during a step
    stash_v = np.empty(capacity + 1, np.int64)
    for s in range(s_lo, s_hi):
        a, b = step_start[s], step_start[s + 1]
        g = step_base + s
        cnt = b - a
        if ndev > 1:  # (a modulo per key costs as much as the rest with one device)
            cnt = 0
            for i in range(a, b):
                if keys[i] % ndev == dev:
                    cnt += 1
        if cnt == 0:
            continue
        waves = cnt > capacity
        for i in range(a, b):  # hits first: what is resident when the step starts
            k = keys[i]
            if (ndev == 1 or k % ndev == dev) and pos[k] >= 0:
                hits += 1
                stamp[k] = g
                j = pos[k]
                hv[j] = nxt[i]  # later than before (the old next use was this demand)
                _up(hv, hk, pos, j)
        ns = 0
        for i in range(a, b):
            k = keys[i]
            if (ndev > 1 and k % ndev != dev) or stamp[k] == g:
                continue
            misses += 1
            stamp[k] = g
            if used < capacity:
                fill += 1
            elif not waves:  # full: set the step's pinned keys aside, then the new key
                while stamp[hk[0]] == g:  # takes the place of the one used furthest ahead
                    c = hk[0]
                    stash[ns] = c
                    stash_v[ns] = hv[0]
                    ns += 1
                    pos[c] = -1
                    n -= 1
                    hv[0] = hv[n]
                    hk[0] = hk[n]
                    _down(hv, hk, pos, n, 0)
                pos[hk[0]] = -1  # evicted
                hv[0] = nxt[i]
                hk[0] = k
                _down(hv, hk, pos, n, 0)
                continue
            hv[n] = nxt[i]
            hk[n] = k
            _up(hv, hk, pos, n)
            n += 1
            used += 1
            while used > capacity:  # evict the key used furthest ahead
                c, v = hk[0], hv[0]
                n -= 1
                pos[c] = -1
                if n > 0:
                    hv[0] = hv[n]
                    hk[0] = hk[n]
                    _down(hv, hk, pos, n, 0)
                if stamp[c] == g and not waves:  # pinned with the step: set aside
                    stash[ns] = c
                    stash_v[ns] = v
                    ns += 1
                    continue
                used -= 1
        for j in range(ns):  # the pinned keys go back
            hv[n] = stash_v[j]
            hk[n] = stash[j]
            _up(hv, hk, pos, n)
            n += 1
    sc[0], sc[1], sc[2], sc[3], sc[4] = n, used, hits, misses, fill
