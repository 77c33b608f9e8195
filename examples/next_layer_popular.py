"""An example policy plugin: prefetch the next layer's most used experts so far.

At each gate of layer l it orders the ``top`` experts of layer l + 1 that have been used
most often so far (priority: their use counts), and it evicts the least recently used
expert. Use it without touching the framework:

    FMOE_POLICY_MODULES=next_layer_popular PYTHONPATH=examples \\
        fmoe sim --model mixtral-8x7b --hardware paper-6x3090 --policy next-layer-popular \\
        --synth --cache-gb 24 --policy-opt top=3

The same class runs in the real executor (``fmoe run``, ``realrun.api.offload``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from policies.base import GateOutput, Policy, PolicyContext, PolicyOptions, RecencyEviction
from policies.cache import ExpertKey
from policies.registry import register_policy


class NextLayerPopularOptions(PolicyOptions):
    top: int = Field(default=2, ge=1, description="experts of the next layer to prefetch")


@register_policy
class NextLayerPopular(RecencyEviction, Policy):
    name = "next-layer-popular"
    description = "example plugin: prefetch the next layer's most used experts; LRU eviction"
    Options = NextLayerPopularOptions

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.uses = np.zeros((ctx.spec.num_moe_layers, ctx.spec.num_experts), dtype=np.int64)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self.uses[key] += 1

    def on_gate(self, ev: GateOutput) -> None:
        nxt = ev.layer + 1
        if nxt >= self.uses.shape[0]:
            return
        counts = self.uses[nxt]
        for e in np.argsort(-counts, kind="stable")[: self.options.top]:
            if counts[e] > 0:
                self.prefetch(nxt, int(e), float(counts[e]))
