"""Small helpers shared by the baseline policies: eviction scores, training-set checks,
and turning scored candidates into prefetch orders that fit each device's cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.base import PolicyContext, PrefetchOrder
from specs.errors import InputError
from specs.model_spec import ModelSpec

SCORE_SCALE = 1e9
"""Count weight in lexicographic scores ``count * SCORE_SCALE + last_used``: exact while
``last_used`` (seconds or ticks) stays below 1e9 and counts below ~9e6 (float64)."""


def count_then_recency(count: float, last_used: float) -> float:
    """Eviction score: fewer uses go first, then the least recently used."""
    return count * SCORE_SCALE + last_used


def check_training(policy: str, training: Any, spec: ModelSpec | None) -> None:
    """Raise InputError unless ``training`` is a Workload whose shape matches ``spec``."""
    tspec = getattr(training, "spec", None)
    if tspec is None or not hasattr(training, "requests"):
        raise InputError(
            f"policy {policy!r}: fit() needs a Workload, got {type(training).__name__}"
        )
    if spec is None:
        return
    have = (tspec.num_moe_layers, tspec.num_experts, tspec.top_k)
    want = (spec.num_moe_layers, spec.num_experts, spec.top_k)
    if have != want:
        raise InputError(
            f"policy {policy!r}: training workload is for {tspec.name} "
            f"(layers, experts, top_k = {have}), the run is for {spec.name} {want}"
        )


def layer_reserve(ctx: PolicyContext, layer: int, experts: np.ndarray) -> np.ndarray:
    """Slots per device that layer ``layer``'s ``experts`` are about to take (to compute)."""
    d = ctx.placement.num_devices
    distinct = set(np.asarray(experts).ravel().tolist())  # small: a set beats np.unique
    if d == 1:
        return np.array([len(distinct)], dtype=np.int64)
    out = np.zeros(d, dtype=np.int64)
    for e in distinct:
        out[(layer * ctx.spec.num_experts + e) % d] += 1
    return out


def select_orders(
    ctx: PolicyContext,
    priorities: np.ndarray,
    layers: np.ndarray,
    experts: np.ndarray,
    reserve: np.ndarray | None = None,
) -> list[PrefetchOrder]:
    """Orders for the best candidates that fit each device's cache.

    Candidates are ranked by priority (descending; ties by layer then expert, so the
    choice is deterministic). Per device, the first ``capacity - reserve`` candidates are
    kept (already-cached ones count against that budget, since they hold a slot too);
    orders are returned for the kept ones that are not cached yet, best first. Candidates
    with a non-positive priority are dropped.
    """
    keep = priorities > 0
    if not keep.any():
        return []
    pr, ly, ex = priorities[keep], layers[keep], experts[keep]
    order = np.lexsort((ex, ly, -pr))
    pr, ly, ex = pr[order], ly[order], ex[order]
    ndev = ctx.placement.num_devices
    budget = np.array([c.capacity for c in ctx.caches], dtype=np.int64)
    if reserve is not None:
        budget = np.maximum(budget - reserve, 0)
    if ndev == 1:
        take = np.arange(min(int(budget[0]), pr.size))
    else:
        dev = (ly * ctx.spec.num_experts + ex) % ndev
        # rank of each candidate among its device's, in priority order: a stable sort by
        # device keeps the priority order inside each device's run
        by_dev = np.argsort(dev, kind="stable")
        counts = np.bincount(dev, minlength=ndev)
        rank = np.empty(pr.size, dtype=np.int64)
        rank[by_dev] = np.arange(pr.size) - np.repeat(np.cumsum(counts) - counts, counts)
        take = np.flatnonzero(rank < budget[dev])
    caches = ctx.caches
    J = ctx.spec.num_experts
    out = []
    for p, lyr, e in zip(pr[take].tolist(), ly[take].tolist(), ex[take].tolist(), strict=True):
        if (lyr, e) not in caches[(lyr * J + e) % ndev].entries:
            out.append(PrefetchOrder(lyr, e, p))
    return out


def union_top(scores: np.ndarray, n: int) -> np.ndarray:
    """Sum over rows of each row's top-``n`` scores (others zero): a batch's combined vote.

    ``scores`` [B, J]; returns [J]. Ties inside a row go to the lower expert id.
    """
    b, j = scores.shape
    n = max(0, min(n, j))
    if n == 0 or b == 0:
        return np.zeros(j)
    if b == 1:  # one row (a decode step): no scatter needed
        out = np.zeros(j)
        top = np.argsort(-scores[0], kind="stable")[:n]
        out[top] = scores[0, top]
        return out
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    out = np.zeros(j)
    np.add.at(out, idx.ravel(), np.take_along_axis(scores, idx, axis=1).ravel())
    return out
