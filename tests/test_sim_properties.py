"""Hypothesis properties of the simulator, over every registered policy.

Each example draws a small model, workload, machine (1-3 GPUs, link concurrency 1-2, an
optional host cap, chunk size), batching and cache budget, runs the simulator with the
policy wrapped to record what it observes, and checks one invariant.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationStart, Policy
from policies.cache import ExpertKey
from policies.registry import policy_class, policy_names
from sim.config import SimConfig
from sim.metrics import WALL_CLOCK_KEYS
from sim.run import SimResult, simulate
from specs import costs
from specs.hardware import HardwareProfile, HostSpec
from specs.model_spec import ModelSpec
from tests.strategies import fitted_costs, random_workload, specs
from tests.test_sim_kit import exact_profile
from traces.types import Request, Workload

POLICIES = policy_names()
SLOW_HOST = HostSpec(
    name="test host", memory_bandwidth_Bps=1e9, cores=4, flops=1e9, task_overhead_s=2e-3
)
EXAMPLES = 8  # per policy; every registered policy runs every property


def recording(name: str, **options: Any) -> Policy:
    """An instance of policy ``name`` that also records every time it is shown and every load."""
    base = policy_class(name)

    class Recording(base):  # type: ignore[valid-type, misc]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.times: list[float] = []
            self.loads: list[ExpertKey] = []

        def on_iteration_start(self, ev: IterationStart) -> None:
            self.times.append(ev.now)
            super().on_iteration_start(ev)

        def on_gate(self, ev: GateOutput) -> None:
            self.times.append(ev.now)
            super().on_gate(ev)

        def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
            self.times.append(now)
            super().on_expert_used(key, tokens, now)

        def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
            self.times.append(now)
            self.loads.append(key)
            super().on_load_finished(key, by_prefetch, now)

        def on_iteration_end(self, ev: IterationEnd) -> None:
            self.times.append(ev.now)
            super().on_iteration_end(ev)

    Recording.__name__ = f"Recording_{base.__name__}"
    return Recording(**options)


@st.composite
def profiles(draw: st.DrawFn) -> HardwareProfile:
    """Fitted linear costs (monotone in tokens and tokens x context) and a drawn link."""
    return exact_profile(
        **draw(fitted_costs()),
        bandwidth_Bps=draw(st.floats(1e5, 1e8)),
        concurrency=draw(st.integers(1, 2)),
        host_cap_Bps=draw(st.sampled_from([None, 3e5, 1e7])),
        num_gpus=draw(st.integers(1, 3)),
        search_s=draw(st.sampled_from([0.0, 1e-4])),
    )


@st.composite
def scenarios(draw: st.DrawFn, policy: str) -> dict[str, Any]:
    spec: ModelSpec = draw(specs())
    name = policy
    w = random_workload(
        spec,
        num_requests=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        with_probs=draw(st.booleans()),
        with_embeddings=draw(st.booleans()),
        with_lookahead=draw(st.booleans()),
        arrival_gap_s=draw(st.sampled_from([0.0, 1e-4, 1e-2])),
    )
    # host figures (hybrid policies compute on the CPU): a CPU task takes longer than any
    # drawn GPU expert time, so the pure-compute lower bound below still holds
    hw = draw(profiles()).model_copy(update={"host": SLOW_HOST})
    if hw.num_gpus > spec.total_experts:  # every GPU holds at least one expert
        hw = hw.model_copy(update={"num_gpus": spec.total_experts})
    if policy_class(name).preload_all:
        cache = spec.total_experts
    else:
        cache = draw(
            st.integers(
                max(spec.top_k, hw.num_gpus), max(spec.total_experts, spec.top_k, hw.num_gpus)
            )
        )
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        policy=name,
        cache_experts=cache,
        batch_size=draw(st.integers(1, 3)),
        batching=draw(st.sampled_from(["static", "continuous"])),
        chunk_bytes=draw(st.sampled_from([256, 700, 10**9])),
        train_fraction=draw(st.sampled_from([None, 0.5])) if len(w.requests) > 1 else None,
        seed=draw(st.integers(0, 3)),
        record_events=True,
        allow_lossy=True,
    )
    return {"workload": w, "config": cfg}


def run(sc: dict[str, Any], **overrides: Any) -> tuple[SimResult, Policy]:
    cfg = sc["config"].model_copy(update=overrides)
    pol = recording(cfg.policy)
    return simulate(sc["workload"], cfg, policy=pol), pol


def pure_compute_s(
    req: Request, spec: ModelSpec, hw: HardwareProfile, with_experts: bool = True
) -> float:
    """The request alone, every expert resident, no queueing: the engine's cost formulas.
    ``with_experts=False`` leaves out the experts' GPU compute (a run that serves experts on
    the host CPU may compute them faster than the GPU would)."""
    n = hw.num_gpus
    stages = [i * n // spec.num_layers for i in range(spec.num_layers)]
    handoffs = sum(1 for i in range(1, spec.num_layers) if stages[i] != stages[i - 1])
    act = spec.hidden_size * 4 if spec.dtype == "fp32" else spec.hidden_size * 2
    ic = hw.interconnect
    total = 0.0
    for it in range(req.output_len):
        sl = req.iteration_rows(it)
        rows = sl.stop - sl.start
        ctx = (sl.stop * (sl.stop + 1) / 2) / rows if it == 0 else float(sl.stop)
        t = costs.head_time_s(hw, spec, 1) + spec.num_layers * costs.dense_layer_time_s(
            hw, spec, rows, ctx
        )
        if n > 1:
            t += handoffs * (rows * act / ic.bandwidth_Bps + ic.latency_s)
        ids = req.routing.topk_ids[sl]
        for layer in range(spec.num_moe_layers):
            experts, tokens = np.unique(ids[:, layer], return_counts=True)
            per_gpu = [0.0] * n
            for e, tok in zip(experts.tolist(), tokens.tolist(), strict=True):
                if with_experts:
                    per_gpu[(layer * spec.num_experts + e) % n] += costs.expert_time_s(
                        hw, spec, tok
                    )
            t += max(per_gpu)
            if n > 1:
                t += rows * act * 2 / ic.bandwidth_Bps + ic.latency_s
        total += t
    return total


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_a_link_never_carries_more_than_its_concurrency(name: str, data: st.DataObject) -> None:
    sc = data.draw(scenarios(policy=name))
    r, _ = run(sc)
    cap = sc["config"].hardware.link.concurrency
    for d in range(sc["config"].hardware.num_gpus):
        edges = sorted(
            [(s.start, 1) for s in r.events.spans if s.cat == "h2d" and s.device == d]
            + [(s.end, -1) for s in r.events.spans if s.cat == "h2d" and s.device == d]
        )
        level = 0
        for _, delta in edges:  # ends sort before starts at the same time
            level += delta
            assert level <= cap


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_bytes_moved_match_loads(name: str, data: st.DataObject) -> None:
    """bytes_h2d = loads x expert bytes; the links moved every finished load's bytes and at
    most one expert's bytes per load."""
    sc = data.draw(scenarios(policy=name))
    r, pol = run(sc)
    m = r.metrics
    eb = sc["config"].model.expert_bytes
    assert m["bytes_h2d"] == m["loads"] * eb
    finished = len(pol.loads)
    fetched = m["bytes_transferred"] - m["bytes_lowbit"]  # low-bit copies land beside the cache
    assert finished * eb <= fetched <= m["bytes_h2d"]
    assert sum(s.args["bytes"] for s in r.events.spans if s.cat == "h2d") == m["bytes_transferred"]
    assert m["hits"] + m["misses"] == m["demands"]


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_simulated_time_never_goes_back(name: str, data: st.DataObject) -> None:
    """Every time the policy is shown (gates, uses, loads, iteration bounds) is in order."""
    sc = data.draw(scenarios(policy=name))
    r, pol = run(sc)
    assert pol.times == sorted(pol.times)
    assert all(s.end >= s.start >= 0 for s in r.events.spans)
    q = r.requests
    assert (q.start_s >= q.arrival_s).all()
    assert (q.ttft_s > 0).all() and (q.e2e_s >= q.ttft_s).all()


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_latency_is_at_least_the_pure_compute_time(name: str, data: st.DataObject) -> None:
    sc = data.draw(scenarios(policy=name))
    r, _ = run(sc)
    w: Workload = sc["workload"]
    cfg: SimConfig = sc["config"]
    by_id = {req.request_id: req for req in w.requests}
    on_gpu = not r.metrics.get("actions_cpu")
    for rid, e2e in zip(r.requests.id, r.requests.e2e_s, strict=True):
        floor = pure_compute_s(by_id[rid], cfg.model, cfg.hardware, with_experts=on_gpu)
        assert e2e >= floor * (1 - 1e-9)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=6)
@given(data=st.data())
def test_whole_model_cached_gives_hit_rate_one_and_no_offload_latency(
    name: str, data: st.DataObject
) -> None:
    sc = data.draw(scenarios(policy=name))
    total = sc["config"].model.total_experts
    r, _ = run(sc, cache_experts=total, warm_start=True)
    ref, _ = run(sc, cache_experts=total, policy="no-offload")
    assert r.metrics["hit_rate"] == 1.0 and r.metrics["bytes_h2d"] == 0
    for col in ("ttft_s", "e2e_s", "tpot_s"):
        np.testing.assert_allclose(r.requests[col], ref.requests[col], rtol=1e-9)


@pytest.mark.parametrize("name", POLICIES)
@settings(max_examples=4)
@given(data=st.data())
def test_the_same_inputs_give_identical_results(name: str, data: st.DataObject) -> None:
    sc = data.draw(scenarios(policy=name))
    a, _ = run(sc)
    b, _ = run(sc)

    def strip(m: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS}, sort_keys=True)

    assert strip(a.metrics) == strip(b.metrics)
    assert a.requests.equals(b.requests)
