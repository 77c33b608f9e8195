"""One iteration's batch: which token rows run, and what each layer routes where.

Built once per iteration from the running requests' routing arrays, so the per-layer
work of the engine is list lookups, not numpy calls.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from traces.types import Request

LayerItems = list[list[tuple[int, int]]]  # per layer: (expert, tokens routed to it), by expert


@dataclass(eq=False)
class RequestState:
    """A request inside the simulator."""

    req: Request
    index: int
    arrival_s: float = 0.0
    start_s: float = -1.0
    next_iter: int = 0
    first_token_s: float = -1.0
    last_token_s: float = -1.0
    hits: int = 0
    demands: int = 0

    @property
    def done(self) -> bool:
        return self.next_iter >= self.req.output_len


@dataclass(eq=False)
class Iteration:
    """Arrays of the batch's rows (request order, then row order) and per-layer routing."""

    rows: int
    context: float
    ids: np.ndarray  # [R, L, K]
    items: LayerItems
    per_request: list[list[list[int]]] | None  # experts per request per layer (None: one request)
    slices: list[slice]


@functools.cache
def _one_token(num_experts: int) -> list[tuple[int, int]]:
    """(expert, 1) of every expert, built once: the items of a one-row iteration."""
    return [(e, 1) for e in range(num_experts)]


def layer_items(ids: np.ndarray, num_experts: int) -> LayerItems:
    """Distinct experts per layer with the number of rows routed to each, sorted by expert."""
    R, L, _ = ids.shape
    if R == 1:  # one row (a decode step): its experts sorted, one token each
        one = _one_token(num_experts)
        return [[one[e] for e in row] for row in np.sort(ids[0], axis=1).tolist()]
    J = num_experts
    flat = (ids.astype(np.int64) + (np.arange(L, dtype=np.int64) * J)[None, :, None]).ravel()
    cnt = np.bincount(flat, minlength=L * J)
    nz = np.flatnonzero(cnt)
    out: LayerItems = [[] for _ in range(L)]
    for idx, c in zip(nz.tolist(), cnt[nz].tolist(), strict=True):
        out[idx // J].append((idx % J, c))
    return out


def batch_rows(batch: list[RequestState]) -> tuple[list[slice], int, float]:
    """Each running request's routing rows of its next iteration (prefill: all prompt
    rows), the number of rows, and the mean context (KV length) a row attends to."""
    slices = [s.req.iteration_rows(s.next_iter) for s in batch]
    ctx_sum = 0.0
    rows = 0
    for s, sl in zip(batch, slices, strict=True):
        if s.next_iter == 0:
            p = sl.stop
            ctx_sum += p * (p + 1) / 2  # row i attends to i + 1 tokens
        else:
            ctx_sum += sl.stop  # the decode row attends to every earlier token and itself
        rows += sl.stop - sl.start
    return slices, rows, ctx_sum / rows


def build_iteration(batch: list[RequestState], num_experts: int) -> Iteration:
    """Rows of every running request for its next iteration (prefill: all prompt rows)."""
    slices, rows, context = batch_rows(batch)
    if len(batch) == 1:
        ids = batch[0].req.routing.topk_ids[slices[0]]
        items = layer_items(ids, num_experts)
        per_request = None
    else:
        parts = [s.req.routing.topk_ids[sl] for s, sl in zip(batch, slices, strict=True)]
        ids = np.concatenate(parts)
        items = layer_items(ids, num_experts)
        per_request = [[[e for e, _ in lay] for lay in layer_items(p, num_experts)] for p in parts]
    return Iteration(
        rows=rows,
        context=context,
        ids=ids,
        items=items,
        per_request=per_request,
        slices=slices,
    )


def stack_field(batch: list[RequestState], slices: list[slice], name: str) -> np.ndarray | None:
    """The batch's rows of an optional routing field (None when any request lacks it)."""
    parts = []
    for s, sl in zip(batch, slices, strict=True):
        arr = getattr(s.req.routing, name)
        if arr is None:
            return None
        parts.append(arr[sl])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
