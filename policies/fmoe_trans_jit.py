"""numba kernels of fMoE's token-to-token transition estimate (``transitions=True``,
:mod:`policies.fmoe_transition`).

Self-contained on purpose: numba's on-disk cache keys a compiled function on its own
source file only, so these kernels call nothing from another module (the request
frequency formula of :func:`policies.fmoe_jit.request_bins` is repeated in
:func:`_request_f`, element by element the same operations).

The arrays (all per MoE layer l):

- ``tc`` float32 [L, J, J]: transitions counted, tc[l, i, j] = tokens whose layer l chose
  j right after a token (of the same request) whose layer l chose i;
- ``tn`` float64 [L, J + 1]: tn[l, i] = tokens after a token that chose i (the rows of
  tc[l, i]); tn[l, J] = tokens that had a predecessor at all;
- ``tm`` float64 [L, J]: of those, the tokens that chose j (the marginal's counts);
- ``tau`` float64 [L]: the between-row variance of tc's rates around the marginal beyond
  what sampling explains (empirical Bayes, :func:`shrinkage`; <= 0: no structure shown,
  every row pooled into the marginal);
- ``prev`` int64 [S, L, K]: each request slot's latest token's choices per layer (-1: none).

Memory: L x J x J float32 counts, 4 bytes each (DeepSeek-V3's 58 x 256 x 256: 15 MiB);
a gate costs O(rows x K + slots x K x J) for its layer.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _marginal(tm, tn, lay, j, base):  # noqa: ANN001, ANN202 - numba
    """Chance a token's layer ``lay`` chooses j, one pseudo-token at the uninformed rate."""
    J = tm.shape[1]
    return (tm[lay, j] + base) / (tn[lay, J] + 1.0)


@njit(cache=True)
def transition_chance(tc, tn, tm, tau, lay, prev_ids, j, base):  # noqa: ANN001, ANN201 - numba
    """Chance that the next token's layer ``lay`` chooses j after a token that chose
    ``prev_ids`` (int64 [K], -1 entries ignored): the mean over its experts i of
    (tc[lay, i, j] + k m) / (tn[lay, i] + k), m the marginal, k = m (1 - m) / tau[lay]
    pseudo-tokens (tau <= 0, or no expert: m itself)."""
    m = _marginal(tm, tn, lay, j, base)
    t2 = tau[lay]
    if t2 <= 0.0:
        return m
    k = m * (1.0 - m) / t2
    s = 0.0
    c = 0
    for q in range(prev_ids.shape[0]):
        i = prev_ids[q]
        if i < 0:
            continue
        s += (tc[lay, i, j] + k * m) / (tn[lay, i] + k)
        c += 1
    if c == 0:
        return m
    return s / c


@njit(cache=True)
def shrinkage(tc, tn, tm, tau, base):  # noqa: ANN001, ANN201 - numba
    """tau[l] for every layer: the variance of the rows' rates tc[l, i, j] / tn[l, i]
    around the marginal m_j beyond the binomial sampling variance m_j (1 - m_j) / tn[l, i]
    (weighted by tn[l, i]; the method of moments layer_table uses). <= 0 where the counts
    show no more spread than chance."""
    L, J = tm.shape
    for lay in range(L):
        obs = 0.0
        expect = 0.0
        ws = 0.0
        for j in range(J):
            m = _marginal(tm, tn, lay, j, base)
            for i in range(J):
                n = tn[lay, i]
                if n > 0:
                    d = tc[lay, i, j] / n - m
                    obs += n * d * d
                    expect += m * (1.0 - m)
                    ws += n
        tau[lay] = 0.0 if ws <= 0 else (obs - expect) / ws


@njit(cache=True, inline="always")
def _request_f(rc, rn, slots, pop, lay, j, base):  # noqa: ANN001, ANN202 - numba
    """f of policies.fmoe_jit.request_bins for (lay, j): the same operations."""
    J = rc.shape[2]
    q = (pop[lay, j] + base) / (pop[lay, J] + 1.0) if pop.shape[0] > 0 else base
    w = pop[lay, J + 1] if pop.shape[1] > J + 1 else 1.0  # request_prior="eb"'s weight
    if slots.shape[0] == 0 or w == np.inf:
        return q
    miss = 1.0
    for s in slots:
        miss *= 1.0 - (rc[s, lay, j] + w * q) / (rn[s, lay] + w)
    return 1.0 - miss


@njit(cache=True)
def transition_bins(ist, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, bins, layer):  # noqa: ANN001, ANN201 - numba
    """ist[3, l] for l = ``layer`` (all layers when -1): each expert's request-frequency
    bin with the transitions' evidence about the next token: the request frequency f
    (as policies.fmoe_jit.request_bins) in odds, times the odds ratio of T (the chance
    any of the batch's requests chooses j next, 1 - prod_s (1 - transition_chance after
    its latest token)) to the marginal's (1 - prod_s (1 - m)), over the slots with a
    latest token; binned as request_bins bins f. No such slot, or no structure (tau
    <= 0): the plain bin. Returns nothing; the table's cells calibrate the bins.
    :func:`transition_bins_into` writes another row of ``ist`` (the two-step bins)."""
    transition_bins_into(ist, 3, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, bins, layer)


@njit(cache=True)
def transition_bins_into(ist, out, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, bins, layer):  # noqa: ANN001, ANN201, E501 - numba
    """:func:`transition_bins` into ist[out]: with the one-step counts, the bins of the
    next token; with the two-step counts (tc[l, i, j]: tokens choosing j two tokens after
    a token that chose i), the bins of the token after it.

    Per expert j the operations of :func:`transition_bins_into_ref` in its order (each
    slot's transition_chance: the sum over the latest token's experts i in order, over
    their count; the products over slots in slot order), with the loop over j innermost
    so that the divisions of a row of tc run as vector instructions (the same IEEE
    operations on each element: bitwise the same, tests/test_fmoe_trans_jit.py)."""
    L, J = ist.shape[1], ist.shape[2]
    lo, hi = (0, L) if layer < 0 else (layer, layer + 1)
    f = np.empty(J)
    m = np.empty(J)
    k = np.empty(J)
    km = np.empty(J)
    acc = np.empty(J)
    miss_t = np.empty(J)
    miss_m = np.empty(J)
    population = pop.shape[0] > 0
    for lay in range(lo, hi):
        # _request_f of every j, its operations written out here: called (inlined) in
        # this loop it ran about ten times slower (numba's inlined early returns)
        w = pop[lay, J + 1] if pop.shape[1] > J + 1 else 1.0
        plain = slots.shape[0] == 0 or w == np.inf
        for j in range(J):
            q = (pop[lay, j] + base) / (pop[lay, J] + 1.0) if population else base
            if plain:
                f[j] = q
            else:
                miss = 1.0
                for si in range(slots.shape[0]):
                    s = slots[si]
                    miss *= 1.0 - (rc[s, lay, j] + w * q) / (rn[s, lay] + w)
                f[j] = 1.0 - miss
            miss_t[j] = 1.0
            miss_m[j] = 1.0
        seen = False
        t2 = tau[lay]
        if t2 > 0.0:
            den = tn[lay, J] + 1.0
            for j in range(J):
                mj = (tm[lay, j] + base) / den  # _marginal
                m[j] = mj
                kj = mj * (1.0 - mj) / t2
                k[j] = kj
                km[j] = kj * mj
            for s in slots:
                if s >= prev.shape[0] or prev[s, lay, 0] < 0:
                    continue
                seen = True
                for j in range(J):
                    acc[j] = 0.0
                c = 0
                for q in range(prev.shape[2]):
                    i = prev[s, lay, q]
                    if i < 0:
                        continue
                    ni = tn[lay, i]
                    row = tc[lay, i]
                    for j in range(J):
                        acc[j] += (row[j] + km[j]) / (ni + k[j])
                    c += 1
                for j in range(J):
                    t = acc[j] / c if c > 0 else m[j]
                    miss_t[j] *= 1.0 - t
                    miss_m[j] *= 1.0 - m[j]
        for j in range(J):
            fj = f[j]
            if seen and 0.0 < fj < 1.0:
                t = 1.0 - miss_t[j]
                mg = 1.0 - miss_m[j]
                # odds(f) x odds(T) / odds(marginal); T and m lie strictly inside (0, 1)
                o = fj / (1.0 - fj) * (t / (1.0 - t)) / (mg / (1.0 - mg))
                fj = o / (1.0 + o)
            ist[out, lay, j] = min(int(fj / (fj + base) * bins), bins - 1)


@njit(cache=True)
def transition_bins_into_ref(
    ist, out, tc, tn, tm, tau, prev, rc, rn, slots, pop, base, bins, layer
):  # noqa: ANN001, ANN201, E501 - numba
    """:func:`transition_bins_into` expert by expert (the form it had before issue 21's
    speed work): the reference tests/test_fmoe_trans_jit.py holds it equal to, bit for
    bit."""
    L, J = ist.shape[1], ist.shape[2]
    lo, hi = (0, L) if layer < 0 else (layer, layer + 1)
    for lay in range(lo, hi):
        for j in range(J):
            f = _request_f(rc, rn, slots, pop, lay, j, base)
            miss_t = 1.0
            miss_m = 1.0
            seen = False
            if tau[lay] > 0.0:
                for s in slots:
                    if s >= prev.shape[0] or prev[s, lay, 0] < 0:
                        continue
                    seen = True
                    miss_t *= 1.0 - transition_chance(tc, tn, tm, tau, lay, prev[s, lay], j, base)
                    miss_m *= 1.0 - _marginal(tm, tn, lay, j, base)
            if seen and 0.0 < f < 1.0:
                t = 1.0 - miss_t
                mg = 1.0 - miss_m
                # odds(f) x odds(T) / odds(marginal); T and m lie strictly inside (0, 1)
                o = f / (1.0 - f) * (t / (1.0 - t)) / (mg / (1.0 - mg))
                f = o / (1.0 + o)
            ist[out, lay, j] = min(int(f / (f + base) * bins), bins - 1)


@njit(cache=True)
def _count_after(tc, tn, tm, layer, before, row, J, K):  # noqa: ANN001, ANN202 - numba
    """One token's choices ``row`` (K ids) after a context token's ``before`` (-1: none):
    the token in tn[layer, J] and tm[layer, j], each context choice i in tn[layer, i] and
    each pair in tc[layer, i, j]; ids outside [0, J) are skipped."""
    tn[layer, J] += 1.0
    for k in range(K):
        j = row[k]
        if 0 <= j < J:
            tm[layer, j] += 1.0
    for q in range(K):
        i = before[q]
        if i < 0:
            continue
        tn[layer, i] += 1.0
        for k in range(K):
            j = row[k]
            if 0 <= j < J:
                tc[layer, i, j] += 1.0


@njit(cache=True)
def _set_latest(dst, row, J, K):  # noqa: ANN001, ANN202 - numba
    """A token's first K choices ``row`` into ``dst`` (ids outside [0, J) and the rest of
    ``dst`` as -1: none)."""
    for k in range(K):
        j = row[k]
        dst[k] = j if 0 <= j < J else -1
    for k in range(K, dst.shape[0]):
        dst[k] = -1


@njit(cache=True)
def transition_count2(tc2, tn2, tm2, prev, prev2, layer, ids, row_slot):  # noqa: ANN001, ANN201 - numba
    """The two-step counts of layer ``layer``'s choices ``ids`` [B, K] (as
    :func:`transition_count` counts one step): each row of a known request follows the
    token before its request's latest, prev2[slot, layer] (-1: none, nothing counted);
    then the latest becomes the one before (call it before transition_count, which moves
    the row into prev; prev itself is left as it was). Rows of one request follow each
    other in order."""
    B = ids.shape[0]
    if row_slot.shape[0] != B:
        return
    cur = prev[:, layer, :].copy()  # each slot's latest, moved row by row
    J = tm2.shape[1]
    K = min(ids.shape[1], prev2.shape[2])
    for r in range(B):
        s = row_slot[r]
        if prev2[s, layer, 0] >= 0:
            _count_after(tc2, tn2, tm2, layer, prev2[s, layer], ids[r], J, K)
        # the row's predecessor is the next row's token two back; the row its latest
        for k in range(prev2.shape[2]):
            prev2[s, layer, k] = cur[s, k]
        _set_latest(cur[s], ids[r], J, K)


@njit(cache=True)
def transition_count(tc, tn, tm, prev, layer, ids, row_slot):  # noqa: ANN001, ANN201 - numba
    """Count layer ``layer``'s choices ``ids`` [B, K] of one iteration: each row r of a
    known request (``row_slot[r]``; empty: rows of unknown requests, not counted) follows
    its request's latest token (prev[slot, layer], -1: none, then nothing is counted),
    whose choices i each get one token in tn[layer, i] and its choices j in tc[layer, i,
    j]; the token counts in tn[layer, J] and tm[layer, j]. The row then becomes its
    request's latest token (rows of one request in order: a prompt's tokens follow each
    other). Ids outside [0, J) are skipped (the caller's gate check rejects them)."""
    B = ids.shape[0]
    if row_slot.shape[0] != B:
        return
    J = tm.shape[1]
    K = min(ids.shape[1], prev.shape[2])
    for r in range(B):
        s = row_slot[r]
        if prev[s, layer, 0] >= 0:
            _count_after(tc, tn, tm, layer, prev[s, layer], ids[r], J, K)
        _set_latest(prev[s, layer], ids[r], J, K)
