"""Placement of experts on devices and the split of a total cache budget over them.

Round-robin by global expert id ``layer * J + expert`` (expert parallelism, as fMoE
inherits from MoE-Infinity): consecutive experts land on consecutive devices, which
balances every layer when J >= number of devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.cache import ExpertKey
from specs.errors import InputError


@dataclass(frozen=True)
class Placement:
    """Which device holds (layer, expert) when it is on a GPU."""

    num_layers: int
    num_experts: int
    num_devices: int = 1

    def device_of(self, key: ExpertKey) -> int:
        layer, expert = key
        return (layer * self.num_experts + expert) % self.num_devices

    def experts_on(self, device: int) -> int:
        """How many of all L x J experts live on ``device``."""
        total = self.num_layers * self.num_experts
        return total // self.num_devices + (1 if device < total % self.num_devices else 0)

    def split_budget(self, total_experts: int, top_k: int) -> list[int]:
        """Split a total budget (in experts) over devices in proportion to what each holds.

        Raises InputError when the total is below top-K or leaves a device with no slot.
        A device never gets more slots than experts it holds.
        """
        if total_experts < top_k:
            raise InputError(f"expert cache of {total_experts} experts is below top-K ({top_k})")
        if total_experts < self.num_devices:
            raise InputError(
                f"expert cache of {total_experts} experts leaves some of {self.num_devices} GPUs with no slot"
            )
        held = [self.experts_on(d) for d in range(self.num_devices)]
        total_held = sum(held)
        total_experts = min(total_experts, total_held)
        shares = [max(1, total_experts * h // total_held) for h in held]
        d = 0
        while sum(shares) < total_experts:
            if shares[d] < held[d]:
                shares[d] += 1
            d = (d + 1) % self.num_devices
        return shares
