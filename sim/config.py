"""SimConfig: everything one simulation run needs besides the workload.

A pydantic model, so the CLI, the sweep and the calibration validator build it the same
way and a sweep row can record it. Sizes: ``cache_gb`` and ``kv_reserve_gb`` are in GiB
(2**30 bytes; the unit of every ``*-gb`` flag and of the size columns of tables).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec

GB = 2**30  # one GiB: every *_gb size in this project is binary gigabytes
DEFAULT_CHUNK_BYTES = 16 * 2**20
OFFLINE_TRAIN_FRACTION = 0.7  # the paper: 70% of the prompts fill the store, 30% are tested

Batching = Literal["static", "continuous"]
Arrivals = Literal["auto", "trace", "closed", "schedule"]


class SimConfig(BaseModel):
    """One simulation run: model, machine, policy, cache budget, batching, link options.

    Cache budget: at most one of ``cache_experts`` / ``cache_gb``; both are a total over
    all GPUs split by the placement, or per GPU when ``cache_per_gpu``. Neither: every
    GPU gets what its memory holds after the dense weights and the KV reserve.

    Offline mode (the paper's offline setup): a training workload is given to
    ``policy.fit`` before the run: ``training`` here or the ``training`` argument of
    :func:`sim.run.simulate`, else a split of the workload into ``train_fraction`` for
    training and the rest for the run (``offline=True`` alone means the paper's 70/30).
    ``arrivals="auto"`` then serves requests closed loop (each request arrives when a
    batch slot frees, so TTFT has no queueing) and otherwise follows the trace's arrival
    times; ``"trace"`` / ``"closed"`` force one or the other. ``"schedule"`` replays a
    served trace's iterations: each request joins after the number of forward passes
    recorded in its ``tags["served_iteration"]`` (``fmoe serve --capture``), whatever
    ``batching`` and ``batch_size`` say (sim.batching.ScheduleBatcher).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

    model: ModelSpec
    hardware: HardwareProfile
    policy: str = "lru"
    policy_options: dict[str, Any] = Field(default_factory=dict)
    cache_experts: int | None = Field(default=None, ge=0)
    cache_gb: float | None = Field(default=None, ge=0)
    cache_per_gpu: bool = False
    kv_reserve_gb: float = Field(default=0.0, ge=0, description="total over GPUs, split evenly")
    batch_size: int = Field(default=1, ge=1)
    batching: Batching = "continuous"
    arrivals: Arrivals = "auto"
    prefetch_distance: int | None = Field(default=None, ge=1)
    chunk_bytes: int = Field(
        default=DEFAULT_CHUNK_BYTES, ge=1, description="preemption granularity of a copy"
    )
    pinned: bool = Field(default=True, description="host copies from pinned (else pageable) memory")
    warm_start: bool = Field(default=False, description="fill caches layer by layer before the run")
    seed: int = 0
    offline: bool = Field(
        default=False, description="fit on a training split (70/30 unless train_fraction)"
    )
    train_fraction: float | None = Field(
        default=None, ge=0, le=1, description="split the workload into train/test"
    )
    training: Any = Field(
        default=None, exclude=True, description="a training traces.Workload (offline mode)"
    )
    cache_scope: Literal["global", "per-layer"] = Field(
        default="global",
        description="one slot pool per GPU, or an equal share per MoE layer (llama.cpp, vLLM)",
    )
    allow_lossy: bool = Field(
        default=False, description="let the policy take lossy miss actions (low-bit, skip)"
    )
    lowbit_format: str = Field(
        default="int4", description="weight format of the low-bit copy a LOWBIT miss fetches"
    )
    record_events: bool = Field(
        default=False, description="keep transfer/compute spans (Chrome trace)"
    )

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        if self.cache_experts is not None and self.cache_gb is not None:
            raise ValueError("give at most one of cache_experts and cache_gb")
        return self

    def label(self) -> dict[str, Any]:
        """The fields that identify a run in a results table."""
        return {
            "model": self.model.name,
            "hardware": self.hardware.name,
            "policy": self.policy,
            "cache_experts_budget": self.cache_experts,
            "cache_gb_budget": self.cache_gb,
            "cache_per_gpu": self.cache_per_gpu,
            "batch_size": self.batch_size,
            "batching": self.batching,
            "prefetch_distance": self.prefetch_distance,
            "cache_scope": self.cache_scope,
        }
