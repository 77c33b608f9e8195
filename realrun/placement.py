"""Devices, budgets and waves: the pure placement logic of the real executor.

Experts go round-robin over the devices (``policies.placement.Placement``); the total
cache budget is split over them in proportion to what each holds; a layer whose distinct
experts do not fit the slots at once runs in waves. Everything here is plain Python so
it is unit-tested on a CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from policies.placement import Placement
from specs.errors import InputError
from specs.model_spec import ModelSpec

GB = 2**30  # --cache-gb is binary gigabytes, as in the simulator (sim.config.GB)


def resolve_devices(kind: str, num_devices: int | None = None) -> list[torch.device]:
    """The devices that hold expert slots.

    ``cuda``: the visible CUDA devices (all unless ``num_devices``); InputError when there
    are none or too few. ``cpu``: one device unless ``num_devices`` asks for more; several
    CPU "devices" each get their own slot pool, cache and copy thread, which exercises the
    multi-GPU paths on a CPU-only machine.
    """
    if num_devices is not None and num_devices < 1:
        raise InputError(f"--num-devices must be >= 1, got {num_devices}")
    if kind == "cpu":
        return [torch.device("cpu")] * (num_devices or 1)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError("--device cuda: no CUDA device is visible (use --device cpu)")
        n = num_devices or count
        if n > count:
            raise InputError(f"--num-devices {n}: only {count} CUDA devices are visible")
        return [torch.device("cuda", i) for i in range(n)]
    raise InputError(f"unknown device {kind!r} (known: cpu, cuda)")


def budget_experts(
    spec: ModelSpec, cache_experts: int | None = None, cache_gb: float | None = None
) -> int:
    """The total expert cache budget in experts; all experts when neither is given.

    Raises InputError when both are given or when the budget is below what one layer
    needs (top-K experts).
    """
    if cache_experts is not None and cache_gb is not None:
        raise InputError("give either --cache-experts or --cache-gb, not both")
    if cache_gb is not None:
        if not cache_gb > 0:
            raise InputError(f"--cache-gb must be positive, got {cache_gb}")
        n = int(cache_gb * GB // spec.expert_bytes)
        what = f"--cache-gb {cache_gb:g} ({n} experts of {spec.expert_bytes} bytes)"
    elif cache_experts is not None:
        n = cache_experts
        what = f"--cache-experts {n}"
    else:
        return spec.total_experts
    if n < spec.top_k:
        raise InputError(
            f"{what} is below what one layer needs: top-K = {spec.top_k} experts of {spec.name}"
        )
    return min(n, spec.total_experts)


def split_over_devices(
    spec: ModelSpec, total: int, num_devices: int
) -> tuple[Placement, list[int]]:
    """Round-robin placement and per-device slot counts for a total budget."""
    placement = Placement(spec.num_moe_layers, spec.num_experts, num_devices)
    return placement, placement.split_budget(total, spec.top_k)


AUTO = "auto"  # cache_gb that sizes the cache from free CUDA memory (auto_budget_experts)


def check_auto_budget(device: str, cache_experts: int | None, reserve_gb: float) -> None:
    """InputError unless ``cache_gb='auto'`` can apply: CUDA, no expert count, reserve >= 0."""
    if device != "cuda" or cache_experts is not None:
        raise InputError(
            "cache_gb='auto' sizes the cache from free CUDA memory: device='cuda' only"
        )
    if not reserve_gb >= 0:
        raise InputError(f"reserve_gb must be >= 0, got {reserve_gb}")


def auto_budget_experts(
    spec: ModelSpec,
    devices: Sequence[torch.device],
    reserve_bytes: int,
    free_bytes: Callable[[torch.device], int],
    slot_bytes: int | None = None,
) -> int:
    """The largest total budget (in experts) whose split over ``devices`` fits each
    device's ``free_bytes`` less ``reserve_bytes`` (KV cache and activations), for
    ``cache_gb="auto"``: called once the dense weights are on their device. A slot takes
    ``slot_bytes`` (the store's packed row: what a slot pool allocates per expert, which
    alignment, biases or a dtype other than the spec's make differ from
    ``spec.expert_bytes``, the default). InputError when even top-K experts (and a slot
    per device) do not fit."""
    per_slot = slot_bytes or spec.expert_bytes
    caps = [max(0, free_bytes(d) - reserve_bytes) // per_slot for d in devices]
    placement = Placement(spec.num_moe_layers, spec.num_experts, len(devices))
    least = max(spec.top_k, len(devices))
    for total in range(spec.total_experts, least - 1, -1):
        shares = placement.split_budget(total, spec.top_k)
        if all(s <= c for s, c in zip(shares, caps, strict=True)):
            return total
    raise InputError(
        f"cache_gb='auto': the devices' free memory less the {reserve_bytes / GB:.2f} GiB "
        f"reserve holds {caps} experts of {per_slot} bytes; {spec.name} needs at "
        f"least {least} (top-K, and one slot per device)"
    )


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``), after handing the
    allocator's unused cached blocks back (temporaries of loading and moving the dense
    weights would otherwise count as used for good)."""
    torch.cuda.synchronize(device)
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    return int(torch.cuda.mem_get_info(device)[0])


def plan_waves(
    experts: Sequence[int], device_of: Callable[[int], int], capacity: Sequence[int]
) -> list[list[int]]:
    """Split ``experts`` (ascending) into consecutive waves that fit every device's slots.

    Contract: the waves concatenate to ``experts`` in order, and no wave holds more experts
    of device d than ``capacity[d]`` (every capacity >= 1).
    """
    waves: list[list[int]] = []
    cur: list[int] = []
    used = [0] * len(capacity)
    for e in experts:
        d = device_of(e)
        if used[d] >= capacity[d]:
            waves.append(cur)
            cur, used = [], [0] * len(capacity)
        cur.append(e)
        used[d] += 1
    if cur:
        waves.append(cur)
    return waves
