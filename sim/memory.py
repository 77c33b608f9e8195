"""GPU memory: how many expert slots each GPU's cache gets.

Each GPU holds its share of the dense weights (pipeline stages split them evenly) and of
the KV reserve; the expert cache budget must fit in what is left.
"""

from __future__ import annotations

import math

from policies.placement import Placement
from sim.config import GB, SimConfig
from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec


def free_bytes_per_gpu(spec: ModelSpec, hw: HardwareProfile, kv_reserve_gb: float) -> int:
    """Bytes per GPU left for experts after dense weights and the KV reserve.

    Raises InputError when the dense weights and reserve alone do not fit.
    """
    n = hw.num_gpus
    dense = math.ceil(spec.non_expert_bytes / n)
    kv = math.ceil(kv_reserve_gb * GB / n)
    free = hw.gpu.memory_bytes - dense - kv
    if free < spec.expert_bytes:
        raise InputError(
            f"{spec.name} on {hw.name}: dense weights ({dense / GB:.2f} GiB per GPU) and KV reserve "
            f"({kv / GB:.2f} GiB per GPU) leave no room for one expert ({spec.expert_bytes / GB:.3f} GiB) "
            f"in {hw.gpu.memory_bytes / GB:.2f} GiB"
        )
    return free


def _per_gpu(count: int, placement: Placement, top_k: int, what: str) -> list[int]:
    if count < 1:
        raise InputError(f"per-GPU expert cache {what} holds no expert")
    caps = [min(count, placement.experts_on(d)) for d in range(placement.num_devices)]
    if sum(caps) < top_k:
        raise InputError(
            f"expert cache {what} per GPU holds {sum(caps)} in total, below top-K ({top_k} experts)"
        )
    return caps


def _total(count: int, placement: Placement, top_k: int, what: str) -> list[int]:
    if count < top_k:
        raise InputError(f"expert cache {what} is below top-K ({top_k} experts)")
    return placement.split_budget(count, top_k)


def cache_capacities(cfg: SimConfig, placement: Placement, preload_all: bool = False) -> list[int]:
    """Expert slots per GPU for ``cfg``'s budget. InputError names the problem.

    Errors: a budget below top-K experts, a budget that does not fit in GPU memory, and
    (``preload_all``, the no-offload policy) a budget that cannot hold every expert.
    """
    spec, hw = cfg.model, cfg.hardware
    eb = spec.expert_bytes
    free = free_bytes_per_gpu(spec, hw, cfg.kv_reserve_gb)
    fit = free // eb
    k = spec.top_k
    if cfg.cache_experts is not None:
        what = f"of {cfg.cache_experts} expert{'s' * (cfg.cache_experts != 1)}"
        split = _per_gpu if cfg.cache_per_gpu else _total
        caps = split(cfg.cache_experts, placement, k, what)
    elif cfg.cache_gb is not None:
        count = int(cfg.cache_gb * GB // eb)
        what = f"of {cfg.cache_gb:g} GiB ({count} experts of {eb / 2**20:.3g} MiB)"
        split = _per_gpu if cfg.cache_per_gpu else _total
        caps = split(count, placement, k, what)
    else:
        caps = [min(fit, placement.experts_on(d)) for d in range(placement.num_devices)]
        if sum(caps) < k:
            raise InputError(
                f"{spec.name} on {hw.name}: GPU memory holds {sum(caps)} experts, below top-K ({k})"
            )
    for d, c in enumerate(caps):
        if c > fit:
            raise InputError(
                f"expert cache of {c} experts ({c * eb / GB:.2f} GiB) on GPU {d} exceeds the "
                f"{free / GB:.2f} GiB left on {hw.name} after dense weights and KV reserve"
            )
    if preload_all:
        need = [placement.experts_on(d) for d in range(placement.num_devices)]
        if any(c < n for c, n in zip(caps, need, strict=True)):
            raise InputError(
                f"policy {cfg.policy!r} keeps all {spec.total_experts} experts resident "
                f"({spec.experts_total_bytes / GB:.2f} GiB) but the cache holds {sum(caps)}"
            )
    return caps
