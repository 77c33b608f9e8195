"""``promoe``: a learned predictor of layer l+d's experts, with stride prefetch.

ProMoE trains a small predictor offline that, while layer l runs, guesses the experts
of layer l+d (the stride, which buys d layers of lead time for the copy). Traces have no
hidden states, so our predictor learns from routing alone, kept simple and fast (numpy):

- For every layer l it holds a table of counts ``N[l, i, j]``: how often a token that
  chose expert i at layer l chose expert j at layer l+d. ``fit(training)`` fills it
  from a training workload (all token rows of all requests, one vectorised bincount per
  request); with ``online`` (default) every completed iteration's rows are added too,
  so without fit it starts empty and learns as it goes.
- Prediction for a token row that chose experts S at layer l: the mean over i in S of
  the smoothed conditional ``P(j | i) = (N[l, i, j] + a) / (sum_j N[l, i, j] + a J)``
  (rows with no data for any i in S predict nothing). Each row votes for its top
  ``top_n`` experts (default top-K); the union is ordered with the summed probability as
  priority, within what the device caches hold next to layer l's experts.
- Stride prefetch: after layer l's gate it orders layer l+d only. At an iteration's start
  layers 0 .. d-1 have no observed layer to condition on; with ``first_layers`` they get
  the top experts of the per-layer popularity learned the same way.
- Eviction: least recently used.

The stride d is ``stride``, else ``--prefetch-distance``, else 2.

Its gate also exists as compiled code (:meth:`ProMoE.compiled_gate`,
:mod:`policies.promoe_jit`): the simulator's prefetching kernel calls it in place of
``on_gate`` (same orders; the Python hook stays the reference). Online learning then
takes the iteration's routing from ``IterationStart.gates`` (``precomputes_from_gates``:
the same rows ``on_gate`` would have collected), where the executor passes them.
"""

from __future__ import annotations

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
    RecencyEviction,
)
from policies.baseline_common import check_training, layer_reserve, select_orders, union_top
from policies.compiled_gate import CompiledGate
from policies.registry import register_policy
from specs.errors import InputError
from specs.model_spec import ModelSpec

DEFAULT_STRIDE = 2


def float_state(layers: int, experts: int, smoothing: float) -> np.ndarray:
    """The compiled gate's float state (``pf``, :mod:`policies.promoe_jit`): ``N``
    (L*J*J), ``rows`` (L*J), the smoothing, then scratch (J scores, J votes)."""
    L, J = layers, experts
    pf = np.zeros(L * J * J + L * J + 1 + 2 * J, np.float64)
    pf[L * J * J + L * J] = smoothing
    return pf


def tables(pf: np.ndarray, layers: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of ``pf``: ``N`` [L, J, J] and ``rows`` [L, J] (writes reach the gate)."""
    L, J = layers, experts
    return pf[: L * J * J].reshape(L, J, J), pf[L * J * J : L * J * J + L * J].reshape(L, J)


class ProMoEOptions(PolicyOptions):
    stride: int | None = Field(
        default=None,
        ge=1,
        description="layers ahead predicted (default: --prefetch-distance, else 2)",
    )
    top_n: int | None = Field(
        default=None,
        ge=1,
        description="experts each token row predicts (default: the model's top-K)",
    )
    smoothing: float = Field(
        default=0.1, ge=0.0, description="additive smoothing of the conditional tables"
    )
    online: bool = Field(default=True, description="keep learning from every completed iteration")
    first_layers: bool = Field(
        default=True, description="prefetch layers 0..d-1 by popularity at an iteration's start"
    )


@register_policy
class ProMoE(RecencyEviction, Policy):
    name = "promoe"
    description = (
        "ProMoE: predictor of layer l+d's experts from layer l's choice (trained on a "
        "training split), stride prefetch"
    )
    Options = ProMoEOptions
    # the iteration's routing at its start only stands in for the rows on_gate collects
    # (online learning), so the compiled gate can leave on_gate out
    precomputes_from_gates = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._tables: tuple[int, int, int] | None = None  # (L, J, stride) the tables are sized for
        self._pending_fit: list[Any] = []
        self._trained_tokens = 0
        self._online_tokens = 0

    # -- predictor ----------------------------------------------------------------------
    def _stride_for(self, spec: ModelSpec) -> int:
        d = (
            self.options.stride
            or (self.ctx.prefetch_distance if self.ctx else None)
            or DEFAULT_STRIDE
        )
        return max(1, min(d, max(spec.num_moe_layers - 1, 1)))

    def _alloc(self, spec: ModelSpec) -> None:
        L, J = spec.num_moe_layers, spec.num_experts
        d = self._stride_for(spec)
        self._tables = (L, J, d)
        self._L, self._J, self._d = L, J, d
        # the tables live in the compiled gate's float state (views: learning reaches it)
        self._pf = float_state(L, J, self.options.smoothing)
        self._N, self._rows = tables(self._pf, L, J)  # rows: sum over j of N[l, i, j]
        self._prior = np.zeros((L, J))
        self._layer_off = np.arange(L, dtype=np.int64)[None, :, None] * J
        self._pair_off = (np.arange(max(L - d, 0), dtype=np.int64) * J)[None, :, None, None]
        self._iter_ids: list[np.ndarray | None] = [None] * L
        self._iter_all: np.ndarray | None = None  # IterationStart.gates' ids [T, L, K]

    def _learn(self, ids: np.ndarray) -> int:
        """Add token rows ``ids`` [T, L, K] to the tables; returns T."""
        L, J, d = self._L, self._J, self._d
        ids = ids.astype(np.int64, copy=False)
        self._prior += np.bincount((ids + self._layer_off).ravel(), minlength=L * J).reshape(L, J)
        if L > d:
            src = ids[:, : L - d, :, None]
            dst = ids[:, d:, None, :]
            flat = ((src + self._pair_off) * J + dst).ravel()
            add = np.bincount(flat, minlength=(L - d) * J * J).reshape(L - d, J, J)
            self._N[: L - d] += add
            self._rows[: L - d] += add.sum(axis=2)
        return int(ids.shape[0])

    def fit(self, training: Any) -> None:
        """Train the tables on a training workload (all token rows of all its requests)."""
        check_training(self.name, training, self.ctx.spec if self.ctx else None)
        if self.ctx is None:  # the stride may come from the context: train once bound
            self._pending_fit.append(training)
            return
        for req in training.requests:
            self._trained_tokens += self._learn(req.routing.topk_ids)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        if self._tables is not None and self._tables[:2] != (
            ctx.spec.num_moe_layers,
            ctx.spec.num_experts,
        ):
            raise InputError(
                f"policy 'promoe': tables sized for {self._tables[:2]} (layers, experts), "
                "the model has others"
            )
        if self._tables is None:
            self._alloc(ctx.spec)
        pending, self._pending_fit = self._pending_fit, []
        for training in pending:
            self.fit(training)

    # -- observe / decide ----------------------------------------------------------------
    def on_iteration_start(self, ev: IterationStart) -> None:
        self._iter_ids = [None] * self._L
        self._iter_all = None if ev.gates is None else ev.gates.topk_ids
        if not self.options.first_layers:
            return
        n = min(self._J, (self.options.top_n or self.ctx.spec.top_k) * max(len(ev.request_ids), 1))
        pri, lay, exp = [], [], []
        for t in range(min(self._d, self._L)):
            tot = self._prior[t].sum()
            if tot <= 0:
                continue
            p = self._prior[t] / tot
            top = np.argsort(-p, kind="stable")[:n]
            top = top[p[top] > 0]
            pri.append(p[top] / (t + 1))
            lay.append(np.full(top.size, t))
            exp.append(top)
        if pri:
            for o in select_orders(
                self.ctx, np.concatenate(pri), np.concatenate(lay), np.concatenate(exp)
            ):
                self.prefetch(o.layer, o.expert, o.priority)

    def on_gate(self, ev: GateOutput) -> None:
        ids = np.asarray(ev.topk_ids, dtype=np.int64)
        self._iter_ids[ev.layer] = ids
        target = ev.layer + self._d
        if target >= self._L:
            return
        a, J = self.options.smoothing, self._J
        rows = self._rows[ev.layer][ids]  # [B, K]
        known = rows.sum(axis=1) > 0
        if not known.any():
            return
        cond = (self._N[ev.layer][ids[known]] + a) / (
            rows[known][..., None] + a * J + 1e-300
        )  # [B', K, J]
        scores = cond.mean(axis=1)
        votes = union_top(scores, self.options.top_n or self.ctx.spec.top_k)
        exp = np.flatnonzero(votes > 0)
        orders = select_orders(
            self.ctx,
            votes[exp],
            np.full(exp.size, target),
            exp,
            layer_reserve(self.ctx, ev.layer, ids),
        )
        for o in orders:
            self.prefetch(o.layer, o.expert, o.priority)

    def on_iteration_end(self, ev: IterationEnd) -> None:
        if not self.options.online:
            return
        if self._iter_all is not None:  # the same rows as on_gate's, all at once
            ids = self._iter_all
        elif any(x is None for x in self._iter_ids):
            return
        else:
            ids = np.stack(self._iter_ids, axis=1)
        self._online_tokens += self._learn(ids)
        self._iter_ids = [None] * self._L
        self._iter_all = None

    def compiled_gate(self) -> CompiledGate | None:
        """``on_gate``'s orders in numba (:mod:`policies.promoe_jit`), for a compiled
        executor's kernel, reading the tables themselves (``_pf``)."""
        from policies import promoe_jit

        ctx = self.ctx
        if len(ctx.caches) != ctx.placement.num_devices:
            return None  # select_orders' budget and devices would not line up
        pi = promoe_jit.int_state(
            self._L, self._J, ctx.placement.num_devices, self._d,
            self.options.top_n or ctx.spec.top_k,
        )  # fmt: skip
        return CompiledGate(promoe_jit.stride_gate, pi, self._pf)

    def metadata(self) -> dict[str, Any]:
        return {
            **super().metadata(),
            "stride_layers": self._tables[2] if self._tables else None,
            "trained_tokens": self._trained_tokens,
            "online_tokens": self._online_tokens,
        }
