"""``ktransformers``: routed experts computed on the CPU; attention and shared experts on
the GPU; optionally the hottest experts pinned on the GPU.

Source: KTransformers (kvcache-ai/ktransformers, doc/en/DeepseekR1_V3_tutorial.md and
AMX.md; SOSP'25 paper): MoE layers' routed experts run on the CPU from host memory
(AMX/AVX-512 kernels), everything else on the GPU; an optional list of experts is kept
on the GPU. Here the GPU-resident experts are the ``gpu_experts`` most used in the
training workload (offline mode), preloaded and never evicted; every other demanded
expert is a CPU miss action. No prefetching, no cache replacement.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from policies.base import MissAction, Policy, PolicyOptions
from policies.cache import CacheEntry, ExpertKey
from policies.hybrid_common import HOT, HotPlacement
from policies.registry import register_policy


class KTransformersOptions(PolicyOptions):
    gpu_experts: int = Field(
        default=0, ge=0, description="hottest experts (training counts) pinned on the GPU"
    )


@register_policy
class KTransformers(HotPlacement, Policy):
    name = "ktransformers"
    description = "routed experts on the CPU, attention/shared on the GPU; hot experts pinned"
    Options = KTransformersOptions
    options: KTransformersOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.place_hot = self.options.gpu_experts
        self.placed: set[ExpertKey] = set()
        self._placed_base: dict[ExpertKey, float] = {}

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        return MissAction.CPU

    def eviction_score(self, entry: CacheEntry) -> float:
        return HOT if entry.key in self.placed else entry.last_used

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        pinned = self.placed
        return [HOT if e.key in pinned else e.last_used for e in entries]
