"""Analytic cases with exact expected times (one request, known fitted costs).

Costs: head H, dense D per decoder layer, expert E per expert; a copy of one expert
takes LAT + BYTES/BW = X on an idle link. Times compare to 1e-12 relative.
"""

from __future__ import annotations

import math

import pytest

from sim.run import simulate
from tests.strategies import small_spec
from tests.test_sim_kit import EXPERT_BYTES, ScriptPolicy, config, exact_profile, routed_workload

H, D, E, LAT = 5e-4, 2e-3, 1e-3, 1e-4
BW = EXPERT_BYTES / 4e-3
X = LAT + EXPERT_BYTES / BW


def approx(v: float) -> object:
    return pytest.approx(v, rel=1e-12, abs=1e-15)


def one_request(spec, routes, **kw):
    return routed_workload(spec, [{"routes": routes, **kw}])


def test_a_miss_costs_latency_plus_bytes_over_bandwidth() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = one_request(spec, [[1]])
    r = simulate(w, config(spec, exact_profile(), cache_experts=1, policy="lru"))
    m = r.metrics
    assert r.requests.e2e_s[0] == approx(H + D + X + E)
    assert m["ttft_mean_s"] == approx(H + D + X + E)
    assert m["tpot_mean_s"] is None  # one output token: TPOT undefined
    assert m["hit_rate"] == 0.0
    assert m["bytes_h2d"] == EXPERT_BYTES
    assert m["stall_s"] == approx(X)
    assert m["link_busy_s"] == [approx(X)]


def test_a_hit_costs_only_compute() -> None:
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = one_request(spec, [[1]])
    r = simulate(w, config(spec, exact_profile(), cache_experts=2, warm_start=True))
    assert r.requests.e2e_s[0] == approx(H + D + E)
    assert r.metrics["hit_rate"] == 1.0
    assert r.metrics["bytes_h2d"] == 0


def test_decode_iterations_and_tpot() -> None:
    """Three iterations (prefill of 2 rows, two decodes), all hits: TPOT is one iteration."""
    spec = small_spec(layers=1, experts=2, top_k=1)
    w = one_request(spec, [[0], [1], [0], [1]], prompt_len=2)
    r = simulate(w, config(spec, exact_profile(), cache_experts=2, warm_start=True))
    prefill = H + D + 2 * E  # the prompt's two rows use both experts
    assert r.requests.ttft_s[0] == approx(prefill)
    assert r.requests.tpot_s[0] == approx(H + D + E)
    assert r.requests.e2e_s[0] == approx(prefill + 2 * (H + D + E))
    assert r.metrics["layer_steps"] == 3


def test_two_gpus_add_exchange_and_pipeline_handoff() -> None:
    """Experts round-robin over 2 GPUs; layer 1 is the second pipeline stage."""
    spec = small_spec(layers=2, experts=2, top_k=1)
    hw = exact_profile(num_gpus=2, ic_bandwidth_Bps=1e9, ic_latency_s=1e-5)
    w = one_request(spec, [[0, 1]])
    r = simulate(w, config(spec, hw, cache_experts=4, warm_start=True))
    act = spec.hidden_size * 4  # fp32 activations of one row
    exchange = act * 2 / 1e9 + 1e-5
    handoff = act / 1e9 + 1e-5
    assert r.requests.e2e_s[0] == approx(H + 2 * (D + E + exchange) + handoff)


def test_parallel_gpus_wait_for_the_slowest() -> None:
    """Two experts on two GPUs, one missing: the layer ends when its copy and compute end."""
    spec = small_spec(layers=1, experts=2, top_k=2)
    hw = exact_profile(num_gpus=2, ic_bandwidth_Bps=1e9, ic_latency_s=0.0)
    w = one_request(spec, [[[0, 1]]])
    pol = ScriptPolicy(preload=[(0, 0)])  # (0, 0) on GPU 0 resident, (0, 1) on GPU 1 not
    r = simulate(w, config(spec, hw, cache_experts=2), policy=pol)
    exchange = spec.hidden_size * 4 * 2 / 1e9
    assert r.requests.e2e_s[0] == approx(H + D + X + E + exchange)
    assert r.metrics["hit_rate"] == 0.5
    assert r.metrics["link_busy_s"] == [0.0, approx(X)]


@pytest.mark.parametrize("d", [1, 2, 3, 4])
def test_prefetch_d_layers_early_hides_what_compute_covers(d: int) -> None:
    """An order issued at layer 0's gate for layer d's expert lands X later; the compute
    between the two gates is d (D + E), so the stall at layer d is max(0, X - d (D + E))."""
    L = 5
    spec = small_spec(layers=L, experts=2, top_k=1)
    routes = [[1 if layer == d else 0 for layer in range(L)]]
    pol = ScriptPolicy(preload=[(layer, 0) for layer in range(L)], at_gate={0: [(d, 1, 1.0)]})
    hw = exact_profile(dense_s=5e-4, expert_s=5e-4)
    r = simulate(one_request(spec, routes), config(spec, hw, cache_experts=L + 1), policy=pol)
    covered = d * (5e-4 + 5e-4)
    stall = max(0.0, X - covered)
    assert r.metrics["stall_s"] == approx(stall)
    assert r.requests.e2e_s[0] == approx(H + L * (5e-4 + 5e-4) + stall)
    assert r.metrics["hit_rate"] == (1.0 if stall == 0 else (L - 1) / L)
    assert r.metrics["prefetches_used"] == 1
    # accurate only when resident at its demand; still in flight then, it was late
    timely = stall == 0
    assert r.metrics["prefetch_accuracy"] == (1.0 if timely else 0.0)
    assert (r.metrics["prefetch_timely"], r.metrics["prefetch_late"]) == (
        (1, 0) if timely else (0, 1)
    )


def test_async_search_delays_orders_by_the_search_latency() -> None:
    """The same order from an async-search policy starts policy_search_s later."""
    L, d, S = 5, 2, 3e-4
    spec = small_spec(layers=L, experts=2, top_k=1)
    routes = [[1 if layer == d else 0 for layer in range(L)]]
    pol = ScriptPolicy(
        preload=[(layer, 0) for layer in range(L)], at_gate={0: [(d, 1, 1.0)]}, async_search=True
    )
    hw = exact_profile(dense_s=5e-4, expert_s=5e-4, search_s=S)
    r = simulate(one_request(spec, routes), config(spec, hw, cache_experts=L + 1), policy=pol)
    stall = S + X - d * 1e-3
    assert stall > 0
    assert r.metrics["stall_s"] == approx(stall)
    ((key, by_prefetch, landed),) = pol.loads
    assert key == (d, 1) and by_prefetch
    assert landed == approx(H + 5e-4 + S + X)


@pytest.mark.parametrize("rows", [1, 3])
def test_an_iteration_starts_orders_wait_for_its_row_dependent_search(rows) -> None:
    """Orders from an iteration start go policy_start_search(rows) later, gate orders
    policy_search_s later: the prompt's rows decide when the start's prefetch lands."""
    from specs.hardware import LinearCost

    spec = small_spec(layers=2, experts=2, top_k=1)
    S, A, B = 3e-4, 2e-4, 1e-4  # gate search; start search = A + B x rows
    hw = exact_profile(search_s=S)
    start = LinearCost(fixed_s=A, per_token_s=B)
    hw = hw.model_copy(
        update={"compute": hw.compute.model_copy(update={"policy_start_search": start})}
    )
    pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_start=[(1, 1, 1.0)], async_search=True)
    w = one_request(spec, [[0, 0]] * rows + [[0, 1]], prompt_len=rows)
    simulate(w, config(spec, hw, cache_experts=3), policy=pol)
    ((key, by_prefetch, landed),) = pol.loads
    assert key == (1, 1) and by_prefetch
    assert landed == approx(A + B * rows + X)


def test_a_gates_orders_wait_for_the_gate_search_over_the_iterations_rows() -> None:
    """policy_gate_search(rows) replaces policy_search_s for gate orders: a prefill of 3
    rows orders (1, 1) at layer 0's gate, which lands that search and a copy later."""
    from specs.hardware import LinearCost

    spec = small_spec(layers=2, experts=2, top_k=1)
    hw = exact_profile(search_s=1.0)  # never used: the calibrated cost below is
    gate = LinearCost(fixed_s=1e-4, per_token_s=2e-4)
    hw = hw.model_copy(
        update={"compute": hw.compute.model_copy(update={"policy_gate_search": gate})}
    )
    pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_gate={0: [(1, 1, 1.0)]}, async_search=True)
    w = one_request(spec, [[0, 0]] * 3 + [[0, 1]], prompt_len=3)
    simulate(w, config(spec, hw, cache_experts=3), policy=pol)
    ((key, _, landed),) = pol.loads
    gate0 = H + D  # the prefill's layer 0 gate (costs are per call here, not per row)
    assert key == (1, 1) and landed == approx(gate0 + 1e-4 + 3 * 2e-4 + X)


def test_demand_preempts_a_prefetch_at_the_next_chunk_boundary() -> None:
    """A prefetch of (1, 1) starts at t=0; layer 0's miss of (0, 1) at its gate stops the
    prefetch at its next chunk boundary; the demand load goes next; the prefetch resumes
    after it (paying the latency again) and layer 1 waits for it."""
    spec = small_spec(layers=2, experts=2, top_k=1)
    chunk = 256
    hw = exact_profile(dense_s=1e-3, expert_s=5e-4)
    pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_start=[(1, 1, 1.0)])
    w = one_request(spec, [[1, 1]])
    r = simulate(w, config(spec, hw, cache_experts=4, chunk_bytes=chunk), policy=pol)
    gate0 = H + 1e-3
    done = (gate0 - LAT) * BW  # bytes of the prefetch moved when the demand arrives
    boundary = math.ceil(done / chunk) * chunk
    assert 0 < done < boundary < EXPERT_BYTES
    stop = LAT + boundary / BW
    demand_landed = stop + X
    gate1 = demand_landed + 5e-4 + 1e-3
    prefetch_landed = demand_landed + LAT + (EXPERT_BYTES - boundary) / BW
    assert prefetch_landed > gate1
    assert r.requests.e2e_s[0] == approx(prefetch_landed + 5e-4)
    assert r.metrics["preemptions"] == 1
    assert [(k, p) for k, p, _ in pol.loads] == [((0, 1), False), ((1, 1), True)]
    assert pol.loads[0][2] == approx(demand_landed) and pol.loads[1][2] == approx(prefetch_landed)
    assert r.metrics["bytes_transferred"] == 2 * EXPERT_BYTES
    h2d = sorted((s.start, s.end, s.args["bytes"]) for s in r.events.spans if s.cat == "h2d")
    assert [b for _, _, b in h2d] == [boundary, EXPERT_BYTES, EXPERT_BYTES - boundary]


def test_stale_prefetch_is_dropped_when_its_layer_has_passed() -> None:
    """Two orders at iteration start: (1, 1) first (higher priority), then (0, 1). Layer
    0's gate runs while (1, 1) is in flight without needing (0, 1): that order is stale."""
    spec = small_spec(layers=2, experts=2, top_k=1)
    pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_start=[(1, 1, 2.0), (0, 1, 1.0)])
    w = one_request(spec, [[0, 1]])
    r = simulate(w, config(spec, exact_profile(), cache_experts=4), policy=pol)
    assert r.metrics["prefetches_issued"] == 1
    assert r.metrics["prefetch_orders_stale"] == 1
    assert [k for k, _, _ in pol.loads] == [(1, 1)]


def test_an_order_is_not_stale_before_its_layers_gate_has_run() -> None:
    """Layer 0's gate orders (1, 1) then (1, 2). (1, 1) lands during layer 1's dense part,
    before layer 1's gate: the link starts (1, 2) then, as a real copy engine does (the
    gate has not run yet), and layer 1 finds it loading instead of demand-loading it."""
    spec = small_spec(layers=2, experts=4, top_k=1)
    dense = 5e-3
    pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_gate={0: [(1, 1, 2.0), (1, 2, 1.0)]})
    w = one_request(spec, [[0, 2]])
    hw = exact_profile(dense_s=dense)
    r = simulate(w, config(spec, hw, cache_experts=8), policy=pol)
    gate0 = H + dense
    gate1 = gate0 + E + dense
    assert gate0 + E < gate0 + X < gate1  # (1, 1) lands between layer 0's end and gate 1
    assert [(k, p) for k, p, _ in pol.loads] == [((1, 1), True), ((1, 2), True)]
    assert [t for _, _, t in pol.loads] == [approx(gate0 + X), approx(gate0 + 2 * X)]
    assert r.requests.e2e_s[0] == approx(gate0 + 2 * X + E)
    assert r.metrics["prefetches_issued"] == 2 and r.metrics["prefetches_used"] == 1
    assert r.metrics["prefetch_orders_stale"] == 0


def test_prefetches_go_by_descending_priority() -> None:
    """Three orders queued behind a demand load run by descending priority."""
    spec = small_spec(layers=3, experts=4, top_k=1)
    pol = ScriptPolicy(
        preload=[(1, 0), (2, 0)], at_gate={0: [(2, 1, 1.0), (2, 2, 3.0), (2, 3, 2.0)]}
    )
    w = one_request(spec, [[0, 0, 0]])
    hw = exact_profile(dense_s=10e-3)
    r = simulate(w, config(spec, hw, cache_experts=12), policy=pol)
    assert [k for k, _, _ in pol.loads] == [(0, 0), (2, 2), (2, 3), (2, 1)]
    gate0 = H + 10e-3
    assert [t for _, _, t in pol.loads] == [approx(gate0 + i * X) for i in range(1, 5)]
    assert r.metrics["prefetches_issued"] == 3 and r.metrics["prefetch_accuracy"] == 0.0


def test_a_demand_goes_before_queued_prefetches() -> None:
    """At layer 1's gate a prefetch is in flight and two wait; the demand load of (1, 1)
    runs right after the one in flight (one chunk = one expert here), before the queued
    ones."""
    spec = small_spec(layers=3, experts=4, top_k=1)
    pol = ScriptPolicy(preload=[(2, 0)], at_gate={0: [(2, 1, 1.0), (2, 2, 3.0), (2, 3, 2.0)]})
    w = one_request(spec, [[0, 1, 0]])
    r = simulate(w, config(spec, exact_profile(), cache_experts=12), policy=pol)
    assert [k for k, _, _ in pol.loads] == [(0, 0), (2, 2), (1, 1)]
    gate0 = H + D
    assert pol.loads[2][2] == approx(gate0 + 3 * X)
    assert r.requests.e2e_s[0] == approx(gate0 + 3 * X + E + D + E)
    assert r.metrics["preemptions"] == 0


def test_waves_when_the_cache_is_smaller_than_a_layer_needs() -> None:
    """A prefill routes to 3 experts with 1 slot on the only GPU: three waves of load+compute."""
    spec = small_spec(layers=1, experts=3, top_k=1)
    w = one_request(spec, [[0], [1], [2]], prompt_len=3)
    r = simulate(w, config(spec, exact_profile(), cache_experts=1))
    assert r.requests.e2e_s[0] == approx(H + D + 3 * (X + E))
    assert r.metrics["demand_loads"] == 3 and r.metrics["evictions"] == 2


def _interfering(f: float, after_loads: bool = False):
    hw = exact_profile()
    update = {"copy_interference": f, "experts_wait_for_loads": after_loads}
    return hw.model_copy(update={"compute": hw.compute.model_copy(update=update)})


def test_compute_takes_longer_while_the_link_carries_a_copy() -> None:
    """A prefetch ordered at the iteration start copies during the head, layer 0's dense
    part and its expert (each f times as long); layer 1 runs after it landed."""
    spec = small_spec(layers=2, experts=2, top_k=1)
    w = one_request(spec, [[0, 0]])
    f = 1.5
    assert H * f + D * f < X < H * f + D * f + E * f  # the copy ends during layer 0's expert
    for factor, want in ((1.0, H + 2 * (D + E)), (f, (H + D + E) * f + D + E)):
        pol = ScriptPolicy(preload=[(0, 0), (1, 0)], at_start=[(1, 1, 1.0)])
        cfg = config(spec, _interfering(factor), cache_experts=3, policy=pol.name)
        r = simulate(w, cfg, policy=pol)
        assert r.requests.e2e_s[0] == approx(want)
        assert r.metrics["stall_s"] == approx(0.0)
        # the event log (chrome trace) shows the stretched compute too
        spans = [sp for sp in r.events.spans if sp.cat == "compute"]
        assert max(sp.end for sp in spans) == approx(want)
        layer0 = [sp for sp in spans if sp.name == "L0E0"]
        assert layer0[0].end - layer0[0].start == approx(E * factor)


def test_a_fused_call_after_a_miss_is_slowed_by_the_prefetch_behind_it() -> None:
    """Layer 0 misses expert 1; the prefetch ordered at its gate starts when the demand
    load lands, so the layer's fused expert call and layer 1's dense part run beside it;
    layer 1's expert, prefetched by then, runs on an idle link. The wait is the copy."""
    spec = small_spec(layers=2, experts=2, top_k=1)
    w = one_request(spec, [[1, 1]])
    f = 1.5
    assert E * f + D * f > X  # the prefetch has landed when layer 1's expert runs
    pol = ScriptPolicy(preload=[(1, 0)], at_gate={0: [(1, 1, 1.0)]})
    cfg = config(spec, _interfering(f, after_loads=True), cache_experts=3, policy=pol.name)
    r = simulate(w, cfg, policy=pol)
    assert r.requests.e2e_s[0] == approx(H + D + X + E * f + D * f + E)
    assert r.metrics["stall_s"] == approx(X)
    assert r.metrics["hit_rate"] == 0.5
