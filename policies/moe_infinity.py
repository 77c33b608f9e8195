"""``moe-infinity``: request-level activation matrices matched by cosine, layer-decayed
prefetch, eviction of the least in-cache visits.

MoE-Infinity keeps, per request, an expert activation matrix (EAM): how many of the
request's tokens so far each (layer, expert) served, an L x J count matrix (top-K
counts summed over iterations: coarser than fMoE's per-iteration probability maps). A
store (MoE-Infinity's EAM collection) holds the matrices of past requests:

- ``fit(training)`` fills it from a training workload's requests (the offline 70/30
  setup); without fit it starts empty, and with ``online`` (default) every finished
  request's matrix is added (oldest overwritten once ``store_capacity`` is reached).
- After layer l's gate the current request's matrix is updated and matched to the store
  by cosine similarity (kept incrementally: one dot product per stored row per changed
  layer, not a full L x J product per call). The best match's rows for layers l+1 ..
  l+D, normalised per layer (activation ratios), are the prediction; at an iteration's
  start the matrix of its previous iterations predicts layers 0 .. D-1.
- Per layer, the ``top_experts`` largest ratios are kept (the rest set to 0).
- Prefetch priority = activation ratio x layer decay (1 - (distance - 1) / L), summed
  over the batch's requests; experts with ratio above ``min_ratio`` are ordered, best
  first, within what each device cache holds next to the running layer's experts.
- Eviction: fewest uses while cached (in-cache visits) first, then least recent.

Defaults follow the MoE-Infinity baseline as the fMoE authors configured it in their
artifact (IntelliSys-Lab/FineMoE-EuroSys26, ``moe_infinity/memory/expert_predictor.py``):
a window of 6 layers and the top J/4 experts of each layer of the matched matrix. D is
``prefetch_layers``, else ``--prefetch-distance``, else 6; ``prefetch_layers`` equal to
the layer count with ``top_experts`` equal to J gives the unbounded variant (every
remaining layer, every expert the match used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    RequestArrival,
)
from policies.baseline_common import SCORE_SCALE, check_training, layer_reserve, select_orders
from policies.cache import CacheEntry
from policies.registry import register_policy
from specs.errors import InputError
from specs.model_spec import ModelSpec

# The fMoE authors' MoE-Infinity baseline predicts a window of 6 layers (their artifact's
# expert_predictor.py: layer_end = layer_start + 6).
ARTIFACT_WINDOW = 6


class MoEInfinityOptions(PolicyOptions):
    store_capacity: int = Field(
        default=1000, ge=1, description="activation matrices kept in the store"
    )
    prefetch_layers: int | None = Field(
        default=None,
        ge=1,
        description="layers ahead to prefetch (default: --prefetch-distance, else "
        f"{ARTIFACT_WINDOW} as in the fMoE artifact)",
    )
    top_experts: int | None = Field(
        default=None,
        ge=1,
        description="experts kept per predicted layer (default: J/4, at least 1, as in the fMoE artifact)",
    )
    min_ratio: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="prefetch experts whose predicted ratio exceeds this",
    )
    online: bool = Field(
        default=True, description="add every finished request's matrix to the store"
    )


@dataclass
class _Active:
    """Per-request state: its matrix so far (flat L*J), squared norm, dots with the store."""

    q: np.ndarray
    qn2: float
    dots: np.ndarray


@register_policy
class MoEInfinity(Policy):
    name = "moe-infinity"
    description = (
        "MoE-Infinity: request-level activation matrix matched by cosine to stored ones, "
        "layer-decayed prefetch of the next layers, evict least in-cache visits"
    )
    Options = MoEInfinityOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._dims: tuple[int, int] | None = None
        self._trained_on = 0
        self._added_online = 0

    # -- store ------------------------------------------------------------------------
    def _ensure(self, spec: ModelSpec) -> None:
        dims = (spec.num_moe_layers, spec.num_experts)
        if self._dims is not None:
            if dims != self._dims:
                raise InputError(
                    f"policy 'moe-infinity': model has {dims} (layers, experts), "
                    f"the store was built for {self._dims}"
                )
            return
        self._dims = dims
        L, J = dims
        C = self.options.store_capacity
        self._L, self._J = L, J
        self._M = np.zeros((C, L * J), dtype=np.float32)
        self._norms = np.zeros(C)
        self._filled = 0
        self._next = 0  # ring position once full
        self._active: dict[str, _Active] = {}
        self._batch: list[str] = []
        self._row_req = np.zeros(0, dtype=np.int64)
        self._decay = 1.0 - np.arange(L) / L  # index distance-1

    def _add(self, vec: np.ndarray) -> None:
        C = self.options.store_capacity
        i = self._filled if self._filled < C else self._next
        if self._filled < C:
            self._filled += 1
        else:
            self._next = (self._next + 1) % C
        self._M[i] = vec
        self._norms[i] = float(np.linalg.norm(self._M[i].astype(np.float64)))
        for st in self._active.values():
            st.dots[i] = float(self._M[i].astype(np.float64) @ st.q)

    def fit(self, training: Any) -> None:
        """Fill the store with the training requests' activation matrices (evenly spread
        over them when there are more than fit)."""
        check_training(self.name, training, self.ctx.spec if self.ctx else None)
        self._ensure(training.spec)
        L, J = self._dims
        offs = (np.arange(L) * J)[None, :, None]
        mats = [
            np.bincount((r.routing.topk_ids.astype(np.int64) + offs).ravel(), minlength=L * J)
            for r in training.requests
        ]
        C = self.options.store_capacity
        pick = (
            range(len(mats))
            if len(mats) <= C
            else np.unique(np.linspace(0, len(mats) - 1, C).round().astype(int))
        )
        for i in pick:
            self._add(mats[int(i)])
        self._trained_on += len(mats)

    # -- observe ----------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self._ensure(ctx.spec)
        self._distance = self.options.prefetch_layers or ctx.prefetch_distance or ARTIFACT_WINDOW
        J = ctx.spec.num_experts
        self._top = min(J, self.options.top_experts or max(1, J // 4))

    def _state(self, rid: str) -> _Active:
        st = self._active.get(rid)
        if st is None:
            st = _Active(np.zeros(self._L * self._J), 0.0, np.zeros(self.options.store_capacity))
            self._active[rid] = st
        return st

    def on_request_arrival(self, ev: RequestArrival) -> None:
        self._state(ev.request_id)

    def on_iteration_start(self, ev: IterationStart) -> None:
        self._batch = list(dict.fromkeys(ev.request_ids))
        index = {rid: i for i, rid in enumerate(self._batch)}
        self._row_req = np.fromiter(
            (index[r] for r in ev.request_ids), dtype=np.int64, count=len(ev.request_ids)
        )
        for rid in self._batch:
            self._state(rid)
        self._predict(-1, None)

    def on_gate(self, ev: GateOutput) -> None:
        J = self._J
        cols = slice(ev.layer * J, (ev.layer + 1) * J)
        ids = np.asarray(ev.topk_ids, dtype=np.int64)
        for i, rid in enumerate(self._batch):
            rows = ids if len(self._batch) == 1 else ids[self._row_req == i]
            if rows.size == 0:
                continue
            delta = np.bincount(rows.ravel(), minlength=J).astype(np.float64)
            st = self._active[rid]
            old = st.q[cols]
            new = old + delta
            st.qn2 += float(new @ new - old @ old)
            st.q[cols] = new
            if self._filled:
                st.dots[: self._filled] += self._M[: self._filled, cols] @ delta
        self._predict(ev.layer, ids)

    def on_iteration_end(self, ev: IterationEnd) -> None:
        for rid in ev.finished:
            st = self._active.pop(rid, None)
            if st is not None and self.options.online and st.qn2 > 0:
                self._add(st.q)
                self._added_online += 1

    # -- decide -----------------------------------------------------------------------
    def _predict(self, layer: int, chosen: np.ndarray | None) -> None:
        """Order the predicted experts of layers layer+1 .. layer+D."""
        L, J, n = self._L, self._J, self._filled
        lo, hi = layer + 1, min(L, layer + 1 + self._distance)
        if n == 0 or lo >= hi:
            return
        score = np.zeros((hi - lo, J))
        for rid in self._batch:
            st = self._active[rid]
            if st.qn2 <= 0:
                continue
            denom = self._norms[:n] * np.sqrt(st.qn2)
            sims = np.divide(st.dots[:n], denom, out=np.zeros(n), where=denom > 0)
            best = int(np.argmax(sims))
            pred = self._M[best].reshape(L, J)[lo:hi].astype(np.float64)
            tot = pred.sum(axis=1, keepdims=True)
            ratio = np.divide(pred, tot, out=np.zeros_like(pred), where=tot > 0)
            ratio[ratio <= self.options.min_ratio] = 0.0
            if self._top < J:  # keep each layer's top experts (ties to the lower id)
                drop = np.argsort(-ratio, axis=1, kind="stable")[:, self._top :]
                np.put_along_axis(ratio, drop, 0.0, axis=1)
            score += ratio
        score *= self._decay[: hi - lo, None]
        lay, exp = np.nonzero(score)
        if lay.size == 0:
            return
        reserve = None if chosen is None else layer_reserve(self.ctx, layer, chosen)
        # select_orders builds finite float orders already: queue them as they are
        self._enqueue.extend(select_orders(self.ctx, score[lay, exp], lay + lo, exp, reserve))

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: fewest in-cache visits, then least recent."""
        return entry.uses * SCORE_SCALE + entry.last_used  # count_then_recency, inlined: hot path

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "store_rows": getattr(self, "_filled", 0),
            "trained_on_requests": self._trained_on,
            "added_online": self._added_online,
            "prefetch_layers": getattr(self, "_distance", None),
            "top_experts": getattr(self, "_top", None),
        }
