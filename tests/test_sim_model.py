"""Semantics of the model beyond single copies: shared bandwidth, cancellation, batching,
arrivals and memory budgets (exact times where the case allows)."""

from __future__ import annotations

import math

import pytest

from policies.base import IterationStart, Policy
from policies.placement import Placement
from sim.config import GB, SimConfig
from sim.memory import cache_capacities, free_bytes_per_gpu
from sim.run import simulate
from specs.errors import InputError
from specs.presets import load_hardware, load_model
from tests.strategies import small_spec
from tests.test_sim_kit import EXPERT_BYTES, ScriptPolicy, config, exact_profile, routed_workload

H, D, E, LAT = 5e-4, 2e-3, 1e-3, 1e-4
BW = EXPERT_BYTES / 4e-3


def approx(v: float) -> object:
    return pytest.approx(v, rel=1e-9, abs=1e-12)


def test_copies_share_the_host_cap() -> None:
    """Two GPUs miss at once under a host cap equal to one link's bandwidth: each copy
    moves at half the bandwidth, so both land at gate + LAT + 2 B / BW."""
    spec = small_spec(layers=1, experts=2, top_k=2)
    hw = exact_profile(num_gpus=2, host_cap_Bps=BW, ic_latency_s=0.0, ic_bandwidth_Bps=1e12)
    w = routed_workload(spec, [{"routes": [[[0, 1]]]}])
    r = simulate(w, config(spec, hw, cache_experts=2, chunk_bytes=256))
    landed = H + D + LAT + 2 * EXPERT_BYTES / BW
    assert r.requests.e2e_s[0] == approx(landed + E + spec.hidden_size * 4 * 2 / 1e12)
    assert r.metrics["link_busy_s"] == [approx(landed - H - D)] * 2


def test_concurrent_copies_on_one_link_share_its_bandwidth() -> None:
    """Concurrency 2: two misses on one GPU copy side by side at half the bandwidth each
    (one latency), instead of one after the other (two latencies)."""
    spec = small_spec(layers=1, experts=2, top_k=2)
    w = routed_workload(spec, [{"routes": [[[0, 1]]]}])
    two = simulate(w, config(spec, exact_profile(concurrency=2), cache_experts=2, chunk_bytes=256))
    one = simulate(w, config(spec, exact_profile(concurrency=1), cache_experts=2))
    both = H + D + LAT + 2 * EXPERT_BYTES / BW
    assert two.requests.e2e_s[0] == approx(both + 2 * E)
    # serial: the first lands after X and computes while the second copies
    assert one.requests.e2e_s[0] == approx(H + D + 2 * (LAT + EXPERT_BYTES / BW) + E)


def test_pageable_copies_use_the_pageable_bandwidth() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = routed_workload(spec, [{"routes": [[1]]}])
    r = simulate(w, config(spec, exact_profile(), cache_experts=1, pinned=False))
    assert r.requests.e2e_s[0] == approx(H + D + LAT + EXPERT_BYTES / (BW / 2) + E)


class CancelAtSecondGate(ScriptPolicy):
    """Prefetches (2, 1) at iteration start and cancels it at layer 1's gate."""

    def on_gate(self, ev) -> None:  # noqa: ANN001
        if ev.layer == 1:
            self.cancel(2, 1)


def test_cancelling_an_in_flight_prefetch_stops_it_at_a_chunk_boundary() -> None:
    spec = small_spec(layers=3, experts=2, top_k=1)
    pol = CancelAtSecondGate(preload=[(0, 0), (1, 0), (2, 0)], at_start=[(2, 1, 1.0)])
    hw = exact_profile(dense_s=1e-3, expert_s=2e-4)
    r = simulate(
        routed_workload(spec, [{"routes": [[0, 0, 0]]}]),
        config(spec, hw, cache_experts=6, chunk_bytes=256),
        policy=pol,
    )
    gate1 = H + 2 * 1e-3 + 2e-4
    done = (gate1 - LAT) * BW
    assert 0 < done < EXPERT_BYTES
    m = r.metrics
    assert m["prefetches_cancelled"] == 1 and pol.loads == []
    assert m["bytes_transferred"] == math.ceil(done / 256) * 256
    assert m["bytes_h2d"] == EXPERT_BYTES  # counted when the copy began


def two_requests(spec, second_at: float):
    routes = [[0], [0], [0]]  # one prompt row, two decodes
    return routed_workload(spec, [{"routes": routes}, {"routes": routes, "arrival_s": second_at}])


def test_continuous_batching_admits_at_the_next_iteration() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    it = H + D + E  # one iteration, every expert resident
    r = simulate(
        two_requests(spec, 0.5 * it),
        config(
            spec,
            exact_profile(),
            cache_experts=2,
            warm_start=True,
            batch_size=2,
            batching="continuous",
        ),
    )
    assert r.requests.start_s.tolist() == [0.0, approx(it)]
    # iteration 2 runs both rows (one prefill, one decode): experts cost once per iteration
    assert r.requests.ttft_s[1] == approx(2 * it - 0.5 * it)


def test_static_batching_waits_for_a_full_batch_and_runs_it_to_completion() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    it = H + D + E
    r = simulate(
        two_requests(spec, 0.5 * it),
        config(
            spec, exact_profile(), cache_experts=2, warm_start=True, batch_size=2, batching="static"
        ),
    )
    assert r.requests.start_s.tolist() == [approx(0.5 * it)] * 2
    assert r.requests.e2e_s.tolist() == [approx(0.5 * it + 3 * it), approx(3 * it)]


def test_closed_loop_arrivals_in_offline_mode() -> None:
    """With a training workload each request arrives when the previous one finished."""
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = two_requests(spec, 100.0)
    it = H + D + E
    r = simulate(w, config(spec, exact_profile(), cache_experts=2, warm_start=True), training=w)
    assert r.metrics["arrivals"] == "closed" and r.metrics["offline"] is True
    assert r.requests.arrival_s.tolist() == [0.0, approx(3 * it)]
    assert r.requests.ttft_s.tolist() == [approx(it)] * 2


class CountsIterations(Policy):
    name = "test-count"

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.rows.append(len(ev.request_ids))


def test_iteration_start_shows_prefill_and_decode_rows() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = routed_workload(spec, [{"routes": [[0], [1], [0]], "prompt_len": 2}])
    pol = CountsIterations()
    simulate(w, config(spec, exact_profile(), cache_experts=2), policy=pol)
    assert pol.rows == [2, 1]


def test_budgets_split_per_gpu_and_check_memory() -> None:
    spec = load_model("mixtral-8x7b")
    hw = load_hardware("paper-6x3090")
    place = Placement(spec.num_moe_layers, spec.num_experts, hw.num_gpus)
    cfg = SimConfig(model=spec, hardware=hw, cache_gb=48)
    caps = cache_capacities(cfg, place)
    assert sum(caps) == int(48 * GB // spec.expert_bytes) and min(caps) >= 146 // 6 - 1
    per_gpu = cache_capacities(cfg.model_copy(update={"cache_per_gpu": True, "cache_gb": 8}), place)
    assert per_gpu == [int(8 * GB // spec.expert_bytes)] * 6
    free = free_bytes_per_gpu(spec, hw, 0.0)
    assert free == hw.gpu.memory_bytes - math.ceil(spec.non_expert_bytes / 6)
    # a budget beyond what a GPU holds is capped at its experts; beyond its memory is an error
    assert (
        cache_capacities(cfg.model_copy(update={"cache_per_gpu": True, "cache_gb": 30}), place)
        == [43] * 4 + [42] * 2
    )
    one = SimConfig(model=spec, hardware=load_hardware("rtx3090-pcie4"), cache_gb=30)
    with pytest.raises(InputError, match="exceeds the 21.01 GiB left on rtx3090-pcie4"):
        cache_capacities(one, Placement(32, 8, 1))
    with pytest.raises(InputError, match="no room for one expert"):
        cache_capacities(cfg.model_copy(update={"kv_reserve_gb": 6 * 24}), place)
    with pytest.raises(InputError, match="keeps all 256 experts resident"):
        cache_capacities(
            SimConfig(model=spec, hardware=load_hardware("rtx3090-pcie4"), policy="no-offload"),
            Placement(32, 8, 1),
            preload_all=True,
        )
