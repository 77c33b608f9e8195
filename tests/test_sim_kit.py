"""Builders shared by the simulator tests: exact-cost profiles, hand-made workloads and
small scripted policies. (A module of helpers; its one test checks the builders.)"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.base import GateOutput, IterationStart, Policy, PolicyContext
from policies.cache import ExpertKey
from sim.config import SimConfig
from specs.hardware import (
    ComputeModel,
    GPUSpec,
    HardwareProfile,
    InterconnectSpec,
    LinearCost,
    LinkSpec,
)
from specs.model_spec import ModelSpec
from tests.strategies import small_spec
from traces.types import Request, Routing, Workload

EXPERT_BYTES = 1536  # small_spec(hidden=8) experts: 3 x 8 x 16 x fp32


def exact_profile(
    *,
    expert_s: float = 1e-3,
    expert_per_token_s: float = 0.0,
    dense_s: float = 2e-3,
    dense_per_token_s: float = 0.0,
    dense_per_token_context_s: float = 0.0,
    head_s: float = 5e-4,
    head_per_token_s: float = 0.0,
    bandwidth_Bps: float = EXPERT_BYTES / 4e-3,
    latency_s: float = 1e-4,
    concurrency: int = 1,
    host_cap_Bps: float | None = None,
    num_gpus: int = 1,
    ic_bandwidth_Bps: float = 1e9,
    ic_latency_s: float = 1e-5,
    search_s: float = 0.0,
) -> HardwareProfile:
    """A profile whose costs are fitted linear models with the given constants."""
    return HardwareProfile(
        name="exact-test",
        kind="calibrated",
        num_gpus=num_gpus,
        gpu=GPUSpec(name="test", memory_bytes=2**30, memory_bandwidth_Bps=1e12, tflops=100.0),
        link=LinkSpec(
            pinned_bandwidth_Bps=bandwidth_Bps,
            pageable_bandwidth_Bps=bandwidth_Bps / 2,
            latency_s=latency_s,
            concurrency=concurrency,
        ),
        host_bandwidth_cap_Bps=host_cap_Bps,
        interconnect=InterconnectSpec(
            kind="nvlink", bandwidth_Bps=ic_bandwidth_Bps, latency_s=ic_latency_s
        ),
        compute=ComputeModel(
            expert=LinearCost(fixed_s=expert_s, per_token_s=expert_per_token_s),
            dense=LinearCost(
                fixed_s=dense_s,
                per_token_s=dense_per_token_s,
                per_token_context_s=dense_per_token_context_s,
            ),
            head=LinearCost(fixed_s=head_s, per_token_s=head_per_token_s),
            policy_search_s=search_s,
        ),
    )


def routed_workload(spec: ModelSpec, requests: list[dict[str, Any]]) -> Workload:
    """Requests from explicit routes: ``routes`` [T][L] lists of K expert ids.

    Each dict: ``routes``, ``prompt_len`` (default 1), ``arrival_s`` (default 0).
    """
    reqs = []
    for i, r in enumerate(requests):
        ids = np.asarray(r["routes"], dtype=np.int16).reshape(-1, spec.num_moe_layers, spec.top_k)
        p = r.get("prompt_len", 1)
        T = ids.shape[0]
        reqs.append(
            Request(
                request_id=f"q{i}",
                arrival_s=r.get("arrival_s", 0.0),
                prompt_len=p,
                output_len=T - p + 1,
                routing=Routing(ids, np.full(ids.shape, 1.0 / spec.top_k, dtype=np.float32)),
            )
        )
    return Workload(spec, reqs, {"source": "tests.test_sim_kit"})


def config(spec: ModelSpec, hw: HardwareProfile, **kw: Any) -> SimConfig:
    return SimConfig(model=spec, hardware=hw, record_events=True, **kw)


class ScriptPolicy(Policy):
    """Preloads ``preload`` keys at bind and issues scripted prefetch orders.

    ``at_start``: orders at the first iteration start; ``at_gate``: {layer: orders} in
    the first iteration. Orders are (layer, expert, priority).
    """

    name = "test-script"

    def __init__(
        self,
        preload: list[ExpertKey] | None = None,
        at_start: list[tuple[int, int, float]] | None = None,
        at_gate: dict[int, list[tuple[int, int, float]]] | None = None,
        async_search: bool = False,
    ) -> None:
        super().__init__()
        self.preload, self.at_start, self.at_gate = preload or [], at_start or [], at_gate or {}
        self.async_search = async_search  # type: ignore[misc]
        self.loads: list[tuple[ExpertKey, bool, float]] = []

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        for key in self.preload:
            ctx.cache_of(key).preload([key])

    def on_iteration_start(self, ev: IterationStart) -> None:
        if ev.iteration == 1:
            for o in self.at_start:
                self.prefetch(*o)

    def on_gate(self, ev: GateOutput) -> None:
        if ev.iteration == 1:
            for o in self.at_gate.get(ev.layer, []):
                self.prefetch(*o)

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self.loads.append((key, by_prefetch, now))


def test_builders_match_the_spec() -> None:
    spec = small_spec(layers=2, experts=3, top_k=1)
    assert spec.expert_bytes == EXPERT_BYTES
    w = routed_workload(spec, [{"routes": [[0, 1], [2, 0]], "prompt_len": 1}])
    w.validate()
    assert w.requests[0].output_len == 2
    hw = exact_profile(expert_s=1e-3)
    from specs import costs

    assert costs.expert_time_s(hw, spec, 5) == 1e-3
    assert costs.transfer_time_s(hw, EXPERT_BYTES) == 1e-4 + 4e-3
