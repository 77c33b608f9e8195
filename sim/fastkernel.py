"""The numba kernel of the compiled engine path (:mod:`sim.engine_fast`): one iteration's
decoder layers, with the expert caches and host->GPU links as arrays.

It does, step for step and float operation for float operation, what
:meth:`sim.engine.Engine._iteration`, :mod:`sim.engine_layer`, :class:`sim.link.Link` and
:class:`policies.cache.ExpertCache` do for the runs :mod:`sim.engine_fast` admits: demand
loads only (no prefetch, no cancel, no other miss action), one copy per link at a time
and no host-side cap (so a link's queue is FIFO and it has at most one event queued), no
copy interference, no event log, and waves only on a one-GPU machine (the caller runs
other wave iterations on the Python engine). The Python engine is the reference;
``tests/test_engine_fast.py`` holds them equal.

Imported only when a run takes the compiled path: importing numba and loading the
compiled kernel (``cache=True``: compiled once per machine) costs a fraction of a second.

Over 450 lines on purpose: numba's on-disk cache keys a compiled function on its own
source file only, so the kernel and every helper it inlines live in one module (a helper
edited in another file would leave a stale cached kernel behind).

Every function is compiled with ``_nrt=False`` (numba's reference counting off): nothing
here allocates an array, and with it on, each array passed between the (inlined) helpers
costs an atomic increment and decrement, which took most of the kernel's time.

The kernel stops where the engine would yield to simpy (an arrival at or before its next
action or during a wait; a wave's step of the clock) and returns a code; the caller
yields and calls it again, and it resumes where it stopped (``isc[I_PHASE]``,
``isc[I_POS]``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# -- layout of the state arrays (indices) -------------------------------------------------
# isc: int64 scalars
I_PHASE, I_POS, I_GATESEQ, I_STEPS, I_EVSEQ, I_NUSED, I_NPEND, I_STEP = 0, 1, 2, 3, 4, 5, 6, 7
I_EVICT, I_AFTER, I_EBYTES, I_J, I_NITEMS, I_NMISSED, I_MARK, I_NGPU = 8, 9, 10, 11, 12, 13, 14, 15
I_COUNTS = 16  # 1: count every use in run_uses (the policy's on_expert_used, mirrored)
I_NDEFER, I_DHEAD = 17, 18  # a layer step's deferred keys (waves), and the next to load
N_ISC = 19
# fsc: float64 scalars
F_T, F_NXT, F_STALL, F_TOP, F_IDEAL, F_TLAYER, F_DENSE, F_HAND = 0, 1, 2, 3, 4, 5, 6, 7
F_EXCH, F_OVER, F_HEAD, F_BW, F_LAT, F_SCALE = 8, 9, 10, 11, 12, 13
F_DUE = 14  # Links.due as of the last return (the run loop reads it without a call)
F_NOW, F_TO = 15, 16  # simpy's env.now (set by the caller); the time a YIELD_TO asks for
F_TG, F_WCOMP = 17, 18  # a wave GPU's timeline and its resident experts' compute
N_FSC = 19
# ki: per key (layer * J + expert) ints
K_STATE, K_PINS, K_USES, K_PREV, K_NEXT, K_DEV = 0, 1, 2, 3, 4, 5
K_SEEN = 6  # scratch of needs_waves
N_KI = 7
# kf: per key floats
KF_LAST, KF_LOADED = 0, 1
# gi: per GPU ints (cache, link, counters as policies.cache.CacheCounters names them)
G_HEAD, G_TAIL, G_COUNT, G_CAP, G_NLOAD, G_INORDER, G_QH, G_QN = 0, 1, 2, 3, 4, 5, 6, 7
G_BUSY, G_BYTES, G_EVSEQ, G_SLOW, G_FREES, G_ACTIVE = 8, 9, 10, 11, 12, 13
G_WAVEMARK = 21  # row 0 only: needs_waves' call count
G_DEMANDS, G_HITS, G_MISSES, G_LOADS, G_DLOADS, G_EVICTIONS, G_BYTESLOADED = (
    14,
    15,
    16,
    17,
    18,
    19,
    20,
)
N_GI = 22
# gf: per GPU floats
GF_LATEST, GF_BUSYS, GF_BUSYT0, GF_EVT, GF_COMP, GF_LOAD = 0, 1, 2, 3, 4, 5
N_GF = 6
# work: per distinct expert of a layer step (rows 0..J-1); columns
W_E, W_TOK, W_USED, W_PEND, W_PTOK, W_ABS, W_CNT, W_MISSED, W_MARK = 0, 1, 2, 3, 4, 5, 6, 7, 8
W_DEFER, W_DTOK = 9, 10  # keys that found no slot (later waves) and their rows
N_W = 11

ABSENT, LOADING, RESIDENT = 0, 1, 2
EVICT_RECENCY, EVICT_USES, EVICT_RUN_USES = 0, 1, 2
DONE, YIELD_T, WAIT, NO_LINK, YIELD_TO, BAD = 0, 1, 2, 3, 4, 5
# phases of an iteration
PH_HEAD, PH_LAYER, PH_GATE, PH_WAIT, PH_END, PH_END2, PH_ITER, PH_ITER2 = 0, 1, 2, 3, 4, 5, 6, 7
# waves (one GPU): sync to the clock, start, wait for a wave's loads, after a clock step,
# release the wave and load the next
PH_WSYNC, PH_WSTART, PH_WWAIT, PH_WADV, PH_WUSE = 8, 9, 10, 11, 12


# -- the recency order (a doubly linked list per GPU, oldest first) -----------------------
@njit(cache=True, inline="always", _nrt=False)
def _unlink(ki, gi, k):
    g = ki[k, K_DEV]
    p, n = ki[k, K_PREV], ki[k, K_NEXT]
    if p >= 0:
        ki[p, K_NEXT] = n
    else:
        gi[g, G_HEAD] = n
    if n >= 0:
        ki[n, K_PREV] = p
    else:
        gi[g, G_TAIL] = p


@njit(cache=True, inline="always", _nrt=False)
def _append(ki, gi, k):
    g = ki[k, K_DEV]
    tail = gi[g, G_TAIL]
    ki[k, K_PREV] = tail
    ki[k, K_NEXT] = -1
    if tail >= 0:
        ki[tail, K_NEXT] = k
    else:
        gi[g, G_HEAD] = k
    gi[g, G_TAIL] = k


@njit(cache=True, inline="always", _nrt=False)
def _touched(gi, gf, g, now):
    if now >= gf[g, GF_LATEST]:
        gf[g, GF_LATEST] = now
    else:
        gi[g, G_INORDER] = 0


# -- the cache ------------------------------------------------------------------------------
@njit(cache=True, inline="always", _nrt=False)
def _victim(isc, fsc, ki, kf, gi, g, run_uses):
    """ExpertCache._victim: the lowest (score, key) among resident unpinned entries (no
    entry is protected on this path); -1 when none."""
    kind = isc[I_EVICT]
    if kind == EVICT_RECENCY and gi[g, G_INORDER]:  # ExpertCache._least_recent
        best = -1
        k = gi[g, G_HEAD]
        while k >= 0:
            if best < 0:
                if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0:
                    best = k
            elif kf[k, KF_LAST] != kf[best, KF_LAST]:
                break
            elif ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and k < best:
                best = k
            k = ki[k, K_NEXT]
        return best
    scale = fsc[F_SCALE]
    best = -1
    best_s = 0.0
    k = gi[g, G_HEAD]
    while k >= 0:
        if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0:
            if kind == EVICT_RECENCY:
                s = kf[k, KF_LAST]
            elif kind == EVICT_USES:
                s = float(ki[k, K_USES]) * scale + kf[k, KF_LAST]
            else:
                s = float(run_uses[k]) * scale + kf[k, KF_LAST]
            if best < 0 or s < best_s or (s == best_s and k < best):
                best, best_s = k, s
        k = ki[k, K_NEXT]
    return best


@njit(cache=True, inline="always", _nrt=False)
def _begin_load(isc, fsc, ki, kf, gi, gf, k, now, run_uses):
    """ExpertCache.begin_load(key, now, prefetch=False, pin=True); False when full."""
    g = ki[k, K_DEV]
    while gi[g, G_COUNT] >= gi[g, G_CAP]:
        v = _victim(isc, fsc, ki, kf, gi, g, run_uses)
        if v < 0:
            return False
        _unlink(ki, gi, v)
        ki[v, K_STATE] = ABSENT
        gi[g, G_COUNT] -= 1
        gi[g, G_EVICTIONS] += 1
    ki[k, K_STATE] = LOADING
    kf[k, KF_LOADED] = now
    kf[k, KF_LAST] = now
    ki[k, K_USES] = 0
    ki[k, K_PINS] = 1
    _append(ki, gi, k)
    gi[g, G_COUNT] += 1
    _touched(gi, gf, g, now)
    gi[g, G_NLOAD] += 1
    gi[g, G_LOADS] += 1
    gi[g, G_BYTESLOADED] += isc[I_EBYTES]
    gi[g, G_DLOADS] += 1
    return True


@njit(cache=True, inline="always", _nrt=False)
def _use(ki, kf, gi, gf, k, now):
    """ExpertCache.use(key, now, unpin=True)."""
    ki[k, K_PINS] -= 1
    ki[k, K_USES] += 1
    kf[k, KF_LAST] = now
    _unlink(ki, gi, k)
    _append(ki, gi, k)
    _touched(gi, gf, ki[k, K_DEV], now)


# -- the links --------------------------------------------------------------------------
@njit(cache=True, inline="always", _nrt=False)
def _begin(isc, fsc, gi, gf, g, k, now):
    """Link._begin of a demand load on the link's one channel (new run)."""
    gi[g, G_BUSY] = k
    if gi[g, G_ACTIVE] == 0:
        gf[g, GF_BUSYT0] = now
    gi[g, G_ACTIVE] += 1
    t0 = now + fsc[F_LAT]
    end = t0 + isc[I_EBYTES] / fsc[F_BW]
    gf[g, GF_EVT] = end if end > now else now
    isc[I_EVSEQ] += 1
    gi[g, G_EVSEQ] = isc[I_EVSEQ]


@njit(cache=True, inline="always", _nrt=False)
def _segment_done(isc, fsc, ki, kf, gi, gf, q, g, now):
    """Link._segment_done of a finished demand load, then the next queued one starts."""
    k = gi[g, G_BUSY]
    gi[g, G_BYTES] += isc[I_EBYTES]
    gi[g, G_BUSY] = -1
    gf[g, GF_EVT] = np.inf
    gi[g, G_EVSEQ] = -1
    gi[g, G_ACTIVE] -= 1
    if gi[g, G_ACTIVE] == 0:
        gf[g, GF_BUSYS] += now - gf[g, GF_BUSYT0]
    ki[k, K_STATE] = RESIDENT  # ExpertCache.finish_load
    kf[k, KF_LOADED] = now
    gi[g, G_NLOAD] -= 1
    gi[g, G_FREES] += 1
    if gi[g, G_QN] > 0:
        nq = q.shape[1]
        h = gi[g, G_QH]
        nk = q[g, h]
        gi[g, G_QH] = (h + 1) % nq
        gi[g, G_QN] -= 1
        _begin(isc, fsc, gi, gf, g, nk, now)


@njit(cache=True, inline="always", _nrt=False)
def _next_event(isc, gi, gf):
    """The link whose event comes first (time, then scheduling order); -1 when none."""
    best = -1
    for g in range(isc[I_NGPU]):
        if gi[g, G_EVSEQ] < 0:
            continue
        if (
            best < 0
            or gf[g, GF_EVT] < gf[best, GF_EVT]
            or (gf[g, GF_EVT] == gf[best, GF_EVT] and gi[g, G_EVSEQ] < gi[best, G_EVSEQ])
        ):
            best = g
    return best


@njit(cache=True, inline="always", _nrt=False)
def _due(isc, gi, gf):
    g = _next_event(isc, gi, gf)
    return np.inf if g < 0 else gf[g, GF_EVT]


@njit(cache=True, inline="always", _nrt=False)
def _advance(isc, fsc, ki, kf, gi, gf, q, t):
    while True:
        g = _next_event(isc, gi, gf)
        if g < 0 or gf[g, GF_EVT] > t:
            return
        _segment_done(isc, fsc, ki, kf, gi, gf, q, g, gf[g, GF_EVT])


@njit(cache=True, _nrt=False)
def due(isc, gi, gf):
    """Links.due: the time of the earliest queued link event (inf when none)."""
    return _due(isc, gi, gf)


@njit(cache=True, _nrt=False)
def advance(isc, fsc, ki, kf, gi, gf, q, t):
    """Links.advance(t): every link event at or before ``t``, in time order."""
    _advance(isc, fsc, ki, kf, gi, gf, q, t)
    fsc[F_DUE] = _due(isc, gi, gf)


@njit(cache=True, inline="always", _nrt=False)
def _start_demand(isc, fsc, ki, kf, gi, gf, q, k, now, run_uses):
    """Link.start_demand(key, now): reserve the slot, start the copy or queue it."""
    if not _begin_load(isc, fsc, ki, kf, gi, gf, k, now, run_uses):
        return False
    g = ki[k, K_DEV]
    if gi[g, G_BUSY] < 0 and gi[g, G_QN] == 0:
        _begin(isc, fsc, gi, gf, g, k, now)
    else:
        nq = q.shape[1]
        q[g, (gi[g, G_QH] + gi[g, G_QN]) % nq] = k
        gi[g, G_QN] += 1
    return True


# -- one layer step -------------------------------------------------------------------------
@njit(cache=True, inline="always", _nrt=False)
def _items(isc, ids, layer, work):
    """sim.iteration.layer_items of one layer: distinct experts by id, rows per expert, in
    work[:, W_E], work[:, W_TOK]; returns their number."""
    R, _, K = ids.shape
    J = isc[I_J]
    if R == 1:
        n = K
        for j in range(K):
            e = ids[0, layer, j]
            i = j
            while i > 0 and work[i - 1, W_E] > e:
                work[i, W_E] = work[i - 1, W_E]
                i -= 1
            work[i, W_E] = e
        for j in range(K):
            work[j, W_TOK] = 1
        return n
    n = 0
    for r in range(R):
        for j in range(K):
            e = ids[r, layer, j]
            if work[e, W_CNT] == 0:
                n += 1
            work[e, W_CNT] += 1
    i = 0
    for e in range(J):
        c = work[e, W_CNT]
        if c:
            work[i, W_E] = e
            work[i, W_TOK] = c
            work[e, W_CNT] = 0  # reset for the next layer (other columns than W_E/W_TOK)
            i += 1
    return n


@njit(cache=True, inline="always", _nrt=False)
def _demand(isc, fsc, ki, kf, gi, gf, q, work, et, layer, t, run_uses):
    """LayerSteps._demand: demand and pin the layer's experts, start loading the misses.
    Fills W_USED, W_PEND/W_PTOK, marks missed experts (W_MISSED = step) and slow GPUs
    (G_SLOW = step); returns the number of GPUs with misses."""
    J = isc[I_J]
    step = isc[I_STEP]
    n_items = isc[I_NITEMS]
    for g in range(isc[I_NGPU]):
        gf[g, GF_COMP] = 0.0
    nu = 0
    npend = 0
    nabs = 0
    nslow = 0
    nmiss = 0
    base = layer * J
    for i in range(n_items):
        e = work[i, W_E]
        tok = work[i, W_TOK]
        k = base + e
        g = ki[k, K_DEV]
        ct = et[tok]
        gi[g, G_DEMANDS] += 1
        st = ki[k, K_STATE]
        if st == RESIDENT:
            gi[g, G_HITS] += 1
            ki[k, K_PINS] += 1
            gf[g, GF_COMP] += ct
            work[nu, W_USED] = k
            nu += 1
            continue
        gi[g, G_MISSES] += 1
        nmiss += 1
        work[e, W_MISSED] = step
        if gi[g, G_SLOW] != step:
            gi[g, G_SLOW] = step
            gf[g, GF_LOAD] = 0.0
            nslow += 1
        gf[g, GF_LOAD] += ct
        if st == LOADING:  # pinned; its copy is already a demand load on this path
            ki[k, K_PINS] += 1
            work[npend, W_PEND] = k
            work[npend, W_PTOK] = tok
            npend += 1
            work[nu, W_USED] = k
            nu += 1
        else:
            work[nabs, W_ABS] = i
            nabs += 1
    ndefer = 0
    for a in range(nabs):
        i = work[a, W_ABS]
        k = base + work[i, W_E]
        if not _start_demand(isc, fsc, ki, kf, gi, gf, q, k, t, run_uses):
            work[ndefer, W_DEFER] = k  # no slot: a later wave (a failed start changes nothing)
            work[ndefer, W_DTOK] = work[i, W_TOK]
            ndefer += 1
            continue
        work[npend, W_PEND] = k
        work[npend, W_PTOK] = work[i, W_TOK]
        npend += 1
        work[nu, W_USED] = k
        nu += 1
    isc[I_NUSED] = nu
    isc[I_NPEND] = npend
    isc[I_NMISSED] = nmiss
    isc[I_NDEFER] = ndefer
    isc[I_DHEAD] = 0
    return nslow


@njit(cache=True, inline="always", _nrt=False)
def _timeline(isc, ki, kf, work, et, g, t, comp):
    """LayerSteps._timeline of GPU g from ``t``: ``comp`` of resident experts first, then
    its pending keys (W_PEND, in the order demanded) as they land (or, with
    ``experts_wait_for_loads``, all of them once the last lands)."""
    npend = isc[I_NPEND]
    # this GPU's pending keys, in the order they were demanded (W_ABS: scratch)
    n = 0
    for i in range(npend):
        k = work[i, W_PEND]
        if ki[k, K_DEV] == g:
            work[n, W_ABS] = i
            n += 1
    if isc[I_AFTER] and n:  # one fused call once the last lands
        last = kf[work[work[0, W_ABS], W_PEND], KF_LOADED]
        for j in range(1, n):
            x = kf[work[work[j, W_ABS], W_PEND], KF_LOADED]
            if x > last:
                last = x
        start = t if t >= last else last
        s = 0.0
        for j in range(n):
            s += et[work[work[j, W_ABS], W_PTOK]]
        return start + comp + s
    # sorted by (loaded_at, key): insertion sort of the indices
    for j in range(1, n):
        x = work[j, W_ABS]
        kx = work[x, W_PEND]
        lx = kf[kx, KF_LOADED]
        m = j
        while m > 0:
            y = work[m - 1, W_ABS]
            ky = work[y, W_PEND]
            ly = kf[ky, KF_LOADED]
            if ly > lx or (ly == lx and ky > kx):
                work[m, W_ABS] = y
                m -= 1
            else:
                break
        work[m, W_ABS] = x
    tg = t + comp
    for j in range(n):
        i = work[j, W_ABS]
        ready = kf[work[i, W_PEND], KF_LOADED]
        start = ready if ready > tg else tg
        tg = start + et[work[i, W_PTOK]]
    return tg


@njit(cache=True, inline="always", _nrt=False)
def _timelines(isc, fsc, ki, kf, gi, gf, work, et, t, end):
    """The timelines of every GPU with misses; returns the layer's compute end."""
    step = isc[I_STEP]
    for g in range(isc[I_NGPU]):
        if gi[g, G_SLOW] != step:
            continue
        tg = _timeline(isc, ki, kf, work, et, g, t, gf[g, GF_COMP])
        if tg > end:
            end = tg
    return end


@njit(cache=True, inline="always", _nrt=False)
def _attribute(isc, ids, layer, work, row_off, req_out):
    """LayerSteps._attribute: per request, distinct experts demanded and those that hit."""
    B = row_off.shape[0] - 1
    n = isc[I_NITEMS]
    if B == 1:
        req_out[0, 0] += n
        req_out[0, 1] += n - isc[I_NMISSED]
        return
    step = isc[I_STEP]
    K = ids.shape[2]
    for b in range(B):
        isc[I_MARK] += 1
        mark = isc[I_MARK]
        dem = 0
        hit = 0
        for r in range(row_off[b], row_off[b + 1]):
            for j in range(K):
                e = ids[r, layer, j]
                if work[e, W_MARK] != mark:
                    work[e, W_MARK] = mark
                    dem += 1
                    if work[e, W_MISSED] != step:
                        hit += 1
        req_out[b, 0] += dem
        req_out[b, 1] += hit


@njit(cache=True, _nrt=False)
def iteration(isc, fsc, ki, kf, gi, gf, q, work, ids, row_off, et, plan, req_out, run_uses):
    """Run (or resume) one iteration's layers (Engine._iteration from the head on); returns
    DONE, or YIELD_T / WAIT where the engine yields to simpy (see the module docstring)."""
    ph = isc[I_PHASE]
    t = fsc[F_T]
    nxt = fsc[F_NXT]
    n_plan = plan.shape[0]
    while True:
        if ph == PH_HEAD:
            t += fsc[F_HEAD]
            isc[I_POS] = 0
            ph = PH_LAYER
        if ph == PH_LAYER:
            pos = isc[I_POS]
            if pos >= n_plan:
                ph = PH_ITER
            else:
                moe = plan[pos, 0]
                if plan[pos, 1]:
                    t += fsc[F_HAND]
                t += fsc[F_DENSE]
                if moe < 0:
                    isc[I_POS] = pos + 1
                    continue
                t += fsc[F_OVER]
                ph = PH_GATE
                if nxt <= t:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = _due(isc, gi, gf)
                    return YIELD_T
        if ph == PH_GATE:
            layer = plan[isc[I_POS], 0]
            if _due(isc, gi, gf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, t)
            isc[I_GATESEQ] += 1
            isc[I_STEP] += 1
            isc[I_NITEMS] = _items(isc, ids, layer, work)
            nslow = _demand(isc, fsc, ki, kf, gi, gf, q, work, et, layer, t, run_uses)
            top = gf[0, GF_COMP]
            for g in range(1, isc[I_NGPU]):
                if gf[g, GF_COMP] > top:
                    top = gf[g, GF_COMP]
            fsc[F_TOP] = top
            if nslow == 0:
                fsc[F_TLAYER] = t + top
                ph = PH_END
            else:
                if nslow < 0:
                    fsc[F_T] = t
                    fsc[F_DUE] = _due(isc, gi, gf)
                    return NO_LINK
                ideal = top
                step = isc[I_STEP]
                for g in range(isc[I_NGPU]):
                    if gi[g, G_SLOW] == step:
                        c = gf[g, GF_COMP] + gf[g, GF_LOAD]
                        if c > ideal:
                            ideal = c
                fsc[F_IDEAL] = ideal
                ph = PH_WAIT
                if isc[I_NDEFER]:
                    if isc[I_NGPU] != 1:  # the caller runs such iterations in Python
                        fsc[F_T] = t
                        fsc[F_DUE] = _due(isc, gi, gf)
                        return BAD
                    ph = PH_WSYNC
        if ph == PH_WSYNC:  # LayerSteps._wait_compute: waves act on simpy's clock
            ph = PH_WSTART
            if t > fsc[F_NOW]:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf)
                return YIELD_T
        if ph == PH_WSTART:  # LayerSteps._waves on the one GPU (mine: W_USED)
            fsc[F_TG] = t
            fsc[F_WCOMP] = gf[0, GF_COMP]
            ph = PH_WWAIT
        while ph == PH_WWAIT or ph == PH_WADV:  # one wave: wait on the clock, compute
            if ph == PH_WADV:  # after the clock moved: LayerSteps._wait_clocked's advance
                _advance(isc, fsc, ki, kf, gi, gf, q, fsc[F_NOW])
                ph = PH_WWAIT
            landed = True
            for i in range(isc[I_NPEND]):
                if ki[work[i, W_PEND], K_STATE] != RESIDENT:
                    landed = False
                    break
            if not landed:
                when = _due(isc, gi, gf)
                if when == np.inf:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = when
                    return NO_LINK
                ph = PH_WADV
                if when > fsc[F_NOW]:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_TO] = when
                    fsc[F_DUE] = when
                    return YIELD_TO
                continue
            tg = _timeline(isc, ki, kf, work, et, 0, fsc[F_TG], fsc[F_WCOMP])
            fsc[F_WCOMP] = 0.0
            fsc[F_TG] = tg
            ph = PH_WUSE
            if tg > fsc[F_NOW]:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_TO] = tg
                fsc[F_DUE] = _due(isc, gi, gf)
                return YIELD_TO
        if ph == PH_WUSE:  # release this wave's experts, start the next wave's loads
            now = fsc[F_NOW]
            _advance(isc, fsc, ki, kf, gi, gf, q, now)
            for i in range(isc[I_NUSED]):
                _use(ki, kf, gi, gf, work[i, W_USED], now)
            nu = 0
            npend = 0
            d = isc[I_DHEAD]
            while d < isc[I_NDEFER]:
                k = work[d, W_DEFER]
                if ki[k, K_STATE] != ABSENT:  # a prefetch landed it: not on this path
                    fsc[F_T] = t
                    return BAD
                if not _start_demand(isc, fsc, ki, kf, gi, gf, q, k, now, run_uses):
                    break
                work[npend, W_PEND] = k
                work[npend, W_PTOK] = work[d, W_DTOK]
                npend += 1
                work[nu, W_USED] = k
                nu += 1
                d += 1
            isc[I_DHEAD] = d
            isc[I_NUSED] = nu
            isc[I_NPEND] = npend
            tg = fsc[F_TG]
            if d == isc[I_NDEFER] and npend == 0:  # the last wave is done: the layer's end
                end = t + fsc[F_TOP]
                if tg > end:
                    end = tg
                fsc[F_TLAYER] = end
                fsc[F_STALL] += end - t - fsc[F_IDEAL]
                isc[I_NUSED] = 0  # the waves released their own experts
                ph = PH_END
            elif npend == 0:  # every slot in flight: only with prefetches, not here
                fsc[F_T] = t
                return BAD
            else:
                fsc[F_TG] = tg if tg >= now else now
                ph = PH_WWAIT
                continue
        if ph == PH_WAIT:
            npend = isc[I_NPEND]
            i = 0
            while i < npend:
                if ki[work[i, W_PEND], K_STATE] == RESIDENT:
                    i += 1
                    continue
                when = _due(isc, gi, gf)
                if when == np.inf:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = _due(isc, gi, gf)
                    return NO_LINK
                if nxt <= when:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = _due(isc, gi, gf)
                    return WAIT
                _advance(isc, fsc, ki, kf, gi, gf, q, when)
            t_layer = _timelines(isc, fsc, ki, kf, gi, gf, work, et, t, t + fsc[F_TOP])
            fsc[F_TLAYER] = t_layer
            fsc[F_STALL] += t_layer - t - fsc[F_IDEAL]
            ph = PH_END
        if ph == PH_END:
            t = fsc[F_TLAYER] + fsc[F_EXCH]
            ph = PH_END2
            if nxt <= t:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf)
                return YIELD_T
        if ph == PH_END2:
            layer = plan[isc[I_POS], 0]
            if _due(isc, gi, gf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, t)
            for i in range(isc[I_NUSED]):
                _use(ki, kf, gi, gf, work[i, W_USED], t)
            _attribute(isc, ids, layer, work, row_off, req_out)
            if isc[I_COUNTS]:
                base = layer * isc[I_J]
                for i in range(isc[I_NITEMS]):
                    run_uses[base + work[i, W_E]] += 1
            isc[I_STEPS] += 1
            isc[I_POS] += 1
            ph = PH_LAYER
            continue
        if ph == PH_ITER:
            ph = PH_ITER2
            if nxt <= t:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf)
                return YIELD_T
        if ph == PH_ITER2:
            if _due(isc, gi, gf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, t)
            isc[I_PHASE] = PH_HEAD
            fsc[F_T] = t
            fsc[F_DUE] = _due(isc, gi, gf)
            return DONE


def new_state(num_keys: int, num_gpus: int, num_experts: int, queue: int) -> tuple:
    """Zeroed state arrays (isc, fsc, ki, kf, gi, gf, q, work) for a run."""
    isc = np.zeros(N_ISC, np.int64)
    fsc = np.zeros(N_FSC, np.float64)
    ki = np.zeros((num_keys, N_KI), np.int64)
    ki[:, K_PREV] = ki[:, K_NEXT] = -1
    kf = np.zeros((num_keys, 2), np.float64)
    gi = np.zeros((num_gpus, N_GI), np.int64)
    gi[:, G_HEAD] = gi[:, G_TAIL] = gi[:, G_BUSY] = gi[:, G_EVSEQ] = -1
    gi[:, G_SLOW] = -1
    gi[:, G_INORDER] = 1
    gf = np.zeros((num_gpus, N_GF), np.float64)
    gf[:, GF_EVT] = np.inf
    gf[:, GF_LATEST] = -np.inf
    fsc[F_DUE] = np.inf
    q = np.zeros((num_gpus, queue), np.int64)
    work = np.zeros((num_experts, N_W), np.int64)
    work[:, W_MISSED] = work[:, W_MARK] = -1
    return isc, fsc, ki, kf, gi, gf, q, work


@njit(cache=True, _nrt=False)
def needs_waves(ids, ki, gi, counts, num_experts):
    """True when some layer of this iteration routes more distinct experts to a GPU than
    its cache holds (that GPU then runs waves, which only the Python engine does).
    ``counts``: int64 scratch of one entry per GPU."""
    R, L, K = ids.shape
    G = gi.shape[0]
    gi[0, G_WAVEMARK] += 1  # a fresh mark per call (a key belongs to one layer)
    mark = gi[0, G_WAVEMARK]
    for layer in range(L):
        for g in range(G):
            counts[g] = 0
        base = layer * num_experts
        for r in range(R):
            for j in range(K):
                k = base + ids[r, layer, j]
                if ki[k, K_SEEN] != mark:
                    ki[k, K_SEEN] = mark
                    g = ki[k, K_DEV]
                    counts[g] += 1
                    if counts[g] > gi[g, G_CAP]:
                        return True
    return False
