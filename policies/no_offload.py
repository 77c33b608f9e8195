"""``no-offload``: every expert resident before the run; nothing is ever loaded.

The latency floor of offloading: it needs GPU memory for all L x J routed experts, so
binding it to caches that cannot hold them is an InputError naming the shortfall.
"""

from __future__ import annotations

from policies.base import Policy, PolicyContext
from policies.cache import KernelEviction
from policies.registry import register_policy
from specs.errors import InputError


@register_policy
class NoOffload(Policy):
    name = "no-offload"
    description = (
        "every expert resident on the GPUs from the start (latency floor; needs memory for all)"
    )
    preload_all = True

    def bind(self, ctx: PolicyContext) -> None:
        """Check that every device can hold all the experts placed on it."""
        super().bind(ctx)
        total = ctx.spec.total_experts
        for d, cache in enumerate(ctx.caches):
            need = ctx.placement.experts_on(d)
            if cache.capacity < need:
                raise InputError(
                    f"policy 'no-offload' needs all {total} experts resident: "
                    f"device {d} holds {need} "
                    f"of them but has {cache.capacity} slots (raise --cache-experts / --cache-gb)"
                )

    def kernel_eviction(self) -> KernelEviction:
        """Nothing is ever evicted (every expert fits); recency is the default order."""
        return KernelEviction("recency")

    def metadata(self) -> dict:
        return {
            **super().metadata(),
            "resident_experts": self.ctx.spec.total_experts if self.ctx else None,
        }
