"""Top-K of probability rows, largest first: numpy's answer, faster.

:func:`top_k_desc` returns exactly what the numpy reference :func:`top_k_numpy`
(``argpartition`` then a stable sort of the K values) returns, including which of equal
values it picks and in which order: the numba kernel (:mod:`traces.topk_jit`, for large
inputs) finds the K largest of each row and flags the rows where two of the K + 1 largest
values are equal; those rows (rare: equal float32 probabilities) go to numpy. A row
without such ties has one answer, so the two agree everywhere.
"""

from __future__ import annotations

import sys

import numpy as np

# From this many entries of work (rows x width, summed over a run) on, the numba kernels
# beat their import (about half a second per process); numpy's argpartition takes a few
# microseconds per row of 256.
JIT_MIN_ENTRIES = 1 << 24


_numpy_entries = 0  # entries this process has handed to numpy so far


def use_jit(entries: int) -> bool:
    """Whether work over ``entries`` row entries should run the numba kernels: once they
    are loaded, or once this process's work (this call's included) reaches
    JIT_MIN_ENTRIES. Either path gives the same results."""
    global _numpy_entries
    if "traces.topk_jit" in sys.modules:
        return True
    _numpy_entries += entries
    return _numpy_entries >= JIT_MIN_ENTRIES


def top_k_numpy(p: np.ndarray, k: int) -> np.ndarray:
    """int64 [..., k]: the ids of the k largest entries of each row of ``p`` [..., J],
    largest first (ties: argpartition's choice, kept in its order). The reference."""
    J = p.shape[-1]
    if k >= J:
        top = np.broadcast_to(np.arange(J), p.shape).copy()
    else:
        top = np.argpartition(-p, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(p, top, -1), axis=-1, kind="stable")
    return np.take_along_axis(top, order, -1)


def top_k_desc(p: np.ndarray, k: int, jit: bool | None = None) -> np.ndarray:
    """:func:`top_k_numpy` of ``p`` (float, rows [..., J]), by numba where it pays
    (``jit``: True / False forces it; default: :func:`use_jit`)."""
    return top_k_values(p, k, jit)[0]


def top_k_values(p: np.ndarray, k: int, jit: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(:func:`top_k_desc` of ``p``, the values at those ids) in one pass."""
    J = p.shape[-1]
    if k >= J or k < 1 or p.size == 0 or not (use_jit(p.size) if jit is None else jit):
        top = top_k_numpy(p, k)
        return top, np.take_along_axis(p, top, -1)
    from traces import topk_jit

    rows = np.ascontiguousarray(p).reshape(-1, J)
    n = rows.shape[0]
    ids = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=rows.dtype)
    tied = np.empty(n, dtype=np.bool_)
    lanes = _lanes(J, k)
    if lanes:
        topk_jit.topk_lanes(rows.reshape(n, J // lanes, lanes), k, ids, vals, tied)
    else:
        topk_jit.topk_insert(rows, k, ids, vals, tied)
    if tied.any():
        where = np.flatnonzero(tied)
        sub = rows[where]
        # constant rows (the lookahead's zero last layer) all get one row's answer:
        # argpartition's choice among equal values does not depend on the value
        const = sub.max(axis=-1) == sub.min(axis=-1)
        if const.any():
            ids[where[const]] = top_k_numpy(sub[const][:1], k)
        if not const.all():
            ids[where[~const]] = top_k_numpy(sub[~const], k)
        vals[where] = np.take_along_axis(sub, ids[where], -1)
    shape = (*p.shape[:-1], k)
    return ids.reshape(shape), vals.reshape(shape)


def _lanes(J: int, k: int) -> int:
    """Lanes of :func:`traces.topk_jit.topk_lanes` for rows of J: the largest power of two
    up to 32 dividing J, if at least k + 1; else 0 (the insertion kernel)."""
    g = 32
    while g > k and J % g:
        g //= 2
    return g if g > k else 0
