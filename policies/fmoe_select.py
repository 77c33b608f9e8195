"""fMoE's expert selection and prefetch priorities (FMOE_ALGORITHM.md steps 3 and 4).

Pure numpy functions over a batch of B predicted probability rows, so the policy stays a
thin event handler and each step is unit-testable on hand-made rows.
"""

from __future__ import annotations

import numpy as np

_CUM_TOL = 1e-6  # float32 cumulative sums of a softmax row land a hair under 1.0


def topk_rows(topk_ids: np.ndarray, topk_weights: np.ndarray, num_experts: int) -> np.ndarray:
    """Probability rows [B, J] built from chosen experts and weights (zeros elsewhere).

    The fallback when a trace has no full gate probabilities.
    """
    ids = np.asarray(topk_ids, np.int64)
    rows = np.zeros((ids.shape[0], num_experts), np.float32)
    np.put_along_axis(rows, ids, np.asarray(topk_weights, np.float32), axis=1)
    return rows


def select_experts(
    probs: np.ndarray, scores: np.ndarray, top_k: int, use_delta: bool = True
) -> np.ndarray:
    """Which experts to prefetch for each predicted row: bool mask [B, J].

    With ``use_delta``: delta = clip(1 - score, 0, 1); take experts in descending
    probability until their cumulative probability reaches delta, never fewer than
    ``top_k`` nor more than J; experts of probability exactly 0 beyond the first
    ``top_k`` are skipped (they cannot help). Without: the fixed top-K.
    Ties in probability go to the lower expert id.
    """
    # plain ufuncs and fancy indexing: this runs per layer step on tiny arrays, where
    # numpy's convenience wrappers (clip, put_along_axis) cost more than the work
    probs = np.asarray(probs, np.float32)
    B, J = probs.shape
    k = min(max(int(top_k), 1), J)
    if B == 1:
        return _select_one(probs[0], float(np.asarray(scores).reshape(-1)[0]), k, use_delta)[
            None, :
        ]
    order = np.argsort(-probs, axis=1, kind="stable")
    rows = np.arange(B)[:, None]
    rank = np.arange(J)
    if use_delta:
        sp = probs[rows, order]
        # delta = clip(1 - s, 0, 1); the lower clip is implicit (a threshold <= 0 counts
        # none and the K floor applies after)
        thr = np.minimum(1.0 - np.asarray(scores, np.float32), 1.0) - _CUM_TOL
        count = np.count_nonzero(np.cumsum(sp, axis=1) < thr[:, None], axis=1) + 1
        take = (rank < np.maximum(count, k)[:, None]) & ((sp > 0.0) | (rank < k))
    else:
        take = np.broadcast_to(rank < k, (B, J))
    mask = np.zeros((B, J), bool)
    mask[rows, order] = take
    return mask


def _select_one(p: np.ndarray, score: float, k: int, use_delta: bool) -> np.ndarray:
    """select_experts for one row with fewer numpy calls (the decode-time common case)."""
    order = np.argsort(-p, kind="stable")
    chosen = (
        _delta_picks(order.tolist(), p, np.cumsum(p[order]), score, k) if use_delta else order[:k]
    )
    mask = np.zeros(p.shape[0], bool)
    mask[chosen] = True
    return mask


def _delta_picks(
    order: list[int], p: np.ndarray, cum: np.ndarray, score: float, k: int
) -> list[int]:
    """The similarity-aware selection of one row, best first: ``order`` its experts by
    descending probability ``p``, ``cum`` the float32 running sums of ``p`` in that order.
    The fewest experts whose mass reaches delta = 1 - score (less _CUM_TOL), never fewer
    than k; beyond the first k, experts of probability exactly 0 are skipped."""
    thr = min(1.0 - score, 1.0) - _CUM_TOL
    n = max(int(np.searchsorted(cum, thr, side="left")) + 1, k)  # first index with cum >= thr
    return order[:k] + [j for j in order[k:n] if p[j] > 0.0]


def merge_priorities(
    probs: np.ndarray, mask: np.ndarray, layer: int, now_layer: int
) -> dict[int, float]:
    """Union of the rows' selections for ``layer`` -> {expert: priority}.

    priority = max over selecting rows of p / (layer - now_layer); contract:
    ``layer > now_layer`` (prefetches target layers ahead of the executing one).
    """
    dist = float(layer - now_layer)
    if dist <= 0:
        raise ValueError(f"priority for layer {layer} at executing layer {now_layer}: not ahead")
    best = np.where(mask, probs, -np.inf).max(axis=0)
    chosen = np.flatnonzero(mask.any(axis=0))
    return {int(j): float(best[j]) / dist for j in chosen}


_FAST_MARGIN = 1e-5  # far above float32 rounding of a K-term sum, far below any real gap


def select_row(
    probs: np.ndarray | list[float],
    score: float,
    top_k: int,
    use_delta: bool = True,
) -> list[int]:
    """:func:`select_experts` for one row [J] (float32 values, as an array or a list of
    them), as ascending expert ids (same result).

    The decode-time hot path: with a confident match the threshold 1 - score is already
    covered by the top-K mass, so the answer is the top-K, found with Python on the row's
    J floats; only when the top-K mass lies within a hair of the threshold, or below it,
    does it fall back to the exact float32 computation.
    """
    p = probs.tolist() if isinstance(probs, np.ndarray) else probs
    J = len(p)
    k = min(max(int(top_k), 1), J)
    # descending; reverse keeps the sort stable: ties to the lower id
    order = sorted(range(J), key=p.__getitem__, reverse=True)
    if use_delta:
        thr = min(1.0 - float(score), 1.0) - _CUM_TOL
        if thr > 0 and sum(p[j] for j in order[:k]) < thr + _FAST_MARGIN:
            mask = _select_one(np.asarray(probs, np.float32), float(score), k, use_delta)
            return np.flatnonzero(mask).tolist()
    return sorted(order[:k])


def select_rows(
    probs: np.ndarray, scores: np.ndarray, top_k: int, use_delta: bool, order: np.ndarray
) -> list[list[int]]:
    """:func:`select_row` of each row of ``probs`` [R, J] with its score of ``scores`` [R]
    (same experts), each selection listed by descending probability, ties to the lower
    id; ``order`` [R, J] is each row's experts in that order.

    select_row's fast-path test (top-K mass clear of the threshold) runs on all rows at
    once, the mass summed in float64 (any last-bit difference from Python's sum lies far
    inside _FAST_MARGIN); only rows near or under the threshold take the exact rule.
    """
    k = min(max(int(top_k), 1), probs.shape[1])
    top = order[:, :k]
    picks: list[list[int]] = top.tolist()
    if not use_delta:
        return picks
    thr = np.minimum(1.0 - scores.astype(np.float64), 1.0) - _CUM_TOL
    mass = probs[np.arange(len(probs))[:, None], top].sum(axis=1, dtype=np.float64)
    slow = np.flatnonzero((thr > 0) & (mass < thr + _FAST_MARGIN))
    if len(slow):  # the exact rule; running sums along rows are the same sequential adds
        cums = np.cumsum(np.take_along_axis(probs[slow], order[slow], axis=1), axis=1)
        for r, cum in zip(slow.tolist(), cums, strict=True):
            picks[r] = _delta_picks(order[r].tolist(), probs[r], cum, float(scores[r]), k)
    return picks
