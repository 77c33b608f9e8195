"""``lfu``: on-demand loading only; evict the least frequently used expert.

Frequency is counted per compute use of an expert (one per layer-step that needs it,
whatever the number of tokens). ``scope="cache"`` (default, classic in-cache LFU) counts
uses since the expert was last loaded (``CacheEntry.uses``); ``scope="run"`` counts every
use since the run started, surviving evictions. Ties go to the least recently used.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from policies.base import Policy, PolicyContext, PolicyOptions
from policies.baseline_common import SCORE_SCALE, count_then_recency
from policies.cache import CacheEntry, ExpertKey, KernelEviction
from policies.registry import register_policy


class LFUOptions(PolicyOptions):
    scope: Literal["cache", "run"] = Field(
        default="cache", description="count uses while cached (cache) or over the whole run (run)"
    )


@register_policy
class LFU(Policy):
    name = "lfu"
    description = (
        "on-demand loads only; evict the least frequently used expert (ties: least recent)"
    )
    Options = LFUOptions

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self._run_uses = np.zeros((ctx.spec.num_moe_layers, ctx.spec.num_experts), dtype=np.int64)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self._run_uses[key] += 1

    def kernel_eviction(self) -> KernelEviction:
        """Uses per expert (in cache or over the run), then recency; the run counts are
        this policy's own array, which the simulator's compiled path adds to."""
        return KernelEviction(
            "count_then_recency",
            counts=self._run_uses,
            run_counts=self.options.scope == "run",
            scale=SCORE_SCALE,
        )

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: fewest uses, then oldest last use."""
        uses = entry.uses if self.options.scope == "cache" else int(self._run_uses[entry.key])
        return count_then_recency(uses, entry.last_used)
