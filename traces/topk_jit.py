"""The numba kernels of :mod:`traces.topk` and of the synthetic generator's hot loops.

Imported only for inputs large enough to pay for it (as :mod:`traces.cachesim_jit`):
importing numba and loading the compiled kernels costs about half a second per process.
Every kernel does numpy's float32 arithmetic in numpy's order (no reassociation, no
fused multiply-add), so its output equals the numpy reference bit for bit; the tests
check that on random inputs. Loops index with plain ``range`` variables (index
arithmetic stops numba from vectorizing them).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def topk_lanes(p3, k, out_ids, out_vals, out_tied):
    """For each row of ``p3`` [N, R, G] (C-contiguous; entry j = r * G + g; ``G >= k +
    1``): the ids of the ``k`` largest entries, largest first, into ``out_ids`` [N, k] and
    their values into ``out_vals`` [N, k]; ``out_tied[n]`` is True when two of the row's
    k + 1 largest values are equal (then which ids, in which order, is numpy's choice:
    :func:`traces.topk.top_k_desc` asks numpy for that row).

    Branch-free where branches would be unpredictable: the G lane maxima (vectorized);
    their (k+1)-th largest ``t`` by counting (k + 1 lanes reach it, so at least k + 1
    entries do, every one of the k + 1 largest among them); the entries >= t compacted
    (about k + 1 of them) and placed by their rank among each other."""
    N, R, G = p3.shape
    J = R * G
    kk = k + 1
    cid = np.empty(J + 1, np.int64)
    cv = np.empty(J + 1, p3.dtype)
    sv = np.empty(kk, p3.dtype)
    si = np.empty(kk, np.int64)
    lane = np.empty(G, p3.dtype)
    flat = p3.reshape(N, J)
    inf = p3.dtype.type(np.inf)
    for n in range(N):
        for g in range(G):
            lane[g] = p3[n, 0, g]
        for r in range(1, R):
            for g in range(G):
                lane[g] = max(p3[n, r, g], lane[g])
        t = inf  # the smallest lane maximum with at most k lane maxima above it
        for g in range(G):
            v = lane[g]
            above = 0
            for h in range(G):
                above += lane[h] > v
            t = min(t, v if above <= k else inf)
        row = flat[n]
        c = 0
        for j in range(J):
            cid[c] = j
            c += row[j] >= t
        for i in range(c):
            cv[i] = row[cid[i]]
        for i in range(c):  # rank among the candidates; equal values by position
            v = cv[i]
            rank = 0
            for q in range(c):
                w = cv[q]
                rank += (w > v) | ((w == v) & (q < i))
            if rank < kk:
                sv[rank] = v
                si[rank] = cid[i]
        _emit(sv, si, k, n, out_ids, out_vals, out_tied)


@njit(cache=True)
def topk_insert(p, k, out_ids, out_vals, out_tied):
    """:func:`topk_lanes` for rows ``p`` [N, J] of any width J > k (one insertion pass)."""
    N, J = p.shape
    kk = k + 1
    vals = np.empty(kk, p.dtype)
    ids = np.empty(kk, np.int64)
    for n in range(N):
        for j in range(kk):
            vals[j] = p[n, j]
            ids[j] = j
        _sort_desc(vals, ids, kk)
        low = vals[kk - 1]
        for j in range(kk, J):
            v = p[n, j]
            if v <= low:  # an entry equal to the (k+1)-th changes no value kept
                continue
            i = kk - 1
            while i > 0 and vals[i - 1] < v:
                vals[i] = vals[i - 1]
                ids[i] = ids[i - 1]
                i -= 1
            vals[i] = v
            ids[i] = j
            low = vals[kk - 1]
        _emit(vals, ids, k, n, out_ids, out_vals, out_tied)


@njit(cache=True)
def _sort_desc(vals, ids, c):
    for i in range(1, c):
        v = vals[i]
        d = ids[i]
        q = i
        while q > 0 and vals[q - 1] < v:
            vals[q] = vals[q - 1]
            ids[q] = ids[q - 1]
            q -= 1
        vals[q] = v
        ids[q] = d


@njit(cache=True)
def _emit(vals, ids, k, n, out_ids, out_vals, out_tied):
    tied = False
    for i in range(k):
        tied |= vals[i] == vals[i + 1]
    out_tied[n] = tied
    for i in range(k):
        out_ids[n, i] = ids[i]
        out_vals[n, i] = vals[i]


@njit(cache=True, fastmath={"nnan", "ninf", "nsz"})
def _row_max(row):
    # max is exact in any order (finite inputs; the sign of a zero maximum does not
    # change z - max), so these flags only let the loop vectorize
    m = row[0]
    for j in range(1, row.shape[0]):
        m = max(m, row[j])
    return m


@njit(cache=True)
def base_logits(pop, topic_logits, kind_logits, trans, layer, topic, kind, prev, out):
    """``out[n] = ((pop[layer] + topic_logits[topic[n], layer]) + kind_logits[kind[n],
    layer]) + mean_k trans[layer, prev[n, k]]`` in float32, the mean summed in k order
    then divided (numpy's ``mean``: both roundings give the correctly rounded quotient);
    ``prev`` with 0 columns adds no mean."""
    N, J = out.shape
    K = prev.shape[1]
    kf = np.float32(K)
    acc = np.empty(J, np.float32)
    pl = pop[layer]
    for n in range(N):
        t = topic_logits[topic[n], layer]
        c = kind_logits[kind[n], layer]
        o = out[n]
        for j in range(J):
            o[j] = (pl[j] + t[j]) + c[j]
        if K == 0:
            continue
        first = trans[layer, prev[n, 0]]
        for j in range(J):
            acc[j] = first[j]
        for k in range(1, K):
            r = trans[layer, prev[n, k]]
            for j in range(J):
                acc[j] = acc[j] + r[j]
        for j in range(J):
            o[j] = o[j] + acc[j] / kf


@njit(cache=True)
def finish_logits(base, g, noise, src, temperature, z_out, e_out):
    """Row n of ``z_out``: ``base[n] - noise * g[n]`` (``g`` with 0 rows: ``base[n]``),
    or row ``src[n] < n`` of ``z_out`` where the token copies an earlier one; row n of
    ``e_out``: ``(z_out[n] - max(z_out[n])) / temperature``, the softmax's exponent."""
    N, J = base.shape
    has_noise = g.shape[0] > 0
    nz = np.float32(noise)
    t = np.float32(temperature)
    for n in range(N):
        zo = z_out[n]
        s = src[n]
        if s != n:
            zo[:] = z_out[s]
        elif has_noise:
            b = base[n]
            gr = g[n]
            for j in range(J):
                zo[j] = b[j] - nz * gr[j]
        else:
            zo[:] = base[n]
        m = _row_max(zo)
        eo = e_out[n]
        for j in range(J):
            eo[j] = (zo[j] - m) / t


@njit(cache=True)
def lookahead_exponents(noise_rows, logits, scale, temperature, out):
    """``out[t, l] = (x - max(x)) / temperature`` with ``x = logits[t, l + 1] + scale *
    noise_rows[t, l]`` for l < L - 1 (the lookahead softmax's exponent; ``noise_rows`` is
    overwritten; ``out`` [T, L, J] is C-contiguous, so this loop vectorizes)."""
    T, L1, J = noise_rows.shape
    sc = np.float32(scale)
    tt = np.float32(temperature)
    for t in range(T):
        for layer in range(L1):
            x = noise_rows[t, layer]
            lg = logits[t, layer + 1]
            for j in range(J):
                x[j] = lg[j] + sc * x[j]
            m = _row_max(x)
            o = out[t, layer]
            for j in range(J):
                o[j] = (x[j] - m) / tt
