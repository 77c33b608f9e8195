"""``hobbit`` (lossy): on a miss, fetch a low-bit copy of a low-weight expert, the full
copy of a high-weight one.

Source: HOBBIT (arXiv 2411.01433): "less critical" missed experts are replaced by
low-precision copies (token-level dynamic loading), with layer-level prefetch and a
sequence-level cache; it reports up to 9.93x faster decode than offloading baselines at
under 1% accuracy loss. The paper's criticality threshold was not retrieved
(HYBRID_FIGURES.md section 4); here an expert is low-weight when its largest gate weight
in the current batch is below ``threshold`` (default 1 / (2 K): half the weight of a
uniform router, our choice, stated as such). Low-bit copies land in a staging buffer and
are not cached; full copies are cached with LRU eviction. No prefetch (HOBBIT's
layer-level prefetch is not modelled). Lossy: needs --allow-lossy.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from policies.base import GateOutput, MissAction, Policy, PolicyOptions, RecencyEviction
from policies.cache import ExpertKey
from policies.registry import register_policy


class HobbitOptions(PolicyOptions):
    threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="gate weight below which a miss loads low-bit (1: every miss whose expert "
        "does not take all of its rows' weight)",
    )
    action: Literal["lowbit", "skip"] = Field(
        default="lowbit", description="what a low-weight miss gets: a low-bit copy, or skipped"
    )


@register_policy
class Hobbit(RecencyEviction, Policy):
    name = "hobbit"
    description = "lossy: low-bit copy on a miss for low-weight experts (HOBBIT)"
    Options = HobbitOptions
    options: HobbitOptions
    lossy = True  # its answers change what the model computes (opt-in: --allow-lossy)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._weight: dict[int, float] = {}
        self._layer = -1

    def on_gate(self, ev: GateOutput) -> None:
        ids = np.asarray(ev.topk_ids).ravel()
        w = np.asarray(ev.topk_weights, dtype=np.float64).ravel()
        best: dict[int, float] = {}
        for e, x in zip(ids.tolist(), w.tolist(), strict=True):
            if x > best.get(e, -1.0):
                best[e] = x
        self._weight, self._layer = best, ev.layer

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        assert self.ctx is not None
        thr = self.options.threshold
        if thr is None:
            thr = 1.0 / (2 * self.ctx.spec.top_k)
        w = self._weight.get(key[1], 1.0) if key[0] == self._layer else 1.0
        if w >= thr:
            return MissAction.FETCH
        return MissAction.LOWBIT if self.options.action == "lowbit" else MissAction.SKIP
