"""numba kernels of fMoE's per-step bookkeeping (eviction table, search plan).

Each kernel does, element by element, the same IEEE operations in the same order as the
numpy expression it replaces (documented at each), so results are bitwise the same;
tests/test_fmoe_jit.py checks every kernel against its numpy reference. They exist
because the policy runs at every layer step, on arrays of a few hundred elements, where
numpy's per-call overhead (about a microsecond per operation) is the whole cost.

Imported when an fMoE policy is bound (importing numba and loading the cached kernels
costs about half a second per process; ``fmoe policies`` and ``--help`` never pay it).

Over 450 lines on purpose: numba's on-disk cache keys a compiled function on its own
source file only, so a kernel and the kernels it calls (gate_step -> observe_choice ->
request_bins; victims -> _victim_etnu -> pow_rows) live in one module; a kernel calling
one from another file would keep a stale compiled copy when only the callee changes.
"""

from __future__ import annotations

import numpy as np
from numba import njit

AGE_BUCKETS = 16  # as policies.fmoe_eviction.AGE_BUCKETS
_SATURATED = 1 << (AGE_BUCKETS - 2)  # ages above this land in the last bucket
# _select_partial takes this many of a row's largest in one pass, then sorts the row once
# (cheaper for the few experts a good match selects)
_PARTIAL_MAX = 12
# table rows of one block (3 x policies.fmoe_eviction.CAL_BINS): the request-frequency
# bins, then the semantic and the trajectory forecasts' bins. A table of more rows is the
# per-layer one (``layer_table=True``): block 0 pooled over layers, block 1 + l layer l's.
CAL_ROWS = 30


def _bucket_table() -> np.ndarray:
    """age_bucket of every age 0.._SATURATED: min(bit length of age - 1, 15), 0 for 0 and 1."""
    ages = np.arange(_SATURATED + 1)
    out = np.zeros(ages.size, np.int64)
    for a in range(2, ages.size):
        out[a] = min(int(a - 1).bit_length(), AGE_BUCKETS - 1)
    return out


_BUCKETS = _bucket_table()  # a constant of the compiled kernels


@njit(cache=True, inline="always")
def age_bucket1(age):  # noqa: ANN001, ANN201 - numba
    """:func:`policies.fmoe_eviction.age_bucket` of one int: min(ceil(log2(max(age, 1))),
    15), which for integers is the bit length of age - 1 (tested against the numpy form
    for every age below 2^22 and for the "never chosen" ages)."""
    if age <= 1:
        return 0
    if age > _SATURATED:
        return AGE_BUCKETS - 1
    return _BUCKETS[age]


@njit(cache=True, inline="always")
def pow_rows(x, n):  # noqa: ANN001, ANN201 - numba
    """x ** n for an int n >= 1 by squaring, in a fixed order of multiplications (so the
    Python reference and every kernel give the same bits; libm's pow and numpy's fast
    paths may differ in the last bit)."""
    r = 1.0
    b = x
    while n > 0:
        if n & 1:
            r *= b
        b *= b
        n >>= 1
    return r


@njit(cache=True, inline="always")
def layer_row(fl, lay):  # noqa: ANN001, ANN201 - numba
    """Offset of layer ``lay``'s block in the table ``fl``: 0 for the pooled table of
    CAL_ROWS rows, (1 + lay) x CAL_ROWS for the per-layer one."""
    return (1 + lay) * CAL_ROWS if fl.shape[1] > CAL_ROWS else 0


@njit(cache=True)
def request_bins(ist, rc, rn, slots, base, bins, layer, pop):  # noqa: ANN001, ANN201 - numba
    """ist[3, l] for l = ``layer`` (all layers when -1): each expert's request-frequency
    bin for the batch of request slots ``slots``: f = 1 - prod over the batch's requests
    of (1 - f_r), f_r = (choices of the request + w q) / (its rows seen + w) (w = 1, or
    pop[l, J + 1] when ``pop`` has that column: ``request_prior="eb"``), binned into
    ``bins`` equal bins (no request: f = q). q is the prior of one pseudo-observation:
    the population's rate (pop[l, j] + base) / (pop[l, J] + 1), ``pop`` [L, J + 1] the
    choices of every expert and the rows seen at each layer over all requests so far
    (:func:`observe_choice`); with an empty ``pop`` the uninformed rate ``base``."""
    L, J = ist.shape[1], ist.shape[2]
    lo, hi = (0, L) if layer < 0 else (layer, layer + 1)
    population = pop.shape[0] > 0
    for lay in range(lo, hi):
        # the prior's weight: one pseudo-observation, or pop[l, J + 1] where kept
        # (``request_prior="eb"``, policies/fmoe_reqprior.py; inf: f_r = q). w = 1.0 gives
        # the same bits as the one-observation rule (1.0 * q == q)
        w = pop[lay, J + 1] if pop.shape[1] > J + 1 else 1.0
        for j in range(J):
            q = (pop[lay, j] + base) / (pop[lay, J] + 1.0) if population else base
            if slots.shape[0] == 0 or w == np.inf:
                f = q
            else:
                miss = 1.0
                for s in slots:
                    miss *= 1.0 - (rc[s, lay, j] + w * q) / (rn[s, lay] + w)
                f = 1.0 - miss
            # bins equal in f / (f + base): the uninformed rate in the middle, so fine-
            # grained models (base = K/J of a few percent) get as many bins as coarse ones
            ist[3, lay, j] = min(int(f / (f + base) * bins), bins - 1)
            if ist.shape[0] > 4:  # transitions_next_only: the plain bin, kept apart
                ist[4, lay, j] = ist[3, lay, j]


@njit(cache=True)
def observe_choice(ist, fl, prot, layer, it, ids, rc, rn, row_slot, slots, base, bins, pop):  # noqa: ANN001, ANN201, E501 - numba
    """A gate of ``layer`` chose ``ids`` [B, K] (repeats allowed) in iteration ``it``.

    ``ist`` int64 [4, L, J]: [0] the last iteration that chose each expert, [1] its
    forecast's table row, [2, :, 0] the iteration of each layer's last forecast, [3] its
    request-frequency bin (the table's row without a forecast); ``fl`` float64 [3, R, A]:
    [0] choices (hits) and [1] visits per (table row, age bucket), [2] the chance table;
    ``prot`` bool [L, J]: protected experts; ``rc`` [S, L, J] / ``rn`` [S, L]: each
    request slot's choices and rows seen per layer; ``row_slot`` [B]: each row's slot
    (empty: rows of unknown requests); ``slots``: the batch's distinct slots; ``pop``
    [L, J + 1]: the population's choices and rows seen (empty: not kept).
    At the layer's first gate of the iteration: every expert's visit is counted in its
    request-frequency row and, for a fresh forecast, in its forecast row, and each
    distinct chosen expert's choice likewise (integer counts); the rows' choices are
    added to their requests' counts and to the population's, and the layer's bins
    refreshed. Then the chosen
    experts' last iteration becomes ``it`` and the protection of layers <= ``layer`` ends.
    Returns False (and changes nothing) when an id lies outside [0, J).
    """
    last = ist[0, layer]
    rows = ist[1, layer]
    freq = ist[3, layer]
    J = last.shape[0]
    flat = ids.ravel()
    for i in range(flat.shape[0]):
        if flat[i] < 0 or flat[i] >= J:
            return False
    first = True
    for j in range(J):
        if last[j] == it:
            first = False
            break
    if first:
        fresh = ist[2, layer, 0] == it
        off = layer_row(fl, layer)  # the per-layer table counts in both blocks
        for j in range(J):
            b = age_bucket1(it - last[j])
            fl[1, freq[j], b] += 1.0
            if fresh:
                fl[1, rows[j], b] += 1.0
            if off:
                fl[1, off + freq[j], b] += 1.0
                if fresh:
                    fl[1, off + rows[j], b] += 1.0
        seen = np.zeros(J, np.bool_)
        for i in range(flat.shape[0]):
            j = flat[i]
            if seen[j]:
                continue
            seen[j] = True
            b = age_bucket1(it - last[j])
            fl[0, freq[j], b] += 1.0
            if fresh:
                fl[0, rows[j], b] += 1.0
            if off:
                fl[0, off + freq[j], b] += 1.0
                if fresh:
                    fl[0, off + rows[j], b] += 1.0
        B = ids.shape[0]
        K = flat.shape[0] // max(B, 1)
        if pop.shape[0] > 0:
            pop[layer, J] += B
            for i in range(flat.shape[0]):
                pop[layer, flat[i]] += 1.0
        if row_slot.shape[0] == B:
            for r in range(B):
                s = row_slot[r]
                rn[s, layer] += 1.0
                for k in range(K):
                    rc[s, layer, flat[r * K + k]] += 1.0
        if row_slot.shape[0] == B or pop.shape[0] > 0:
            request_bins(ist, rc, rn, slots, base, bins, layer, pop)
    for i in range(flat.shape[0]):
        last[flat[i]] = it
    for lay in range(min(layer + 1, prot.shape[0])):
        for j in range(prot.shape[1]):
            prot[lay, j] = False
    return True


@njit(cache=True)
def _pav_row(h, w, out):  # noqa: ANN001, ANN202 - numba
    """out = h / w made non-increasing by pooling adjacent violators (weighted by w)."""
    A = h.shape[0]
    bh = np.empty(A)
    bw = np.empty(A)
    bc = np.empty(A, np.int64)
    nb = 0
    for c in range(A):
        bh[nb] = h[c]
        bw[nb] = w[c]
        bc[nb] = 1
        nb += 1
        while nb > 1 and bh[nb - 2] / bw[nb - 2] < bh[nb - 1] / bw[nb - 1]:
            bh[nb - 2] += bh[nb - 1]
            bw[nb - 2] += bw[nb - 1]
            bc[nb - 2] += bc[nb - 1]
            nb -= 1
    i = 0
    for b in range(nb):
        v = bh[b] / bw[b]
        for _ in range(bc[b]):
            out[i] = v
            i += 1


@njit(cache=True)
def decreasing_rows(fl, base, pooled):  # noqa: ANN001, ANN201 - numba
    """fl[2] = the chance table: per row, an estimate of choices / visits made
    non-increasing in age (pool-adjacent-violators).

    Forecast rows (from ``pooled`` on): (choices + base) / (visits + 1), one pseudo-visit
    at the uninformed rate. The first ``pooled`` rows (request-frequency bins) are shrunk
    toward their pooled chance by age, p0 (itself so estimated and made non-increasing),
    by empirical Bayes: the variance of the bins' rates around p0 beyond what sampling
    explains (tau^2: visit-weighted squared deviations minus p0 (1 - p0) per populated
    cell, over visits, over the whole table) sets the prior's weight
    k = p0 (1 - p0) / tau^2 pseudo-visits per age; no excess variance pools the bins
    completely, so where request frequency tells nothing the order is by age alone
    (LRU's), and where it does the bins keep their own rates."""
    R, A = min(fl.shape[1], CAL_ROWS), fl.shape[2]
    h = np.empty(A)
    w = np.empty(A)
    prior = np.empty(A)
    k = np.empty(A)
    for c in range(A):
        hs = 0.0
        ws = 0.0
        for r in range(pooled):
            hs += fl[0, r, c]
            ws += fl[1, r, c]
        h[c] = hs + base
        w[c] = ws + 1.0
    _pav_row(h, w, prior)
    # one between-bin variance for the table: observed (visit-weighted) minus sampling's
    ws = 0.0
    obs = 0.0
    expect = 0.0
    for c in range(A):
        p0 = prior[c]
        for r in range(pooled):
            n = fl[1, r, c]
            if n > 0:
                d = fl[0, r, c] / n - p0
                obs += n * d * d
                expect += p0 * (1.0 - p0)
                ws += n
    tau2 = 0.0 if ws <= 0 else (obs - expect) / ws
    for c in range(A):
        k[c] = prior[c] * (1.0 - prior[c]) / tau2 if tau2 > 0 else np.inf
    # request rows: the shrunk rates, made non-decreasing in the request's frequency at
    # each age (an expert the request chose more often is not less likely to come back,
    # LFU's assumption) and then non-increasing in age (LRU's), row by row
    est = np.empty((pooled, A))
    wt = np.empty((pooled, A))
    hb = np.empty(pooled)
    wb = np.empty(pooled)
    ob = np.empty(pooled)
    for c in range(A):
        for r in range(pooled):
            if k[c] == np.inf:
                hb[pooled - 1 - r] = prior[c]
                wb[pooled - 1 - r] = 1.0
            else:
                hb[pooled - 1 - r] = fl[0, r, c] + k[c] * prior[c]
                wb[pooled - 1 - r] = fl[1, r, c] + k[c]
        _pav_row(hb, wb, ob)  # reversed: non-increasing from the top bin down
        for r in range(pooled):
            est[r, c] = ob[pooled - 1 - r]
            wt[r, c] = wb[pooled - 1 - r]
    for r in range(R):
        for c in range(A):
            if r < pooled:
                h[c] = est[r, c] * wt[r, c]
                w[c] = wt[r, c]
            else:
                h[c] = fl[0, r, c] + base
                w[c] = fl[1, r, c] + 1.0
        _pav_row(h, w, fl[2, r])
    if fl.shape[1] > CAL_ROWS:
        _layer_blocks(fl, pooled)


@njit(cache=True)
def _layer_blocks(fl, pooled):  # noqa: ANN001, ANN202 - numba
    """fl[2] of every layer's block (``layer_table=True``): each cell's own counts
    shrunk toward the pooled chance g of its cell (block 0, just made), by empirical
    Bayes as :func:`decreasing_rows` shrinks the request bins: the variance of the
    layers' rates around the cell's raw pooled rate beyond what sampling explains (one
    tau^2 for the table) sets the prior's weight k = g (1 - g) / tau^2 pseudo-visits
    (block 0 counts every layer's visits, so a cell visited in a layer is visited in
    the pool); none pools
    completely, so a layer is told apart only where the counts show it differs. Then, as
    the pooled rows: request rows non-decreasing in frequency, every row non-increasing
    in age (pool-adjacent-violators)."""
    A = fl.shape[2]
    nb = fl.shape[1] // CAL_ROWS - 1
    obs = 0.0
    expect = 0.0
    ws = 0.0
    for blk in range(1, nb + 1):
        for r in range(CAL_ROWS):
            for c in range(A):
                n = fl[1, blk * CAL_ROWS + r, c]
                if n > 0:  # around the cell's raw pooled rate (its counts over layers)
                    g = fl[0, r, c] / fl[1, r, c]
                    d = fl[0, blk * CAL_ROWS + r, c] / n - g
                    obs += n * d * d
                    expect += g * (1.0 - g)
                    ws += n
    tau2 = 0.0 if ws <= 0 else (obs - expect) / ws
    if tau2 <= 0:  # the layers differ by no more than sampling: the pooled table
        for blk in range(1, nb + 1):
            fl[2, blk * CAL_ROWS : (blk + 1) * CAL_ROWS] = fl[2, :CAL_ROWS]
        return
    h = np.empty(A)
    w = np.empty(A)
    hb = np.empty(pooled)
    wb = np.empty(pooled)
    ob = np.empty(pooled)
    est = np.empty((CAL_ROWS, A))
    wt = np.empty((CAL_ROWS, A))
    for blk in range(1, nb + 1):
        o = blk * CAL_ROWS
        for r in range(CAL_ROWS):
            for c in range(A):
                g = fl[2, r, c]
                k = g * (1.0 - g) / tau2
                wt[r, c] = fl[1, o + r, c] + k
                est[r, c] = (fl[0, o + r, c] + k * g) / wt[r, c]
        for c in range(A):  # request rows: non-decreasing in frequency
            for r in range(pooled):
                hb[pooled - 1 - r] = est[r, c] * wt[r, c]
                wb[pooled - 1 - r] = wt[r, c]
            _pav_row(hb, wb, ob)
            for r in range(pooled):
                est[r, c] = ob[pooled - 1 - r]
        for r in range(CAL_ROWS):  # every row: non-increasing in age
            for c in range(A):
                h[c] = est[r, c] * wt[r, c]
                w[c] = wt[r, c]
            _pav_row(h, w, fl[2, o + r])


@njit(cache=True)
def expected_next_use(ist, fl, prot, out, g, it, bins, rows):  # noqa: ANN001, ANN201 - numba
    """out [L, J] = minus the expected layer steps to each expert's next use (the eviction
    score before its recency tie-break; policies.fmoe_eviction's module doc; protected
    experts -0.0), with chance = fl[2] and r = the expert's request-frequency row::

        nxt = float(L - g + lay)
        ahead (lay > g): p_now = chance[forecast row if fresh else r, b(age)],
            for an iteration of ``rows`` > 1 rows 1 - pow_rows(1 - p_now, rows) (rows
            choosing independently given the cell; one row: p_now itself, untouched),
            p_next = chance[r2, b(age + 1)],
            e = p_now * (lay - g) + (1 - p_now) * (nxt + L * (1 / p_next - 1))
        passed: p1 = chance[r, b], p2 = chance[r2, b], b = b(max(age, 0) + 1),
            e = nxt + L * (1 / p2 - 1) + L * (p2 - p1) / p2  (= nxt + L (1 - p1) / p2)

    r2, the row of the visits after the next one, is r itself for an ``ist`` of 4 rows
    (the term L (p2 - p1) / p2 is then exactly 0.0) and ist[4] for one of 5
    (``transitions_later``: the plain or the two-step bin, policies.fmoe_transition).
    """
    L, J = out.shape
    A = fl.shape[2]
    # L * (1 / chance[r, b] - 1) per request-frequency row r and bucket b, once each
    wait0 = np.empty((bins, A))
    for r in range(bins):
        for b in range(A):
            wait0[r, b] = L * (1.0 / fl[2, r, b] - 1.0)
    layered = fl.shape[1] > CAL_ROWS
    later_row = ist.shape[0] > 4
    for lay in range(L):
        fresh = ist[2, lay, 0] == it
        nxt = float(L - g + lay)
        ahead = lay > g
        off = layer_row(fl, lay)
        for j in range(J):
            if prot[lay, j]:
                out[lay, j] = -0.0
                continue
            if layered:  # the per-layer table: no shared wait0
                out[lay, j] = _victim_etnu(ist, fl, prot, g, it, L, lay, j, rows)
                continue
            age = it - ist[0, lay, j]
            freq = ist[3, lay, j]
            later = ist[4, lay, j] if later_row else freq
            if ahead:
                row = ist[1, lay, j] if fresh else freq
                p_now = fl[2, off + row, age_bucket1(age)]
                if rows > 1:
                    p_now = 1.0 - pow_rows(1.0 - p_now, rows)
                wait = nxt + wait0[later, age_bucket1(age + 1)]
                out[lay, j] = -(p_now * (lay - g) + (1.0 - p_now) * wait)
            else:
                b = age_bucket1(max(age, 0) + 1)
                out[lay, j] = -(nxt + wait0[later, b] + _first_visit(fl, freq, later, b, L))


@njit(cache=True)
def gate_step(
    ist,
    fl,
    prot,
    out,
    layer,
    it,
    ids,
    fc_rows,
    target,
    eager,
    rc,
    rn,
    row_slot,
    slots,
    base,
    bins,
    pop,
    rows,
):  # noqa: ANN001, ANN201, E501 - numba
    """One planned gate in one call: :func:`observe_choice`; then, when ``target`` >= 0,
    layer ``target``'s forecast (its experts' table rows ``fc_rows[layer]``, made in
    iteration ``it``); then, when ``eager`` (the chance table is this iteration's),
    :func:`expected_next_use` into ``out`` at ``g = layer``. Returns observe_choice's
    answer (nothing changes when it is False)."""
    if not observe_choice(ist, fl, prot, layer, it, ids, rc, rn, row_slot, slots, base, bins, pop):
        return False
    if target >= 0:
        ist[2, target, 0] = it
        for j in range(ist.shape[2]):
            ist[1, target, j] = fc_rows[layer, j]
    if eager:
        expected_next_use(ist, fl, prot, out, layer, it, bins, rows)
    return True


@njit(cache=True)
def running_sums(cum_dots):  # noqa: ANN001, ANN201 - numba
    """``cum_dots`` float32 [L, B, n] becomes its running sums over layers, in layer
    order: the float32 adds of ``for l in 1..L-1: cum_dots[l] += cum_dots[l - 1]``
    (numpy walks that in-place add slowly: one call per layer)."""
    L, B, n = cum_dots.shape
    for lay in range(1, L):
        for b in range(B):
            cur = cum_dots[lay, b]
            prev = cum_dots[lay - 1, b]
            for c in range(n):
                cur[c] += prev[c]


@njit(cache=True)
def _select_partial(p, score, k, use_delta, head, out, counts, r):  # noqa: ANN001, ANN202 - numba
    """:func:`select_rows` of one row without sorting all of it: the first _PARTIAL_MAX
    of the stable descending order (ties to the lower id) from one pass over the row
    into ``head`` (an index enters only when it beats the last kept one strictly), read
    as far as the rule reads (the selection stops at n; fine-grained rows of hundreds of
    experts select a few); from the _PARTIAL_MAX-th on, the rest of the order comes from
    one stable sort of -p (the same order; NaN rows are left to the caller). The same
    running sums in the same order, so the same picks.
    False (nothing written) when the row holds a NaN, which orders differently."""
    J = p.shape[0]
    for q in range(J):
        if p[q] != p[q]:
            return False
    h = min(_PARTIAL_MAX, J)
    c0 = 0
    for q in range(J):
        v = p[q]
        if c0 == h and not v > p[head[h - 1]]:
            continue
        s = c0 if c0 < h else h - 1
        while s > 0 and v > p[head[s - 1]]:
            head[s] = head[s - 1]
            s -= 1
        head[s] = q
        if c0 < h:
            c0 += 1
    thr = min(1.0 - np.float64(score), 1.0) - 1e-6
    cum = np.float32(0.0)
    found = not use_delta
    order = np.empty(0, np.int64)
    n = k  # without delta; with it, known once the running sum reaches thr
    c = 0
    i = 0
    while i < J:
        if found and i >= n:
            break
        if i == _PARTIAL_MAX:
            # a weak match reads far down the row: the rest of the order from one stable
            # sort (its first i entries are the ones taken: the same order from here)
            order = np.argsort(-p, kind="mergesort")
        m = order[i] if i >= _PARTIAL_MAX else head[i]
        if not found:
            cum += p[m]
            if np.float64(cum) >= thr:
                found = True
                n = max(i + 1, k)
        # before thr is reached, i < first + 1 <= n: every i is inside the selection
        if i < k or p[m] > 0.0:
            out[c] = m
            c += 1
        i += 1
    counts[r] = c
    return True


@njit(cache=True)
def select_rows(rows, scores, k, use_delta, picks, counts):  # noqa: ANN001, ANN201 - numba
    """:func:`policies.fmoe_select.select_rows` of ``rows`` float32 [R, J] with float32
    ``scores`` [R]: row r's selected experts, by descending probability (ties to the lower
    id), go to ``picks[r, :counts[r]]``.

    The top-k always; with ``use_delta`` the exact similarity-aware rule: the float32
    running sums ``cum`` of the row in that order, thr = min(1 - score, 1) - 1e-6 in
    float64, n = max(first i with cum[i] >= thr (float64 comparison, as np.searchsorted
    left), k), and beyond the first k only experts of probability > 0. (select_rows'
    fast path, the top-k when its mass clears thr by a margin, is this rule's answer
    there; it is only a shortcut.)
    """
    R, J = rows.shape
    order = np.empty(J, np.int64)
    head = np.empty(_PARTIAL_MAX, np.int64)
    for r in range(R):
        p = rows[r]
        if _select_partial(p, scores[r], k, use_delta, head, picks[r], counts, r):
            continue
        # a NaN in the row: the full sort below, whose comparisons place it as before
        # stable descending order: insertion sort, a later equal value stays behind
        for i in range(J):
            v = p[i]
            m = i
            while m > 0 and p[order[m - 1]] < v:
                order[m] = order[m - 1]
                m -= 1
            order[m] = i
        n = k
        if use_delta:
            thr = min(1.0 - np.float64(scores[r]), 1.0) - 1e-6
            cum = np.float32(0.0)
            first = J
            for i in range(J):
                cum += p[order[i]]
                if np.float64(cum) >= thr:
                    first = i
                    break
            n = max(first + 1, k)
        c = 0
        for i in range(min(n, J)):
            j = order[i]
            if i < k or p[j] > 0.0:
                picks[r, c] = j
                c += 1
        counts[r] = c


@njit(cache=True)
def select_rows_flat(rows, scores, k, use_delta, dist, picks, counts, flat_j, flat_v):  # noqa: ANN001, ANN201 - numba
    """:func:`select_rows` (its picks in ``picks``, how many in ``counts``), then every
    row's picks packed row after row: ``flat_j`` the experts, ``flat_v`` their priorities
    ``float64(rows[r, j]) / dist[r, 0]`` (float64 ``dist`` [R, 1]; numpy's
    ``np.take_along_axis(rows, picks, axis=1) / dist``, the same IEEE division). Only the
    picks leave the kernel, not R x max(counts) of them. Returns how many in all."""
    select_rows(rows, scores, k, use_delta, picks, counts)
    t = 0
    for r in range(rows.shape[0]):
        d = dist[r, 0]
        for i in range(counts[r]):
            j = picks[r, i]
            flat_j[t] = j
            flat_v[t] = np.float64(rows[r, j]) / d
            t += 1
    return t


@njit(cache=True, inline="always")
def _victim_etnu(ist, fl, prot, g, it, L, lay, j, rows):  # noqa: ANN001, ANN202 - numba
    """One candidate's :func:`expected_next_use` value (minus its expected time to next
    use) at gate ``g`` of iteration ``it`` of ``rows`` rows, ``wait0`` inlined: the same
    product."""
    if prot[lay, j]:
        return -0.0
    age = it - ist[0, lay, j]
    off = layer_row(fl, lay)
    freq = off + ist[3, lay, j]
    later = off + ist[4, lay, j] if ist.shape[0] > 4 else freq
    nxt = float(L - g + lay)
    if lay > g:
        row = off + ist[1, lay, j] if ist[2, lay, 0] == it else freq
        p_now = fl[2, row, age_bucket1(age)]
        if rows > 1:
            p_now = 1.0 - pow_rows(1.0 - p_now, rows)
        wait = nxt + L * (1.0 / fl[2, later, age_bucket1(age + 1)] - 1.0)
        return -(p_now * (lay - g) + (1.0 - p_now) * wait)
    b = age_bucket1(max(age, 0) + 1)
    wait = L * (1.0 / fl[2, later, b] - 1.0)
    return -(nxt + wait + _first_visit(fl, freq, later, b, L))


@njit(cache=True, inline="always")
def _first_visit(fl, freq, later, b, L):  # noqa: ANN001, ANN202 - numba
    """The next visit's own chance p1 = fl[2, freq, b] against the later visits' p2 =
    fl[2, later, b] (``transitions_next_only``): the expected time nxt + L (1 - p1) / p2
    is nxt + L (1 / p2 - 1) plus this term, L (p2 - p1) / p2: exactly 0.0 when the two
    rows are one (every call without the option)."""
    if freq == later:
        return 0.0
    p2 = fl[2, later, b]
    return L * (p2 - fl[2, freq, b]) / p2


@njit(cache=True, inline="always")
def _before(s, lay, j, s2, lay2, j2):  # noqa: ANN001, ANN202 - numba
    """(s, lay, j) ranks before (s2, lay2, j2): lower score, ties to the lower key."""
    return s < s2 or (s == s2 and (lay < lay2 or (lay == lay2 and j < j2)))


@njit(cache=True)
def victims(ist, fl, prot, g, it, layers, experts, last_used, n, tie, out, out_s, out_e, rows):  # noqa: ANN001, ANN201, E501 - numba
    """The first ``len(out)`` eviction victims among candidates 0..n-1 (``layers``,
    ``experts``, ``last_used``), in order: ascending score ``etnu + tie * last_used``,
    ties to the lower (layer, expert) key, etnu being :func:`expected_next_use`'s value
    at gate ``g`` of iteration ``it`` of ``rows`` rows computed for the candidates only
    with the same operations. Their slots go to ``out``, their scores to ``out_s`` and their etnu to
    ``out_e`` (both at least as long as ``out``); returns how many (min(n, len(out))),
    or -2 when a score is NaN (the caller then scores in Python, whose min treats NaN its
    own way)."""
    L = ist.shape[1]
    m = out.shape[0]
    bl = np.empty(m, np.int64)
    bj = np.empty(m, np.int64)
    c = 0
    for i in range(n):
        lay = layers[i]
        j = experts[i]
        e = _victim_etnu(ist, fl, prot, g, it, L, lay, j, rows)
        s = e + tie * last_used[i]
        if s != s:
            return -2
        if c == m and not _before(s, lay, j, out_s[m - 1], bl[m - 1], bj[m - 1]):
            continue
        # insert into the ranked buffer (the worst falls off a full one)
        q = c if c < m else m - 1
        while q > 0 and _before(s, lay, j, out_s[q - 1], bl[q - 1], bj[q - 1]):
            out_s[q] = out_s[q - 1]
            out_e[q] = out_e[q - 1]
            bl[q] = bl[q - 1]
            bj[q] = bj[q - 1]
            out[q] = out[q - 1]
            q -= 1
        out_s[q] = s
        out_e[q] = e
        bl[q] = lay
        bj[q] = j
        out[q] = i
        if c < m:
            c += 1
    return c


@njit(cache=True)
def fresh_put(issued, layer, experts, cached, vals, ahead, cp, cidx, cnt):  # noqa: ANN001, ANN201 - numba
    """``FmoeOrders._order``'s deadline candidates in one call: the experts of
    ``experts`` (ids of ``layer``, in order) neither ordered this iteration (``issued``
    bool [L, J]) nor cached (``cached[i]``) are marked in ``issued`` at once (a repeated
    id counts once), and each becomes a candidate of the set ``cp`` (float64 p over
    layer x J flat keys, -1.0 absent) / ``cidx`` (flat keys in first-insertion order, the
    first ``cnt`` used) at p = ``vals[i] * ahead`` (float64), set where larger than the
    one held, appended where new (:meth:`policies.fmoe_cands.CandidateSet.put`'s rule).
    Returns the new count of ``cidx``."""
    J = issued.shape[1]
    for i in range(experts.shape[0]):
        j = experts[i]
        if issued[layer, j] or cached[i]:
            continue
        issued[layer, j] = True
        f = layer * J + j
        p = vals[i] * ahead
        cur = cp[f]
        if p > cur:
            if cur == -1.0:
                cidx[cnt] = f
                cnt += 1
            cp[f] = p
    return cnt
