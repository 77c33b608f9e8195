"""``deepspeed``: DeepSpeed-Inference style layer-wise, expert-agnostic offloading.

FMOE_ALGORITHM.md lists the paper's DeepSpeed-Inference baseline as "layer-wise, on
demand, no prediction". ZeRO-offload/ZeRO-Inference streams a layer's parameters from
host memory when that layer runs; being expert-agnostic it moves the layer's experts as
a whole, not just the routed ones. What we model:

- No prediction, no lookahead, nothing fetched ahead of the layer that runs.
- When layer l's gate has run, the routed experts are demand loads (the executor's job,
  first in line) and the layer's other experts are fetched right behind them (orders
  issued in ``on_gate(l)``), as the layer-wise copy would move them. They take link time
  and cache slots like the real layer fetch, but the layer does not wait for them. In the
  timing-free replay they land at once (none of them serves the layer's own demands).
- The fetch is capped to what the device cache can hold next to the routed experts
  (real DeepSpeed would need room for the whole layer; with less it could not run).
- The expert cache evicts the least recently used expert.

Its gate also exists as compiled code (:meth:`DeepSpeed.compiled_gate`,
:mod:`policies.deepspeed_jit`): the simulator's prefetching kernel calls it in place of
``on_gate`` (same orders; the Python hook stays the reference).

``whole_layer=False`` keeps only the on-demand loads (then it behaves like ``lru``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from policies.base import GateOutput, Policy, PolicyContext, PolicyOptions, RecencyEviction
from policies.baseline_common import layer_reserve, select_orders
from policies.compiled_gate import CompiledGate
from policies.registry import register_policy


class DeepSpeedOptions(PolicyOptions):
    whole_layer: bool = Field(
        default=True, description="fetch all of a running layer's experts, not only the routed ones"
    )


@register_policy
class DeepSpeed(RecencyEviction, Policy):
    name = "deepspeed"
    description = (
        "DeepSpeed-Inference: layer-wise, expert-agnostic on-demand fetch of the running layer, "
        "LRU expert cache"
    )
    Options = DeepSpeedOptions

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        J = ctx.spec.num_experts
        self._all = np.arange(J)
        self._ones = np.ones(J)

    def on_gate(self, ev: GateOutput) -> None:
        if not self.options.whole_layer:
            return
        ctx = self.ctx
        chosen = np.unique(ev.topk_ids)
        rest = np.setdiff1d(self._all, chosen, assume_unique=True)
        if rest.size == 0:
            return
        layers = np.full(rest.size, ev.layer)
        for o in select_orders(
            ctx, self._ones[: rest.size], layers, rest, layer_reserve(ctx, ev.layer, chosen)
        ):
            self.prefetch(o.layer, o.expert, o.priority)

    def compiled_gate(self) -> CompiledGate | None:
        """``on_gate``'s orders in numba (:mod:`policies.deepspeed_jit`), for a compiled
        executor's kernel; None without the whole-layer fetch (no orders: no gate)."""
        if not self.options.whole_layer:
            return None
        from policies import deepspeed_jit

        ctx = self.ctx
        if len(ctx.caches) != ctx.placement.num_devices:
            return None  # select_orders' budget and devices would not line up
        pi = deepspeed_jit.state(ctx.spec.num_experts, ctx.placement.num_devices)
        return CompiledGate(deepspeed_jit.whole_layer_gate, pi, np.zeros(1, np.float64))
