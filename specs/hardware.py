"""HardwareProfile: what a machine costs, as the simulator needs it.

A profile is either *published* (a preset built from public figures, each cited in the
file), *calibrated* (written by ``fmoe calibrate bench`` from measurements on one
machine, for one model) or a *placeholder* (cpu-local before calibration). Units: bytes,
bytes per second, seconds.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


# Sanity bounds: far past any machine, near enough that the simulator's arithmetic
# stays finite (a profile with 1e308 FLOP/s or a 1e-300 B/s link is a typo, not a machine).
MAX_BYTES = 2**50  # 1 PiB
MAX_BPS = 1e15  # 1 PB/s
MIN_LINK_BPS = 1.0  # 1 B/s
MAX_TFLOPS = 1e6
MAX_SECONDS = 1e6  # any one fixed cost or latency
MAX_COUNT = 1024  # GPUs, link concurrency


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class GPUSpec(_Strict):
    """One accelerator (all GPUs of a profile are alike)."""

    name: str
    memory_bytes: int = Field(gt=0, le=MAX_BYTES)
    memory_bandwidth_Bps: float = Field(gt=0, le=MAX_BPS)
    tflops: float = Field(
        gt=0, le=MAX_TFLOPS, description="dense bf16/fp16 tensor TFLOP/s (fp32 accumulate)"
    )


class LinkSpec(_Strict):
    """The host->GPU link of one GPU."""

    pinned_bandwidth_Bps: float = Field(
        ge=MIN_LINK_BPS, le=MAX_BPS, description="sustained H2D from pinned memory"
    )
    pageable_bandwidth_Bps: float = Field(
        ge=MIN_LINK_BPS, le=MAX_BPS, description="sustained H2D from pageable memory"
    )
    latency_s: float = Field(ge=0, le=MAX_SECONDS, description="fixed cost per transfer")
    concurrency: int = Field(
        default=1, ge=1, le=MAX_COUNT, description="transfers the link carries at once"
    )
    emulated: bool = Field(default=False, description="True when the link is a CPU emulation")
    emulated_gbps: float | None = Field(
        default=None, gt=0, description="the emulation's setting (GB/s) when emulated"
    )
    emulated_latency_us: float | None = Field(
        default=None, ge=0, description="the emulation's per-transfer latency setting"
    )


class InterconnectSpec(_Strict):
    """GPU<->GPU links (expert-parallel activations, pipeline hand-offs)."""

    kind: Literal["nvlink", "pcie", "none"] = "none"
    bandwidth_Bps: float = Field(default=1e12, gt=0, le=MAX_BPS)
    latency_s: float = Field(default=0.0, ge=0, le=MAX_SECONDS)


class LinearCost(_Strict):
    """time = fixed_s + per_token_s * tokens (+ per_token_context_s * tokens * context).

    With ``knots`` [(tokens, seconds), ...] (tokens ascending) the token term is
    piecewise linear instead: interpolated between knots, the first knot's time below
    it, and ``last seconds + per_token_s * (tokens - last tokens)`` beyond the last
    (``fixed_s`` is then unused). CPU kernels switch algorithms with the token count
    (a matrix-vector product at 1 token, blocked GEMM from 2), which one line cannot fit.
    """

    fixed_s: float = Field(ge=0, le=MAX_SECONDS)
    per_token_s: float = Field(ge=0, le=MAX_SECONDS)
    per_token_context_s: float = Field(default=0.0, ge=0, le=MAX_SECONDS)
    knots: list[tuple[float, float]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_knots(self) -> LinearCost:
        xs = [k[0] for k in self.knots]
        if any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
            raise ValueError("knots must have strictly ascending token counts")
        if any(k[1] < 0 for k in self.knots):
            raise ValueError("knot times must be >= 0")
        return self

    def _token_term(self, tokens: float) -> float:
        k = self.knots
        if not k:
            return self.fixed_s + self.per_token_s * tokens
        if tokens <= k[0][0]:
            return k[0][1]
        if tokens >= k[-1][0]:
            return k[-1][1] + self.per_token_s * (tokens - k[-1][0])
        i = bisect.bisect_right([x for x, _ in k], tokens)
        (x0, y0), (x1, y1) = k[i - 1], k[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def __call__(self, tokens: int, context: int = 0) -> float:
        return self._token_term(tokens) + self.per_token_context_s * tokens * context

    def scaled(self, factor: float) -> LinearCost:
        """This cost with every time ``factor`` times as long (``factor`` > 0)."""
        return LinearCost(
            fixed_s=self.fixed_s * factor,
            per_token_s=self.per_token_s * factor,
            per_token_context_s=self.per_token_context_s * factor,
            knots=[(x, y * factor) for x, y in self.knots],
        )


class ComputeModel(_Strict):
    """Compute costs: fitted linear models when calibrated, a roofline otherwise.

    ``expert``: one routed expert's FFN on ``tokens`` tokens. ``dense``: one decoder
    layer's attention, norms, gate and shared experts on ``tokens`` tokens with
    ``context`` tokens of KV. ``head``: embedding + LM head per iteration. When a fitted
    cost is absent the roofline (bytes / bandwidth vs flops / peak, at
    ``roofline_efficiency``) is used.
    """

    fitted_for_model: str | None = None
    expert: LinearCost | None = None
    dense: LinearCost | None = None
    head: LinearCost | None = None
    roofline_efficiency: float = Field(default=0.7, gt=0, le=1)
    kernel_launch_s: float = Field(default=10e-6, ge=0)
    policy_search_s: float = Field(
        default=2e-4, ge=0, description="latency until an async policy's search result is usable"
    )
    policy_gate_search: LinearCost | None = Field(
        default=None,
        description="latency of an async policy's search at a gate vs the iteration's "
        "token rows (None: policy_search_s)",
    )
    policy_start_search: LinearCost | None = Field(
        default=None,
        description="latency of an async policy's search at an iteration start vs the "
        "iteration's token rows (fMoE's semantic search; None: policy_search_s)",
    )
    fit_errors: dict[str, Annotated[float, Field(allow_inf_nan=True)]] = Field(
        default_factory=dict, description="relative error per fit (NaN: not measurable)"
    )
    layer_overhead_s: float = Field(
        default=0.0,
        ge=0,
        description="executor time per MoE layer step besides dense and expert compute "
        "(hooks, routing bookkeeping, cache calls); measured by calibrate bench",
    )
    policy_overhead_s: dict[str, float] = Field(
        default_factory=dict,
        description="extra executor time per MoE layer step of a named policy (its hooks "
        "on the compute thread), on top of layer_overhead_s",
    )
    experts_wait_for_loads: bool = Field(
        default=False,
        description="True: a layer's experts compute only once all of them are resident (one "
        "fused call, as the real executor does); False: resident experts compute while the "
        "misses load, loaded ones as they land",
    )
    policy_overhead_per_row_s: dict[str, float] = Field(
        default_factory=dict,
        description="extra executor time per MoE layer step and token row of a named policy "
        "(work that grows with the batch, e.g. a search over every prefill row)",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads the fits were measured with"
    )
    copy_interference: float = Field(
        default=1.0,
        ge=0.5,
        le=5.0,
        description="compute takes this many times as long while the GPU's host link carries "
        "a copy (1: no interference; measured by calibrate bench: on the CPU an emulated "
        "link's copies share the cores and memory bandwidth with compute)",
    )

    def scaled(self, factor: float) -> ComputeModel:
        """This model on a machine ``factor`` times slower (``factor`` > 0): the fitted
        costs, kernel launch, executor overheads and search latency all scaled. Roofline
        costs (where a fit is absent) are left as they are; validate scales calibrated
        profiles, which have every fit."""
        if not factor > 0:
            raise ValueError(f"a compute scale factor must be positive, got {factor}")

        def fit(c: LinearCost | None) -> LinearCost | None:
            return None if c is None else c.scaled(factor)

        return self.model_copy(
            update={
                "expert": fit(self.expert),
                "dense": fit(self.dense),
                "head": fit(self.head),
                "kernel_launch_s": self.kernel_launch_s * factor,
                "policy_search_s": self.policy_search_s * factor,
                "policy_gate_search": fit(self.policy_gate_search),
                "policy_start_search": fit(self.policy_start_search),
                "layer_overhead_s": self.layer_overhead_s * factor,
                "policy_overhead_s": {k: v * factor for k, v in self.policy_overhead_s.items()},
                "policy_overhead_per_row_s": {
                    k: v * factor for k, v in self.policy_overhead_per_row_s.items()
                },
            }
        )

    def start_search_s(self, rows: int) -> float:
        """Latency of an async policy's iteration-start search over ``rows`` token rows."""
        if self.policy_start_search is None:
            return self.policy_search_s
        return self.policy_start_search(rows)

    def gate_search_s(self, rows: int) -> float:
        """Latency of an async policy's gate search over ``rows`` token rows."""
        if self.policy_gate_search is None:
            return self.policy_search_s
        return self.policy_gate_search(rows)

    def layer_overhead(self, policy: str | None = None, rows: int = 1) -> float:
        """Executor overhead of one MoE layer step of ``rows`` token rows under ``policy``."""
        if not policy:
            return self.layer_overhead_s
        return (
            self.layer_overhead_s
            + self.policy_overhead_s.get(policy, 0.0)
            + self.policy_overhead_per_row_s.get(policy, 0.0) * rows
        )


class HostSpec(_Strict):
    """The host CPU and memory, for computing an expert on the CPU (hybrid execution).

    ``memory_bandwidth_Bps``: what the host memory sustains (a measured STREAM/MLC
    figure where published, else the spec's MT/s x channels x 8 B, said so in the
    preset). ``expert_bandwidth_efficiency``: the share of it an expert FFN kernel
    reads weights at (published: ~61% for a CPU int4 expert path, colibri issue #537).
    ``flops``: the CPU's FLOP/s for the expert FFN in its weight format (AVX-512 /
    AMX where published). ``task_overhead_s``: fixed cost per expert task (thread
    hand-off). Activations cross the link: ``d2h_bandwidth_Bps`` down (None: the link's
    pinned bandwidth) and the link's pinned bandwidth back up, each paying
    ``LinkSpec.latency_s``.
    """

    name: str
    memory_bandwidth_Bps: float = Field(gt=0)
    cores: int = Field(ge=1)
    flops: float = Field(gt=0, description="CPU FLOP/s for expert FFN matmuls")
    expert_bandwidth_efficiency: float = Field(default=0.61, gt=0, le=1)
    task_overhead_s: float = Field(default=10e-6, ge=0)
    d2h_bandwidth_Bps: float | None = Field(default=None, gt=0)


class HardwareProfile(_Strict):
    """A machine: GPUs, their host links, interconnect and compute cost model."""

    schema_version: int = SCHEMA_VERSION
    name: str
    kind: Literal["published", "calibrated", "placeholder"] = "published"
    device: Literal["cuda", "cpu"] = "cuda"
    num_gpus: int = Field(default=1, ge=1, le=MAX_COUNT)
    gpu: GPUSpec
    link: LinkSpec
    host_bandwidth_cap_Bps: float | None = Field(
        default=None, gt=0, description="shared host-side cap across all links at once"
    )
    interconnect: InterconnectSpec = InterconnectSpec()
    compute: ComputeModel = ComputeModel()
    host: HostSpec | None = Field(
        default=None, description="host CPU figures; None: experts cannot run on the CPU"
    )
    sources: list[str] = Field(default_factory=list)
    notes: str = ""

    @field_validator("schema_version")
    @classmethod
    def _check_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(f"unknown schema_version {v} (this version reads {SCHEMA_VERSION})")
        return v

    @property
    def total_gpu_memory_bytes(self) -> int:
        return self.num_gpus * self.gpu.memory_bytes

    def summary(self) -> dict:
        """The profile as plain JSON-able data, for `fmoe hardware --json`."""
        return self.model_dump(mode="json")

    def to_json(self, path: str | Path) -> None:
        from specs.jsonio import write_json_atomic

        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, path: str | Path) -> HardwareProfile:
        from specs.jsonio import load_model_json

        return load_model_json(cls, path)
