"""The numba kernel of the compiled path for prefetching policies (:mod:`sim.engine_prefetch`).

It does, step for step and float operation for float operation, what
:meth:`sim.engine.Engine._iteration`, :mod:`sim.engine_layer`, :class:`sim.link.Link` and
:class:`policies.cache.ExpertCache` do for the runs :mod:`sim.engine_prefetch` admits:
links that carry one copy at a time (no host-side cap), prefetch queues by priority,
demand loads first, preemption of a prefetch at a chunk boundary, suspended (preempted)
copies, stale orders, cancels, promotion of a LOADING key to a demand load, protection of
prefetched entries until their layer passes, and a recency eviction order (unprotected
entries first). Policy hooks stay in Python: the kernel returns at each gate (``HOOK``;
the caller runs ``on_gate_now`` and ``on_gate`` and resumes it with the orders they
decided: on_gate_now's, then on_gate's when they need no search, are applied after the
layer's demand loads) and after a layer's experts are used (``HOOK_USED``:
``on_expert_used`` per expert). A policy's compiled gate (policies.compiled_gate) is
called in the kernel instead of the HOOK return (:func:`iteration_gate`). No waves, no copy interference, no event log: the caller
admits only such runs. The Python engine is the reference; ``tests/test_engine_prefetch.py``
and ``tests/test_engine_prefetch_fmoe.py`` hold them equal.

Victims: recency's are the kernel's own; a policy's KernelVictims (fMoE's expected time to
next use, :func:`_kernel_victim`) are chosen here too, from the policy's own arrays
(``vs``), calling Python only where the policy would make a table lazily; any other scorer
is called back (``objmode``, :data:`VICTIM`). An async policy's delayed orders are timed
calls the kernel runs in time order with the link events (``cf``/``ci``, their orders in
``bk``/``bp``). Every key entering or leaving a cache is logged (``vs``' ``mlog``) for the
caller, which keeps the caches' entries dicts in step from it.

Over 450 lines on purpose: numba's on-disk cache keys a compiled function on its own
source file only, so the kernel and every helper it calls live in one module, but for
the list helpers of :mod:`sim.fastkernel` and fMoE's score (:mod:`policies.fmoe_jit`'s
``_victim_etnu`` and ``_before``, which the policy's own kernels share): those two files'
contents join every kernel's cache stamp here (:func:`specs.jitcache.stamp_dependencies`), so editing
them recompiles this module's kernels. Compiled
with ``_nrt=False`` (no reference counting): nothing here allocates. The helpers are not
marked ``inline="always"`` (numba's IR inlining; LLVM still inlines what pays): with it
the first compile took 114.6 s, without it 13.3 s (a first deepspeed run, empty numba
cache, this 2-core VM), at 0-15% more time a layer step for the prefetching baselines
(``benchmarks/sim_speed.py``, docs/testing.md).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, objmode

from policies.fmoe_jit import _before, _victim_etnu
from sim.fastkernel import _append, _touched, _unlink
from specs.jitcache import stamp_dependencies

# -- isc: int64 scalars ---------------------------------------------------------------
I_PHASE, I_POS, I_GATESEQ, I_STEPS, I_SEQ, I_NUSED, I_NPEND, I_STEP = 0, 1, 2, 3, 4, 5, 6, 7
I_EBYTES, I_J, I_NITEMS, I_NMISSED, I_MARK, I_NGPU, I_CHUNK, I_NSUSP = 8, 9, 10, 11, 12, 13, 14, 15
I_PYSCORE, I_NORD, I_NCAN, I_STAMP, I_HOOKGATE, I_INS = 16, 17, 18, 19, 20, 21
I_NCALL, I_CALLSEQ, I_BUFTOP, I_HOOKUSED = 22, 23, 24, 25  # timed calls; on_expert_used
# a gate's second batch of orders applied at once (after the first: on_gate's when
# on_gate_now also ordered), from ordk[I_SEG2:]
I_NCAN2, I_NORD2, I_SEG2 = 26, 27, 28
I_DELAYED = 29  # a compiled gate's orders queued after the search (the engine's count)
N_ISC = 30
# ci: per pending timed call (a delayed drain), sorted by (time cf, seq)
C_SEQ, C_START, C_NCAN, C_NENQ, C_STAMP = 0, 1, 2, 3, 4
# -- fsc: float64 scalars -------------------------------------------------------------
F_T, F_NXT, F_STALL, F_TOP, F_IDEAL, F_TLAYER, F_DENSE, F_HAND = 0, 1, 2, 3, 4, 5, 6, 7
F_EXCH, F_OVER, F_HEAD, F_BW, F_LAT, F_DUE, F_NOW = 8, 9, 10, 11, 12, 13, 14
F_SEARCH = 15  # this iteration's gate search latency (a compiled gate's on_gate orders)
N_FSC = 16
# -- ki: per key (layer * J + expert) ints --------------------------------------------
K_STATE, K_PINS, K_USES, K_PREV, K_NEXT, K_DEV, K_PROT, K_BYPF, K_PFUSED = 0, 1, 2, 3, 4, 5, 6, 7, 8
# its copy (at most one per key): none / queued (prefetch, new or suspended) / in flight /
# in the demand queue; suspended; demand; stop kind; seq; stamp; bytes left
K_JOB, K_JSUSP, K_JDEM, K_JSTOP, K_JSEQ, K_JSTAMP, K_JREM = 9, 10, 11, 12, 13, 14, 15
K_INS = 16  # when the key entered its cache's entries (their dict order)
N_KI = 17
JOB_NONE, JOB_QUEUED, JOB_FLIGHT, JOB_DEMANDQ = 0, 1, 2, 3
_SUSPEND, _CANCEL = 1, 2
# -- kf: per key floats ---------------------------------------------------------------
KF_LAST, KF_LOADED, KF_JPRI = 0, 1, 2
# -- gi: per GPU ints -----------------------------------------------------------------
G_HEAD, G_TAIL, G_COUNT, G_CAP, G_NLOAD, G_INORDER, G_QH, G_QN = 0, 1, 2, 3, 4, 5, 6, 7
G_BUSY, G_BYTES, G_EVSEQ, G_SLOW, G_FREES, G_ACTIVE, G_HN, G_SEG = 8, 9, 10, 11, 12, 13, 14, 15
G_NSUSP, G_CDIRTY = 16, 17
# policies.cache.CacheCounters, in its field order
G_C0 = 18
(
    C_DEMANDS,
    C_HITS,
    C_MISSES,
    C_LOADS,
    C_DLOADS,
    C_PFISSUED,
    C_PFUSED,
    C_PFTIMELY,
    C_PFLATE,
    C_PFWASTED,
    C_PFCANCELLED,
    C_EVICTIONS,
    C_EVBYPF,
    C_BYTESLOADED,
) = range(G_C0, G_C0 + 14)
# Link.stats
S_ORDERS, S_SKIPPED, S_STALE, S_DROPPED, S_PREEMPT = range(G_C0 + 14, G_C0 + 19)
# candidates added or refreshed on the GPU (a kept victim ranking holds while it stands)
G_PUTS = G_C0 + 19
# unprotected candidates lost (pinned by a demand, or evicted) on the GPU: with G_PUTS
# standing, the candidates now are those of the kept ranking's scan less these
G_CLOST = G_C0 + 20
N_GI = G_C0 + 21
# -- gf: per GPU floats ---------------------------------------------------------------
GF_LATEST, GF_BUSYS, GF_BUSYT0, GF_EVT, GF_COMP, GF_LOAD, GF_START, GF_T0, GF_END = range(9)
N_GF = 9
# -- work: per distinct expert of a layer step ----------------------------------------
W_E, W_TOK, W_USED, W_PEND, W_PTOK, W_ABS, W_CNT, W_MISSED, W_MARK = 0, 1, 2, 3, 4, 5, 6, 7, 8
N_W = 9

# -- vs: (vi, vf, ist, fl, prot, etnu, mlog, mlogf): the policy's victim choice in the
# kernel (policies.cache_victims.KernelVictims; dummies without one) and the log of the
# caches' membership changes (sim.engine_prefetch keeps the entries dicts from it)
V_ON, V_G, V_IT, V_ROWS, V_DIRTY, V_CHANCE, V_MIN, V_NLOG = range(8)
V_NBIG, V_NSMALL = 8, 9  # victims chosen by each score (counts, for tests)
# the state version (KernelVictims' KV_EV), then the ranking of the last scan of the
# large-cache score (as the policy's victim_index keeps one): its GPU (-1: none), that
# GPU's G_PUTS and the version then, how many ranked, the next to try, and the keys
V_EV, V_MG, V_MPUTS, V_MEV, V_MN, V_MPOS, V_MCANDS, V_MLOST = 10, 11, 12, 13, 14, 15, 16, 17
V_MK = 18
RANKED = 8
N_VI = V_MK + RANKED
VF_TIE, VF_MTIE, VF_MS = 0, 1, 2  # the tie weight; the ranking's, and its scores
N_VF = VF_MS + RANKED
# mlog rows: an entry added (ADDED) to or removed (REMOVED) from its cache's entries, and
# a removed entry's fields at that moment (mlogf: its last_used and loaded_at)
M_KIND, M_K, M_STATE, M_USES, M_PINS, M_PROT, M_BYPF, M_PFUSED = range(8)
N_M = 8
ADDED, REMOVED = 1, 2
# CALLBACK[0](code), set by sim.engine_prefetch: 1 the policy's chance table, 2 its
# eviction table (each made now, as its Python victim choice would make it; vi refreshed)
# 3: the membership log is full (Python applies it and empties it)
CB_CHANCE, CB_TABLE, CB_FLUSH = 1, 2, 3
CALLBACK: list = [None]

ABSENT, LOADING, RESIDENT = 0, 1, 2
DONE, YIELD_T, WAIT, NO_LINK, HOOK, BAD, HOOK_USED, BAD_GATE, GROW = 0, 1, 2, 3, 4, 5, 6, 7, 8
PH_HEAD, PH_LAYER, PH_GATE, PH_DEMAND, PH_WAIT, PH_END, PH_END2, PH_ITER, PH_ITER2 = range(9)
PH_USED = 9
PH_GATED = 10  # a compiled gate has run: its on_gate orders queued or kept (GROW: resumed)


# -- bookkeeping ------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _seq(isc):
    isc[I_SEQ] += 1
    return isc[I_SEQ]


# the per-device recency list and the in-order mark share sim.fastkernel's columns
# (K_DEV, K_PREV, K_NEXT, G_HEAD, G_TAIL, G_INORDER, GF_LATEST: the same indices here,
# checked in tests/test_engine_prefetch.py), so its helpers serve both kernels


# -- the prefetch heap of a link: (-priority, seq, key), lazily deleted -----------------
@njit(cache=True, _nrt=False)
def _hless(hf, hi, g, a, b):
    return hf[g, a] < hf[g, b] or (hf[g, a] == hf[g, b] and hi[g, a, 0] < hi[g, b, 0])


@njit(cache=True, _nrt=False)
def _hswap(hf, hi, g, a, b):
    x = hf[g, a]
    hf[g, a] = hf[g, b]
    hf[g, b] = x
    for c in range(2):
        y = hi[g, a, c]
        hi[g, a, c] = hi[g, b, c]
        hi[g, b, c] = y


@njit(cache=True, _nrt=False)
def _hcompact(ki, gi, hf, hi, g):
    """Drop link g's superseded heap entries (a full heap). Which entries are superseded
    changes no choice: _next_job skips them, and no decision depends on their count."""
    n = gi[g, G_HN]
    m = 0
    for i in range(n):
        k = hi[g, i, 1]
        if ki[k, K_JOB] == JOB_QUEUED and ki[k, K_JSEQ] == hi[g, i, 0]:
            hf[g, m] = hf[g, i]
            hi[g, m, 0] = hi[g, i, 0]
            hi[g, m, 1] = k
            m += 1
    gi[g, G_HN] = m
    for i in range(m // 2 - 1, -1, -1):  # heapify
        j = i
        while True:
            a = 2 * j + 1
            if a >= m:
                break
            b = a + 1
            c = b if b < m and _hless(hf, hi, g, b, a) else a
            if _hless(hf, hi, g, c, j):
                _hswap(hf, hi, g, c, j)
                j = c
            else:
                break


@njit(cache=True, _nrt=False)
def _hpush(ki, gi, hf, hi, g, negpri, seq, k):
    if gi[g, G_HN] == hf.shape[1]:
        _hcompact(ki, gi, hf, hi, g)
    i = gi[g, G_HN]
    gi[g, G_HN] = i + 1
    hf[g, i] = negpri
    hi[g, i, 0] = seq
    hi[g, i, 1] = k
    while i > 0:
        p = (i - 1) // 2
        if _hless(hf, hi, g, i, p):
            _hswap(hf, hi, g, i, p)
            i = p
        else:
            break


@njit(cache=True, _nrt=False)
def _hpop(gi, hf, hi, g):
    """Remove the smallest entry; returns its (seq, key)."""
    seq, k = hi[g, 0, 0], hi[g, 0, 1]
    n = gi[g, G_HN] - 1
    gi[g, G_HN] = n
    if n > 0:
        hf[g, 0] = hf[g, n]
        hi[g, 0, 0] = hi[g, n, 0]
        hi[g, 0, 1] = hi[g, n, 1]
        i = 0
        while True:
            a = 2 * i + 1
            if a >= n:
                break
            b = a + 1
            m = b if b < n and _hless(hf, hi, g, b, a) else a
            if _hless(hf, hi, g, m, i):
                _hswap(hf, hi, g, m, i)
                i = m
            else:
                break
    return seq, k


# -- the cache --------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _victim(ki, kf, gi, g):
    """The lowest (protected, last_used, key) among resident unpinned entries (the
    cache's choice with a recency scorer); -1 when none."""
    for prot_ok in range(2):
        best = -1
        if gi[g, G_INORDER]:  # ExpertCache._least_recent: walk the recency order
            k = gi[g, G_HEAD]
            while k >= 0:
                ok = ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0
                ok = ok and (prot_ok == 1 or ki[k, K_PROT] == 0)
                if best < 0:
                    if ok:
                        best = k
                elif kf[k, KF_LAST] != kf[best, KF_LAST]:
                    break
                elif ok and k < best:
                    best = k
                k = ki[k, K_NEXT]
        else:
            k = gi[g, G_HEAD]
            while k >= 0:
                ok = ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0
                if ok and (prot_ok == 1 or ki[k, K_PROT] == 0):
                    if (
                        best < 0
                        or kf[k, KF_LAST] < kf[best, KF_LAST]
                        or (kf[k, KF_LAST] == kf[best, KF_LAST] and k < best)
                    ):
                        best = k
                k = ki[k, K_NEXT]
        if best >= 0:
            return best
    return -1


# the run's Python victim choice (sim.engine_prefetch sets it): victim(g, n) -> the key
# index among scratch[:n] the policy's scorer evicts first
VICTIM: list = [None]


# The objmode blocks call these module functions, never VICTIM or CALLBACK themselves:
# numba's disk cache pickles the globals an objmode block reads, by value (a list holding
# a bound method of the run's path: its whole state, the trace included, ~1 GB a kernel
# on DeepSeek-V3), while a function of an importable module pickles by name.
def _call_victim(g: int, n: int) -> int:
    return VICTIM[0](g, n)


def _call_back(code: int) -> None:
    CALLBACK[0](code)


@njit(cache=True, _nrt=False)
def _py_victim(ki, gi, scratch, g):
    """ExpertCache._victim with the policy's own scorer: the candidates (resident,
    unpinned, unprotected; else the protected ones) go to Python, which scores them; -1
    when none. Not inlined: it holds the one call back into Python."""
    n = 0
    for prot in range(2):
        k = gi[g, G_HEAD]
        while k >= 0:
            if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == prot:
                scratch[n] = k
                n += 1
            k = ki[k, K_NEXT]
        if n:
            break
    if n <= 1:
        return scratch[0] if n else -1
    with objmode(v="int64"):
        v = _call_victim(g, n)
    return v


@njit(cache=True, _nrt=False)
def _callback(code):
    """CALLBACK[0](code) in Python. Not inlined: it holds a call back into Python."""
    with objmode():
        _call_back(code)


@njit(cache=True, _nrt=False)
def _log(ki, kf, vs, k, kind):
    """Note that key ``k`` entered (ADDED) or left (REMOVED, with its fields now) its
    cache's entries."""
    vi, mlog, mlogf = vs[0], vs[6], vs[7]
    n = vi[V_NLOG]
    if n == mlog.shape[0]:
        _callback(CB_FLUSH)
        n = vi[V_NLOG]
    mlog[n, M_KIND] = kind
    mlog[n, M_K] = k
    mlog[n, M_STATE] = ki[k, K_STATE]
    mlog[n, M_USES] = ki[k, K_USES]
    mlog[n, M_PINS] = ki[k, K_PINS]
    mlog[n, M_PROT] = ki[k, K_PROT]
    mlog[n, M_BYPF] = ki[k, K_BYPF]
    mlog[n, M_PFUSED] = ki[k, K_PFUSED]
    mlogf[n, 0] = kf[k, KF_LAST]
    mlogf[n, 1] = kf[k, KF_LOADED]
    vi[V_NLOG] = n + 1


@njit(cache=True, _nrt=False)
def _kernel_victim(ki, kf, gi, scratch, g, vs):
    """ExpertCache._victim with a policy's kernel victims (fMoE's expected time to next
    use, policies.cache_victims.KernelVictims), as the cache and the policy's Python make
    it: among the unprotected candidates (resident, unpinned; else the protected ones)
    the lowest ``score + tie * last_used``, ties to the lowest key, the score being, from
    VICTIM_INDEX_MIN unprotected candidates on, the policy's victim_index value
    (policies.fmoe_jit._victim_etnu, this iteration's chance table made first), else its
    eviction_scores value (its eviction table ``etnu``, made first when stale). The tables
    are made in Python (CALLBACK) exactly when the Python engine would make them. A NaN
    score: the policy's scorer in Python decides (VICTIM), as the cache's fallback does.
    -1 when no entry can go."""
    vi, vf, ist, etnu = vs[0], vs[1], vs[2], vs[5]
    if (
        vi[V_MG] == g
        and vi[V_MPUTS] == gi[g, G_PUTS]
        and vi[V_MCANDS] - (gi[g, G_CLOST] - vi[V_MLOST]) >= vi[V_MIN]
    ):
        # no candidate added or refreshed since the kept ranking's scan, and still enough
        # of them for the large-cache score: while nothing else it read changed (the
        # policy's state version, the tie weight) its first still a candidate is the
        # lowest of what is left (as the policy's victim_index keeps its ranking)
        vi[V_NBIG] += 1
        if not vi[V_CHANCE]:
            _callback(CB_CHANCE)
        if vi[V_MEV] == vi[V_EV] and vf[VF_MTIE] == vf[VF_TIE]:
            for p in range(vi[V_MPOS], vi[V_MN]):
                k = vi[V_MK + p]
                if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == 0:
                    vi[V_MPOS] = p
                    return k
        vi[V_NBIG] -= 1  # counted again below
    n = 0
    pp = 0
    for pp in range(2):
        k = gi[g, G_HEAD]
        while k >= 0:
            if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == pp:
                scratch[n] = k
                n += 1
            k = ki[k, K_NEXT]
        if n:
            break
    if n <= 1:  # the cache takes a lone candidate unscored
        return scratch[0] if n else -1
    large = pp == 0 and n >= vi[V_MIN]
    if large:
        vi[V_NBIG] += 1
        if not vi[V_CHANCE]:
            _callback(CB_CHANCE)
        return _rank_victims(ki, kf, gi, scratch, g, n, vs)
    vi[V_NSMALL] += 1
    if vi[V_DIRTY]:
        _callback(CB_TABLE)
    J = ist.shape[2]
    tie = vf[VF_TIE]
    best = -1
    bs = 0.0
    bl = 0
    bj = 0
    for i in range(n):
        k = scratch[i]
        lay = k // J
        j = k - lay * J
        s = etnu[lay, j] + tie * kf[k, KF_LAST]
        if s != s:  # NaN: the policy's scorer in Python (the cache's own fallback)
            with objmode(v="int64"):
                v = _call_victim(g, n)
            return v
        if best < 0 or _before(s, lay, j, bs, bl, bj):
            best = k
            bs = s
            bl = lay
            bj = j
    return best


@njit(cache=True, _nrt=False)
def _rank_victims(ki, kf, gi, scratch, g, n, vs):
    """The large-cache score of candidates scratch[:n] (:func:`_kernel_victim`): the
    lowest RANKED by (score, key) kept in vi/vf, the first returned; a NaN score: the
    policy's scorer in Python decides (no ranking kept)."""
    vi, vf, ist, fl, prot = vs[0], vs[1], vs[2], vs[3], vs[4]
    J = ist.shape[2]
    L = ist.shape[1]
    tie = vf[VF_TIE]
    g_, it, rows = vi[V_G], vi[V_IT], vi[V_ROWS]
    c = 0
    for i in range(n):
        k = scratch[i]
        lay = k // J
        j = k - lay * J
        s = _victim_etnu(ist, fl, prot, g_, it, L, lay, j, rows) + tie * kf[k, KF_LAST]
        if s != s:
            vi[V_MG] = -1
            with objmode(v="int64"):
                v = _call_victim(g, n)
            return v
        if c == RANKED:
            w = vi[V_MK + RANKED - 1]
            if not _before(s, lay, j, vf[VF_MS + RANKED - 1], w // J, w - (w // J) * J):
                continue
        q = c if c < RANKED else RANKED - 1
        while q > 0:  # insert (the worst falls off a full ranking)
            w = vi[V_MK + q - 1]
            if not _before(s, lay, j, vf[VF_MS + q - 1], w // J, w - (w // J) * J):
                break
            vi[V_MK + q] = w
            vf[VF_MS + q] = vf[VF_MS + q - 1]
            q -= 1
        vi[V_MK + q] = k
        vf[VF_MS + q] = s
        if c < RANKED:
            c += 1
    vi[V_MG] = g
    vi[V_MPUTS] = gi[g, G_PUTS]
    vi[V_MCANDS] = n
    vi[V_MLOST] = gi[g, G_CLOST]
    vi[V_MEV] = vi[V_EV]
    vf[VF_MTIE] = vf[VF_TIE]
    vi[V_MN] = c
    vi[V_MPOS] = 0
    return vi[V_MK]


@njit(cache=True, _nrt=False)
def _begin_load(isc, ki, kf, gi, gf, scratch, vs, k, now, prefetch):
    """ExpertCache.begin_load(key, now, prefetch=prefetch, pin=not prefetch); False
    (nothing changed) when no slot can be freed."""
    g = ki[k, K_DEV]
    while gi[g, G_COUNT] >= gi[g, G_CAP]:
        if vs[0][V_ON]:
            v = _kernel_victim(ki, kf, gi, scratch, g, vs)
        elif isc[I_PYSCORE]:
            v = _py_victim(ki, gi, scratch, g)
        else:
            v = _victim(ki, kf, gi, g)
        if v < 0:
            return False
        _log(ki, kf, vs, v, REMOVED)
        if ki[v, K_PROT] == 0:
            gi[g, G_CLOST] += 1
        _unlink(ki, gi, v)
        ki[v, K_STATE] = ABSENT
        gi[g, G_COUNT] -= 1
        gi[g, C_EVICTIONS] += 1
        if ki[v, K_BYPF] and not ki[v, K_PFUSED]:
            gi[g, C_PFWASTED] += 1
        if prefetch:
            gi[g, C_EVBYPF] += 1
    ki[k, K_STATE] = LOADING
    isc[I_INS] += 1
    ki[k, K_INS] = isc[I_INS]
    kf[k, KF_LOADED] = now
    kf[k, KF_LAST] = now
    ki[k, K_USES] = 0
    ki[k, K_PINS] = 0 if prefetch else 1
    ki[k, K_PROT] = 1 if prefetch else 0
    ki[k, K_BYPF] = 1 if prefetch else 0
    ki[k, K_PFUSED] = 0
    _log(ki, kf, vs, k, ADDED)
    _append(ki, gi, k)
    gi[g, G_COUNT] += 1
    _touched(gi, gf, g, now)
    gi[g, G_NLOAD] += 1
    gi[g, C_LOADS] += 1
    gi[g, C_BYTESLOADED] += isc[I_EBYTES]
    if prefetch:
        gi[g, C_PFISSUED] += 1
    else:
        gi[g, C_DLOADS] += 1
    gi[g, G_CDIRTY] = 1
    return True


@njit(cache=True, _nrt=False)
def _can_evict(ki, gi, g):
    """Whether a slot can be freed on GPU g (a resident unpinned entry exists)."""
    if gi[g, G_COUNT] < gi[g, G_CAP]:
        return True
    k = gi[g, G_HEAD]
    while k >= 0:
        if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0:
            return True
        k = ki[k, K_NEXT]
    return False


@njit(cache=True, _nrt=False)
def _cancel_slot(isc, ki, kf, gi, vs, k):
    """Link._cancel_slot: ExpertCache.cancel_load(key) and the freed slot counted."""
    g = ki[k, K_DEV]
    _log(ki, kf, vs, k, REMOVED)
    _unlink(ki, gi, k)
    ki[k, K_STATE] = ABSENT
    gi[g, G_COUNT] -= 1
    gi[g, G_NLOAD] -= 1
    if ki[k, K_BYPF]:
        gi[g, C_PFCANCELLED] += 1
    ki[k, K_PROT] = 0
    gi[g, G_FREES] += 1
    gi[g, G_CDIRTY] = 1


@njit(cache=True, _nrt=False)
def _use(isc, ki, kf, gi, gf, scratch, k, now):
    """ExpertCache.use(key, now, unpin=True)."""
    ki[k, K_PINS] -= 1
    ki[k, K_USES] += 1
    kf[k, KF_LAST] = now
    _unlink(ki, gi, k)
    _append(ki, gi, k)
    _touched(gi, gf, ki[k, K_DEV], now)
    ki[k, K_PROT] = 0
    gi[ki[k, K_DEV], G_PUTS] += 1


# -- the links ----------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _push_event(isc, fsc, gi, gf, g, end, now):
    """Queue the end of link g's segment (the previous one is superseded)."""
    gf[g, GF_EVT] = end if end > now else now
    gi[g, G_EVSEQ] = _seq(isc)


@njit(cache=True, _nrt=False)
def _begin(isc, fsc, ki, gi, gf, g, k, now, new_run):
    """Link._begin on the link's one channel."""
    gi[g, G_BUSY] = k
    ki[k, K_JOB] = JOB_FLIGHT
    lat = 0.0
    if new_run:
        if gi[g, G_ACTIVE] == 0:
            gf[g, GF_BUSYT0] = now
        gi[g, G_ACTIVE] += 1
        lat = fsc[F_LAT]
    seg = ki[k, K_JREM]
    gf[g, GF_START] = now
    t0 = gf[g, GF_T0] = now + lat
    gi[g, G_SEG] = seg
    end = gf[g, GF_END] = t0 + seg / fsc[F_BW]
    _push_event(isc, fsc, gi, gf, g, end, now)


@njit(cache=True, _nrt=False)
def _next_job(isc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now):
    """Link._next_job: the demand queue first, then the best live prefetch; -1 when none."""
    if gi[g, G_QN] > 0:
        nq = q.shape[1]
        h = gi[g, G_QH]
        k = q[g, h]
        gi[g, G_QH] = (h + 1) % nq
        gi[g, G_QN] -= 1
        return k
    J = isc[I_J]
    while gi[g, G_HN] > 0:
        seq, k = _hpop(gi, hf, hi, g)
        if ki[k, K_JOB] != JOB_QUEUED or ki[k, K_JSEQ] != seq:
            continue  # superseded entry
        ki[k, K_JOB] = JOB_NONE
        if lg[k // J] > ki[k, K_JSTAMP]:  # its layer has run since the order
            gi[g, S_STALE] += 1
            if ki[k, K_JSUSP]:
                ki[k, K_JSUSP] = 0
                gi[g, G_NSUSP] -= 1
                isc[I_NSUSP] -= 1
                _cancel_slot(isc, ki, kf, gi, vs, k)
            continue
        if ki[k, K_JSUSP]:
            ki[k, K_JSUSP] = 0
            gi[g, G_NSUSP] -= 1
            isc[I_NSUSP] -= 1
            return k
        if ki[k, K_STATE] != ABSENT:
            gi[g, S_SKIPPED] += 1
            continue
        if not _begin_load(isc, ki, kf, gi, gf, scratch, vs, k, now, True):
            gi[g, S_DROPPED] += 1
            continue
        return k
    return -1


@njit(cache=True, _nrt=False)
def _kick(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now):
    """Link._kick then _preempt, for one channel."""
    if gi[g, G_BUSY] < 0:
        k = _next_job(isc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)
        if k >= 0:
            _begin(isc, fsc, ki, gi, gf, g, k, now, True)
    while gi[g, G_QN] > 0:
        k = gi[g, G_BUSY]
        if k < 0 or ki[k, K_JDEM] or ki[k, K_JSTOP]:
            return
        _stop(
            isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now, _SUSPEND
        )


@njit(cache=True, _nrt=False)
def _stop(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now, kind):
    """Link._stop: stop link g's prefetch at its next chunk boundary (at once in its
    latency phase). Not inlined: it and _segment_done call each other."""
    k = gi[g, G_BUSY]
    if ki[k, K_JSTOP]:
        if kind > ki[k, K_JSTOP]:
            ki[k, K_JSTOP] = kind
        return
    ki[k, K_JSTOP] = kind
    if now <= gf[g, GF_T0]:
        gi[g, G_SEG] = 0
        gi[g, G_EVSEQ] = -1
        _segment_done(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)
        return
    eb = isc[I_EBYTES]
    chunk = isc[I_CHUNK]
    base = eb - ki[k, K_JREM]
    pos = base + (now - gf[g, GF_T0]) * fsc[F_BW]
    boundary = math.ceil(pos / chunk) * chunk
    if boundary > eb:
        boundary = eb
    seg = boundary - base
    if seg >= gi[g, G_SEG]:
        return
    gi[g, G_SEG] = seg
    end = gf[g, GF_T0] + seg / fsc[F_BW]
    gf[g, GF_END] = end if end >= now else now
    _push_event(isc, fsc, gi, gf, g, gf[g, GF_END], now)


@njit(cache=True, _nrt=False)
def _segment_done(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now):
    """Link._segment_done of link g's segment (ending at ``now``)."""
    k = gi[g, G_BUSY]
    seg = gi[g, G_SEG]
    ki[k, K_JREM] -= seg
    gi[g, G_BYTES] += seg
    rem = ki[k, K_JREM]
    if rem > 0 and not (ki[k, K_JSTOP] and not ki[k, K_JDEM]):
        ki[k, K_JSTOP] = 0
        _begin(isc, fsc, ki, gi, gf, g, k, now, False)
        return
    gi[g, G_BUSY] = -1
    gi[g, G_EVSEQ] = -1
    gi[g, G_ACTIVE] -= 1
    if gi[g, G_ACTIVE] == 0:
        gf[g, GF_BUSYS] += now - gf[g, GF_BUSYT0]
    if rem <= 0:
        ki[k, K_JOB] = JOB_NONE
        ki[k, K_STATE] = RESIDENT  # ExpertCache.finish_load
        gi[g, G_PUTS] += 1
        kf[k, KF_LOADED] = now
        gi[g, G_NLOAD] -= 1
        gi[g, G_FREES] += 1
    elif ki[k, K_JSTOP] == _SUSPEND:
        gi[g, S_PREEMPT] += 1
        ki[k, K_JSTOP] = 0
        ki[k, K_JSUSP] = 1
        gi[g, G_NSUSP] += 1
        isc[I_NSUSP] += 1
        ki[k, K_JOB] = JOB_QUEUED
        _hpush(ki, gi, hf, hi, g, -kf[k, KF_JPRI], ki[k, K_JSEQ], k)
    else:
        ki[k, K_JOB] = JOB_NONE
        _cancel_slot(isc, ki, kf, gi, vs, k)
    if gi[g, G_QN] > 0 or gi[g, G_HN] > 0:
        nk = _next_job(isc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)
        if nk >= 0:
            _begin(isc, fsc, ki, gi, gf, g, nk, now, True)


@njit(cache=True, _nrt=False)
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


@njit(cache=True, _nrt=False)
def _due(isc, gi, gf, cf):
    """Links.due: the earliest link event or timed call (inf when none)."""
    g = _next_event(isc, gi, gf)
    t = np.inf if g < 0 else gf[g, GF_EVT]
    if isc[I_NCALL] and cf[0] < t:
        t = cf[0]
    return t


@njit(cache=True, _nrt=False)
def _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t):
    """Links.advance(t): link events and timed calls at or before ``t`` in time order
    (ties: link events first, then calls in the order they were made)."""
    while True:
        g = _next_event(isc, gi, gf)
        if g >= 0 and gf[g, GF_EVT] <= t and (isc[I_NCALL] == 0 or gf[g, GF_EVT] <= cf[0]):
            _segment_done(
                isc,
                fsc,
                ki,
                kf,
                gi,
                gf,
                q,
                hf,
                hi,
                lg,
                scratch,
                cf,
                ci,
                bk,
                bp,
                vs,
                g,
                gf[g, GF_EVT],
            )
        elif isc[I_NCALL] and cf[0] <= t:
            _run_call(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs)
        else:
            return


@njit(cache=True, _nrt=False)
def _start_demand(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, now):
    """Link.start_demand(key, now); False (nothing reserved) when no slot can be freed."""
    g = ki[k, K_DEV]
    if ki[k, K_JOB] == JOB_QUEUED and not ki[k, K_JSUSP]:
        ki[k, K_JOB] = JOB_NONE  # take_queued: it is about to be a demand load
    if not _begin_load(isc, ki, kf, gi, gf, scratch, vs, k, now, False):
        if gi[g, G_NSUSP] == 0:
            return False
        _free_suspended(isc, ki, kf, gi, vs, g)
        if not _begin_load(isc, ki, kf, gi, gf, scratch, vs, k, now, False):
            return False
    ki[k, K_JDEM] = 1
    ki[k, K_JSTOP] = 0
    ki[k, K_JSUSP] = 0
    ki[k, K_JREM] = isc[I_EBYTES]
    kf[k, KF_JPRI] = np.inf
    ki[k, K_JSEQ] = _seq(isc)
    ki[k, K_JSTAMP] = isc[I_STAMP]
    if gi[g, G_QN] == 0 and gi[g, G_HN] == 0 and gi[g, G_BUSY] < 0:
        _begin(isc, fsc, ki, gi, gf, g, k, now, True)
        return True
    nq = q.shape[1]
    q[g, (gi[g, G_QH] + gi[g, G_QN]) % nq] = k
    gi[g, G_QN] += 1
    ki[k, K_JOB] = JOB_DEMANDQ
    _kick(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)
    return True


@njit(cache=True, _nrt=False)
def _free_suspended(isc, ki, kf, gi, vs, g):
    """Link.free_suspended: cancel every preempted prefetch of link g (by key)."""
    for k in range(ki.shape[0]):
        if ki[k, K_JSUSP] and ki[k, K_DEV] == g:
            ki[k, K_JSUSP] = 0
            gi[g, G_NSUSP] -= 1
            isc[I_NSUSP] -= 1
            ki[k, K_JOB] = JOB_NONE
            _cancel_slot(isc, ki, kf, gi, vs, k)


@njit(cache=True, _nrt=False)
def _promote(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, now):
    """Link.promote: a LOADING key is demanded: its copy becomes a demand load."""
    g = ki[k, K_DEV]
    if ki[k, K_JSUSP]:
        ki[k, K_JSUSP] = 0
        gi[g, G_NSUSP] -= 1
        isc[I_NSUSP] -= 1
        ki[k, K_JDEM] = 1
        ki[k, K_JSTOP] = 0
        nq = q.shape[1]
        q[g, (gi[g, G_QH] + gi[g, G_QN]) % nq] = k
        gi[g, G_QN] += 1
        ki[k, K_JOB] = JOB_DEMANDQ
        _kick(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)
        return
    if ki[k, K_JOB] == JOB_FLIGHT:
        ki[k, K_JDEM] = 1
        ki[k, K_JSTOP] = 0


@njit(cache=True, _nrt=False)
def _enqueue(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, pri, stamp, now
):
    """Link.enqueue: queue or re-prioritise a prefetch; cached keys are skipped."""
    g = ki[k, K_DEV]
    gi[g, S_ORDERS] += 1
    if ki[k, K_JOB] == JOB_QUEUED:
        if kf[k, KF_JPRI] != pri or ki[k, K_JSTAMP] != stamp:
            kf[k, KF_JPRI] = pri
            ki[k, K_JSTAMP] = stamp
            ki[k, K_JSEQ] = _seq(isc)
            _hpush(ki, gi, hf, hi, g, -pri, ki[k, K_JSEQ], k)
        return
    if ki[k, K_STATE] != ABSENT:
        gi[g, S_SKIPPED] += 1
        return
    ki[k, K_JOB] = JOB_QUEUED
    ki[k, K_JSUSP] = 0
    ki[k, K_JDEM] = 0
    ki[k, K_JSTOP] = 0
    ki[k, K_JREM] = isc[I_EBYTES]
    kf[k, KF_JPRI] = pri
    ki[k, K_JSEQ] = _seq(isc)
    ki[k, K_JSTAMP] = stamp
    _hpush(ki, gi, hf, hi, g, -pri, ki[k, K_JSEQ], k)
    if gi[g, G_BUSY] < 0 or gi[g, G_QN] > 0:
        _kick(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now)


@njit(cache=True, _nrt=False)
def _cancel(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, now):
    """Link.cancel: drop a queued order, cancel a preempted or in-flight prefetch."""
    g = ki[k, K_DEV]
    if ki[k, K_JOB] == JOB_QUEUED:
        ki[k, K_JOB] = JOB_NONE
        if ki[k, K_JSUSP]:
            ki[k, K_JSUSP] = 0
            gi[g, G_NSUSP] -= 1
            isc[I_NSUSP] -= 1
            _cancel_slot(isc, ki, kf, gi, vs, k)
        return
    if ki[k, K_JOB] == JOB_FLIGHT and not ki[k, K_JDEM]:
        _stop(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, g, now, _CANCEL)


@njit(cache=True, _nrt=False)
def _apply_from(
    isc,
    fsc,
    ki,
    kf,
    gi,
    gf,
    q,
    hf,
    hi,
    lg,
    scratch,
    cf,
    ci,
    bk,
    bp,
    vs,
    keys,
    pris,
    start,
    nc,
    ne,
    stamp,
    now,
):
    """Engine._apply: ``nc`` cancels (keys[start:]) first, then ``ne`` prefetches
    (keys/pris after them), ordered at gate ``stamp``."""
    for i in range(start, start + nc):
        _cancel(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, keys[i], now)
    for i in range(start + nc, start + nc + ne):
        _enqueue(
            isc,
            fsc,
            ki,
            kf,
            gi,
            gf,
            q,
            hf,
            hi,
            lg,
            scratch,
            cf,
            ci,
            bk,
            bp,
            vs,
            keys[i],
            pris[i],
            stamp,
            now,
        )


@njit(cache=True, _nrt=False)
def _apply(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, ordk, ordp, now):
    """The orders the caller put in ordk/ordp (isc[I_NCAN] cancels, then isc[I_NORD]
    prefetches) at the current stamp."""
    _apply_from(
        isc,
        fsc,
        ki,
        kf,
        gi,
        gf,
        q,
        hf,
        hi,
        lg,
        scratch,
        cf,
        ci,
        bk,
        bp,
        vs,
        ordk,
        ordp,
        0,
        isc[I_NCAN],
        isc[I_NORD],
        isc[I_STAMP],
        now,
    )
    isc[I_NCAN] = 0
    isc[I_NORD] = 0


@njit(cache=True, _nrt=False)
def _run_call(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs):
    """Run the earliest timed call (a delayed drain's orders) at its time."""
    when = cf[0]
    start, nc, ne, stamp = ci[0, C_START], ci[0, C_NCAN], ci[0, C_NENQ], ci[0, C_STAMP]
    n = isc[I_NCALL] - 1
    for i in range(n):  # few pending calls: shift them down
        cf[i] = cf[i + 1]
        for c in range(5):
            ci[i, c] = ci[i + 1, c]
    isc[I_NCALL] = n
    _apply_from(
        isc,
        fsc,
        ki,
        kf,
        gi,
        gf,
        q,
        hf,
        hi,
        lg,
        scratch,
        cf,
        ci,
        bk,
        bp,
        vs,
        bk,
        bp,
        start,
        nc,
        ne,
        stamp,
        when,
    )
    if n == 0:
        isc[I_BUFTOP] = 0  # no order of a pending call is left in the buffer


@njit(cache=True, _nrt=False)
def add_call(isc, fsc, gi, gf, cf, ci, bk, bp, ordk, ordp, when, stamp):
    """Links.call_at(when, the engine's _apply of the orders in ordk/ordp at ``stamp``):
    copy them into the calls' buffer and queue the call by (time, order made). The
    caller makes room first (:func:`call_room`)."""
    nc, ne = isc[I_NCAN], isc[I_NORD]
    isc[I_NCAN] = 0
    isc[I_NORD] = 0
    _add_call_from(isc, fsc, gi, gf, cf, ci, bk, bp, ordk, ordp, 0, nc, ne, when, stamp)


@njit(cache=True, _nrt=False)
def _add_call_from(isc, fsc, gi, gf, cf, ci, bk, bp, keys, pris, start, nc, ne, when, stamp):
    """:func:`add_call` of ``nc`` cancels then ``ne`` prefetches at keys/pris[start:]."""
    top = isc[I_BUFTOP]
    for i in range(nc + ne):
        bk[top + i] = keys[start + i]
        bp[top + i] = pris[start + i]
    isc[I_BUFTOP] = top + nc + ne
    isc[I_CALLSEQ] += 1
    m = isc[I_NCALL]
    while m > 0 and cf[m - 1] > when:  # equal times keep the order made
        cf[m] = cf[m - 1]
        for c in range(5):
            ci[m, c] = ci[m - 1, c]
        m -= 1
    cf[m] = when
    ci[m, C_SEQ] = isc[I_CALLSEQ]
    ci[m, C_START] = top
    ci[m, C_NCAN] = nc
    ci[m, C_NENQ] = ne
    ci[m, C_STAMP] = stamp
    isc[I_NCALL] += 1
    fsc[F_DUE] = _due(isc, gi, gf, cf)


@njit(cache=True, _nrt=False)
def run_calls(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs):
    """Links.run_calls: every pending call, each after the link events before it."""
    while isc[I_NCALL]:
        _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, cf[0])
    fsc[F_DUE] = _due(isc, gi, gf, cf)


@njit(cache=True, _nrt=False)
def apply_orders(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, ordk, ordp, now
):
    """:func:`_apply` from Python (a drain at an iteration's start or end, after an
    arrival or an expert used), at ``now`` (the caller has advanced the links to it)."""
    _apply(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, ordk, ordp, now)
    fsc[F_DUE] = _due(isc, gi, gf, cf)


@njit(cache=True, _nrt=False)
def advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t):
    """Links.advance(t): every link event at or before ``t``, in time order."""
    _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t)
    fsc[F_DUE] = _due(isc, gi, gf, cf)


# -- one layer step -------------------------------------------------------------------------
@njit(cache=True, _nrt=False)
def _items(isc, ids, layer, work):
    """sim.iteration.layer_items of one layer: distinct experts by id, rows per expert, in
    work[:, W_E], work[:, W_TOK]; returns their number."""
    R, _, K = ids.shape
    J = isc[I_J]
    if R == 1:
        for j in range(K):
            e = ids[0, layer, j]
            i = j
            while i > 0 and work[i - 1, W_E] > e:
                work[i, W_E] = work[i - 1, W_E]
                i -= 1
            work[i, W_E] = e
        for j in range(K):
            work[j, W_TOK] = 1
        return K
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
            work[e, W_CNT] = 0
            i += 1
    return n


@njit(cache=True, _nrt=False)
def _demand(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, et, layer, t
):
    """LayerSteps._demand: demand and pin the layer's experts (a LOADING one is promoted
    to a demand load), then start loading the absent ones; returns the number of GPUs
    with misses, or -1 when an absent one found no slot (the caller admits no such run)."""
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
        gi[g, C_DEMANDS] += 1
        gi[g, G_CDIRTY] = 1
        st = ki[k, K_STATE]
        if st == ABSENT:
            gi[g, C_MISSES] += 1
        else:
            if st == RESIDENT:
                gi[g, C_HITS] += 1
            else:
                gi[g, C_MISSES] += 1
            if ki[k, K_BYPF] and not ki[k, K_PFUSED]:
                ki[k, K_PFUSED] = 1
                gi[g, C_PFUSED] += 1
                if st == RESIDENT:
                    gi[g, C_PFTIMELY] += 1
                else:
                    gi[g, C_PFLATE] += 1
            if st == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == 0:
                gi[g, G_CLOST] += 1
            ki[k, K_PINS] += 1
        if st == RESIDENT:
            gf[g, GF_COMP] += ct
            work[nu, W_USED] = k
            nu += 1
            continue
        nmiss += 1
        work[e, W_MISSED] = step
        if gi[g, G_SLOW] != step:
            gi[g, G_SLOW] = step
            gf[g, GF_LOAD] = 0.0
            nslow += 1
        gf[g, GF_LOAD] += ct
        if st == LOADING:
            _promote(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, t)
            work[npend, W_PEND] = k
            work[npend, W_PTOK] = tok
            npend += 1
            work[nu, W_USED] = k
            nu += 1
        else:
            work[nabs, W_ABS] = i
            nabs += 1
    for a in range(nabs):
        i = work[a, W_ABS]
        k = base + work[i, W_E]
        if not _start_demand(
            isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, k, t
        ):
            return -1
        work[npend, W_PEND] = k
        work[npend, W_PTOK] = work[i, W_TOK]
        npend += 1
        work[nu, W_USED] = k
        nu += 1
    isc[I_NUSED] = nu
    isc[I_NPEND] = npend
    isc[I_NMISSED] = nmiss
    return nslow


@njit(cache=True, _nrt=False)
def _timeline(isc, ki, kf, work, et, g, t, comp):
    """LayerSteps._timeline of GPU g from ``t`` (no interference, no fused call)."""
    npend = isc[I_NPEND]
    n = 0
    for i in range(npend):
        k = work[i, W_PEND]
        if ki[k, K_DEV] == g:
            work[n, W_ABS] = i
            n += 1
    for j in range(1, n):  # sorted by (loaded_at, key)
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


@njit(cache=True, _nrt=False)
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
def _drop_suspended_of_layer(isc, ki, kf, gi, lg, vs, layer):
    """Link.drop_suspended_of_layer on every link: cancel preempted prefetches of
    ``layer`` ordered before its gate that just ran."""
    J = isc[I_J]
    gate = lg[layer]
    for k in range(layer * J, layer * J + J):
        if ki[k, K_JSUSP] and ki[k, K_JSTAMP] < gate:
            g = ki[k, K_DEV]
            ki[k, K_JSUSP] = 0
            gi[g, G_NSUSP] -= 1
            isc[I_NSUSP] -= 1
            ki[k, K_JOB] = JOB_NONE
            gi[g, S_STALE] += 1
            _cancel_slot(isc, ki, kf, gi, vs, k)


@njit(cache=True, _nrt=False)
def _gate_orders_ok(ki, ordk, ordp, nout):
    """Whether a compiled gate's orders are well formed (two batches of cancels then
    prefetches: counts within the buffer, keys in range, finite priorities), as
    Engine._apply's validation asks."""
    i = 0
    for b in range(2):
        nc, ne = nout[2 * b], nout[2 * b + 1]
        if nc < 0 or ne < 0 or i + nc + ne > ordk.shape[0]:
            return False
        for j in range(i, i + nc + ne):
            if ordk[j] < 0 or ordk[j] >= ki.shape[0]:
                return False
            if j >= i + nc and not math.isfinite(ordp[j]):
                return False
        i += nc + ne
    return True


@njit(cache=True, _nrt=False)
def _compact_log(vs, last):
    """Drop from the membership log each key's entry that is added and removed again in
    it (the caller applies the log to the entries dicts: such an entry would be made and
    dropped there before any Python could hold it, leaving the dict as it was).
    ``last``: int64 scratch per key (its values are not kept)."""
    vi, mlog, mlogf = vs[0], vs[6], vs[7]
    n = vi[V_NLOG]
    if n < 2:
        return
    for i in range(n):
        last[mlog[i, M_K]] = -1
    dropped = 0
    for i in range(n):
        k = mlog[i, M_K]
        if mlog[i, M_KIND] == ADDED:
            last[k] = i
        elif last[k] >= 0:  # removed after its add in this log: neither is applied
            mlog[last[k], M_KIND] = 0
            mlog[i, M_KIND] = 0
            last[k] = -1
            dropped += 2
    if not dropped:
        return
    m = 0
    for i in range(n):
        if mlog[i, M_KIND] == 0:
            continue
        if m != i:
            for c in range(N_M):
                mlog[m, c] = mlog[i, c]
            mlogf[m, 0] = mlogf[i, 0]
            mlogf[m, 1] = mlogf[i, 1]
        m += 1
    vi[V_NLOG] = m


@njit(cache=True, _nrt=False)
def iteration(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, ordk, ordp, ids, row_off, et, plan,
    req_out,
):  # fmt: skip
    """Run (or resume) one iteration's layers (Engine._iteration from the head on); returns
    DONE, YIELD_T / WAIT where the engine yields to simpy, HOOK at a gate (the caller
    runs the policy's on_gate, puts its orders in ordk/ordp and calls again). The
    membership log it leaves holds no entry both added and removed in it
    (:func:`_compact_log`)."""
    code = _iteration(
        isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, ordk, ordp,
        ids, row_off, et, plan, req_out, None, isc, fsc, isc, None,
    )  # fmt: skip
    _compact_log(vs, scratch)
    return code


@njit(cache=True, _nrt=False)
def iteration_gate(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, ordk, ordp, ids, row_off, et, plan,
    req_out, gate, pi, pf, gout, look,
):  # fmt: skip
    """:func:`iteration` with the policy's compiled gate (policies.compiled_gate): called
    at each gate in place of the HOOK return, its orders (``gout``: cancels, prefetches
    in ordk/ordp) applied after the layer's demand loads; BAD_GATE when it fails or
    orders something malformed. ``gate`` is a first-class function (numba
    ``FunctionType`` of policies.compiled_gate.gate_sig), so this kernel stays in
    numba's disk cache whatever the policy. ``look``: the iteration's lookahead rows
    [rows, layers, J] (no rows when the gate does not read them)."""
    code = _iteration(
        isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, ordk, ordp,
        ids, row_off, et, plan, req_out, gate, pi, pf, gout, look,
    )  # fmt: skip
    _compact_log(vs, scratch)
    return code


@njit(cache=True, _nrt=False)
def _iteration(
    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work, ordk, ordp, ids, row_off, et, plan,
    req_out, gate, pi, pf, gout, look,
):  # fmt: skip
    """The body of :func:`iteration` and :func:`iteration_gate` (``gate`` None: no
    compiled gate; numba prunes that branch from the plain kernel as it compiles it, so
    no function value is passed there: one passed would keep the kernel out of numba's
    disk cache)."""
    ph = isc[I_PHASE]
    t = fsc[F_T]
    nxt = fsc[F_NXT]
    n_plan = plan.shape[0]
    J = isc[I_J]
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
                    fsc[F_DUE] = _due(isc, gi, gf, cf)
                    return YIELD_T
        if ph == PH_GATE:
            layer = plan[isc[I_POS], 0]
            if _due(isc, gi, gf, cf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t)
            isc[I_GATESEQ] += 1
            isc[I_STAMP] = isc[I_GATESEQ]
            lg[layer] = isc[I_GATESEQ]
            isc[I_STEP] += 1
            isc[I_NITEMS] = _items(isc, ids, layer, work)
            ph = PH_DEMAND
            if gate is not None:  # the policy's compiled gate: its orders, as its hooks' would be
                for c in range(4):
                    gout[c] = 0
                r = gate(pi, pf, layer, t, ids, look, ki, kf, gi, ordk, ordp, gout)
                if r < 0 or not _gate_orders_ok(ki, ordk, ordp, gout):
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    return BAD_GATE
                isc[I_NCAN] = gout[0]  # on_gate_now's: applied after the demand loads
                isc[I_NORD] = gout[1]
                ph = PH_GATED
            elif isc[I_HOOKGATE]:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf, cf)
                return HOOK
        if ph == PH_GATED:  # on_gate's orders: after the search (timed), else at once
            ph = PH_DEMAND
            nc2, ne2, start2 = gout[2], gout[3], gout[0] + gout[1]
            if nc2 + ne2 > 0:
                if fsc[F_SEARCH] > 0:
                    if isc[I_BUFTOP] + nc2 + ne2 > bk.shape[0] or isc[I_NCALL] + 1 > cf.shape[0]:
                        isc[I_PHASE] = PH_GATED  # the caller makes room (the Python's add_call)
                        fsc[F_T] = t
                        return GROW
                    _add_call_from(
                        isc, fsc, gi, gf, cf, ci, bk, bp, ordk, ordp, start2, nc2, ne2,
                        t + fsc[F_SEARCH], isc[I_STAMP],
                    )  # fmt: skip
                    isc[I_DELAYED] += ne2
                else:
                    isc[I_NCAN2] = nc2
                    isc[I_NORD2] = ne2
                    isc[I_SEG2] = start2
        if ph == PH_DEMAND:
            layer = plan[isc[I_POS], 0]
            nslow = _demand(
                isc,
                fsc,
                ki,
                kf,
                gi,
                gf,
                q,
                hf,
                hi,
                lg,
                scratch,
                cf,
                ci,
                bk,
                bp,
                vs,
                work,
                et,
                layer,
                t,
            )
            if nslow < 0:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                return BAD
            # the policy's orders of this gate, after the demand loads (they go first)
            if isc[I_NCAN] or isc[I_NORD]:
                _apply(
                    isc,
                    fsc,
                    ki,
                    kf,
                    gi,
                    gf,
                    q,
                    hf,
                    hi,
                    lg,
                    scratch,
                    cf,
                    ci,
                    bk,
                    bp,
                    vs,
                    ordk,
                    ordp,
                    t,
                )
            if isc[I_NCAN2] or isc[I_NORD2]:  # on_gate's, after on_gate_now's
                _apply_from(
                    isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs,
                    ordk, ordp, isc[I_SEG2], isc[I_NCAN2], isc[I_NORD2], isc[I_STAMP], t,
                )  # fmt: skip
                isc[I_NCAN2] = 0
                isc[I_NORD2] = 0
            if isc[I_NSUSP]:
                _drop_suspended_of_layer(isc, ki, kf, gi, lg, vs, layer)
            top = gf[0, GF_COMP]
            for g in range(1, isc[I_NGPU]):
                if gf[g, GF_COMP] > top:
                    top = gf[g, GF_COMP]
            fsc[F_TOP] = top
            if nslow == 0:
                fsc[F_TLAYER] = t + top
                ph = PH_END
            else:
                ideal = top
                step = isc[I_STEP]
                for g in range(isc[I_NGPU]):
                    if gi[g, G_SLOW] == step:
                        c = gf[g, GF_COMP] + gf[g, GF_LOAD]
                        if c > ideal:
                            ideal = c
                fsc[F_IDEAL] = ideal
                ph = PH_WAIT
        if ph == PH_WAIT:
            npend = isc[I_NPEND]
            i = 0
            while i < npend:
                if ki[work[i, W_PEND], K_STATE] == RESIDENT:
                    i += 1
                    continue
                when = _due(isc, gi, gf, cf)
                if when == np.inf:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = when
                    return NO_LINK
                if nxt <= when:
                    isc[I_PHASE] = ph
                    fsc[F_T] = t
                    fsc[F_DUE] = when
                    return WAIT
                _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, when)
            end = t + fsc[F_TOP]
            step = isc[I_STEP]
            for g in range(isc[I_NGPU]):
                if gi[g, G_SLOW] != step:
                    continue
                tg = _timeline(isc, ki, kf, work, et, g, t, gf[g, GF_COMP])
                if tg > end:
                    end = tg
            fsc[F_TLAYER] = end
            fsc[F_STALL] += end - t - fsc[F_IDEAL]
            ph = PH_END
        if ph == PH_END:
            t = fsc[F_TLAYER] + fsc[F_EXCH]
            ph = PH_END2
            if nxt <= t:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf, cf)
                return YIELD_T
        if ph == PH_END2:
            layer = plan[isc[I_POS], 0]
            if _due(isc, gi, gf, cf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t)
            for i in range(isc[I_NUSED]):
                _use(isc, ki, kf, gi, gf, scratch, work[i, W_USED], t)
            for k in range(layer * J, layer * J + J):  # Engine._unprotect
                if ki[k, K_PROT]:
                    ki[k, K_PROT] = 0
                    gi[ki[k, K_DEV], G_PUTS] += 1
            _attribute(isc, ids, layer, work, row_off, req_out)
            ph = PH_USED
            if isc[I_HOOKUSED]:  # the policy's on_expert_used per expert, in Python
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf, cf)
                return HOOK_USED
        if ph == PH_USED:
            isc[I_STEPS] += 1
            isc[I_POS] += 1
            ph = PH_LAYER
            continue
        if ph == PH_ITER:
            ph = PH_ITER2
            if nxt <= t:
                isc[I_PHASE] = ph
                fsc[F_T] = t
                fsc[F_DUE] = _due(isc, gi, gf, cf)
                return YIELD_T
        if ph == PH_ITER2:
            if _due(isc, gi, gf, cf) <= t:
                _advance(isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, t)
            isc[I_PHASE] = PH_HEAD
            fsc[F_T] = t
            fsc[F_DUE] = _due(isc, gi, gf, cf)
            return DONE


@njit(cache=True, _nrt=False)
def needs_waves(ids, ki, gi, counts, seen, mark, num_experts):
    """True when some layer of ``ids`` [R, L, K] routes to a GPU at least as many distinct
    experts as its cache holds: a demand could then find every slot pinned or taken by
    the one prefetch in flight, and the Python engine would run waves. ``counts``: int64
    scratch per GPU; ``seen``: int64 scratch per key, ``mark`` a fresh value for it."""
    R, L, K = ids.shape
    G = gi.shape[0]
    for layer in range(L):
        for g in range(G):
            counts[g] = 0
        base = layer * num_experts
        for r in range(R):
            for j in range(K):
                k = base + ids[r, layer, j]
                if seen[k] != mark:
                    seen[k] = mark
                    g = ki[k, K_DEV]
                    counts[g] += 1
                    if counts[g] >= gi[g, G_CAP]:
                        return True
    return False


def new_state(num_keys: int, num_layers: int, num_gpus: int, num_experts: int, qcap: int) -> tuple:
    """Zeroed state arrays (isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp,
    vs, work) for a run; vs without kernel victims (:func:`victim_state` makes one)."""
    isc = np.zeros(N_ISC, np.int64)
    fsc = np.zeros(N_FSC, np.float64)
    ki = np.zeros((num_keys, N_KI), np.int64)
    ki[:, K_PREV] = ki[:, K_NEXT] = -1
    kf = np.zeros((num_keys, 3), np.float64)
    gi = np.zeros((num_gpus, N_GI), np.int64)
    gi[:, G_HEAD] = gi[:, G_TAIL] = gi[:, G_BUSY] = gi[:, G_EVSEQ] = gi[:, G_SLOW] = -1
    gi[:, G_INORDER] = 1
    gf = np.zeros((num_gpus, N_GF), np.float64)
    gf[:, GF_EVT] = np.inf
    gf[:, GF_LATEST] = -np.inf
    fsc[F_DUE] = np.inf
    q = np.zeros((num_gpus, qcap), np.int64)
    hcap = 2 * num_keys + 16  # every live entry (one per key) and as many superseded
    hf = np.zeros((num_gpus, hcap), np.float64)
    hi = np.zeros((num_gpus, hcap, 2), np.int64)
    lg = np.zeros(num_layers, np.int64)
    scratch = np.zeros(num_keys, np.int64)
    cf = np.zeros(64, np.float64)
    ci = np.zeros((64, 5), np.int64)
    bk = np.zeros(1024, np.int64)
    bp = np.zeros(1024, np.float64)
    work = np.zeros((num_experts, N_W), np.int64)
    work[:, W_MISSED] = work[:, W_MARK] = -1
    vs = victim_state(None, 4 * num_keys + 64)
    return isc, fsc, ki, kf, gi, gf, q, hf, hi, lg, scratch, cf, ci, bk, bp, vs, work


@njit(cache=True, _nrt=False)
def cached_keys(ki, gi, g, out):
    """The key indices of GPU g's cache entries in the order they entered it (the order
    of ``ExpertCache.entries``), into ``out``; returns how many."""
    n = 0
    k = gi[g, G_HEAD]
    while k >= 0:
        x = k
        m = n
        while m > 0 and ki[out[m - 1], K_INS] > ki[x, K_INS]:
            out[m] = out[m - 1]
            m -= 1
        out[m] = x
        n += 1
        k = ki[k, K_NEXT]
    return n


@njit(cache=True, _nrt=False)
def cached_cands(ki, gi, g, out):
    """GPU g's eviction candidates (resident, unpinned, unprotected: ExpertCache._cands)
    into ``out``, in recency order; returns how many."""
    n = 0
    k = gi[g, G_HEAD]
    while k >= 0:
        if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == 0:
            out[n] = k
            n += 1
        k = ki[k, K_NEXT]
    return n


def victim_state(kv: object, log_rows: int) -> tuple:
    """The kernel's ``vs`` tuple: the arrays of a policy's kernel victims ``kv``
    (policies.cache_victims.KernelVictims; None: dummies, V_ON never set) and a
    membership log of ``log_rows`` rows."""
    vi = np.zeros(N_VI, np.int64)
    vi[V_MG] = -1
    vf = np.zeros(N_VF, np.float64)
    if kv is None:
        arrays = (
            np.zeros((1, 1, 1), np.int64),
            np.zeros((1, 1, 1), np.float64),
            np.zeros((1, 1), np.bool_),
            np.zeros((1, 1), np.float64),
        )
    else:
        arrays = (kv.ist, kv.fl, kv.prot, kv.etnu)  # type: ignore[attr-defined]
    mlog = np.zeros((log_rows, N_M), np.int64)
    mlogf = np.zeros((log_rows, 2), np.float64)
    return (vi, vf, *arrays, mlog, mlogf)


@njit(cache=True, _nrt=False)
def fill_cands(ki, kf, gi, g, keys, layers, experts, last_used, J):
    """GPU g's unprotected eviction candidates (ExpertCache._cands) in recency order:
    their key indices, layers, experts and last_used; returns how many."""
    n = 0
    k = gi[g, G_HEAD]
    while k >= 0:
        if ki[k, K_STATE] == RESIDENT and ki[k, K_PINS] == 0 and ki[k, K_PROT] == 0:
            keys[n] = k
            layers[n] = k // J
            experts[n] = k - (k // J) * J
            last_used[n] = kf[k, KF_LAST]
            n += 1
        k = ki[k, K_NEXT]
    return n


# the kernels compile in sim.fastkernel's list helpers and policies.fmoe_jit's score:
# their sources join every kernel's disk-cache stamp (specs/jitcache.py)
def _stamp_own_kernels() -> None:
    import policies.fmoe_jit
    import sim.fastkernel

    stamp_dependencies(globals().values(), (sim.fastkernel, policies.fmoe_jit))


_stamp_own_kernels()
