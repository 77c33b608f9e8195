"""A profile's compute scaled by a slowdown (validate's drift correction): every cost
scales, and a simulation with every expert resident scales its latencies exactly."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.run import simulate
from specs.hardware import ComputeModel, LinearCost
from tests.strategies import small_spec, workloads
from tests.test_sim_kit import config, exact_profile

seconds = st.one_of(st.just(0.0), st.floats(1e-9, 1.0))  # no subnormals: they round to 0
factors = st.floats(0.25, 4.0, allow_nan=False)


@st.composite
def costs(draw) -> LinearCost:
    n = draw(st.integers(0, 4))
    xs = sorted(draw(st.sets(st.integers(1, 512), min_size=n, max_size=n)))
    return LinearCost(
        fixed_s=draw(seconds),
        per_token_s=draw(seconds),
        per_token_context_s=draw(seconds),
        knots=[(float(x), draw(seconds)) for x in xs],
    )


@settings(max_examples=50)
@given(costs(), factors, st.integers(1, 1024), st.integers(0, 4096))
def test_a_scaled_cost_takes_factor_times_as_long(cost, f, tokens, context) -> None:
    assert math.isclose(cost.scaled(f)(tokens, context), f * cost(tokens, context), rel_tol=1e-9)


def test_a_scaled_compute_model_scales_every_time_it_holds() -> None:
    c = ComputeModel(
        expert=LinearCost(fixed_s=1e-3, per_token_s=1e-4),
        dense=LinearCost(fixed_s=2e-3, per_token_s=0.0, knots=[(1.0, 2e-3), (8.0, 5e-3)]),
        head=None,
        kernel_launch_s=1e-5,
        policy_search_s=3e-4,
        layer_overhead_s=2e-4,
        policy_overhead_s={"fmoe": 1e-4},
        policy_overhead_per_row_s={"fmoe": 5e-5},
    )
    s = c.scaled(1.5)
    assert s.expert(4) == pytest.approx(1.5 * c.expert(4))
    assert s.dense(4, 10) == pytest.approx(1.5 * c.dense(4, 10))
    assert s.head is None and s.roofline_efficiency == c.roofline_efficiency
    assert (s.kernel_launch_s, s.policy_search_s) == pytest.approx((1.5e-5, 4.5e-4))
    assert s.layer_overhead("fmoe", rows=4) == pytest.approx(1.5 * c.layer_overhead("fmoe", 4))
    assert c.layer_overhead_s == 2e-4  # the original is unchanged
    with pytest.raises(ValueError, match="positive"):
        c.scaled(0.0)


@settings(max_examples=15)
@given(workloads(spec=small_spec()), factors)
def test_with_every_expert_resident_latencies_scale_with_compute(w, f) -> None:
    hw = exact_profile(expert_per_token_s=2e-4, dense_per_token_s=1e-4, head_per_token_s=5e-5)
    slow = hw.model_copy(update={"compute": hw.compute.scaled(f)})
    spec = w.spec
    kw = dict(policy="no-offload", cache_experts=spec.total_experts, arrivals="closed")
    base = simulate(w, config(spec, hw, **kw)).metrics
    scaled = simulate(w, config(spec, slow, **kw)).metrics
    assert base["bytes_h2d"] == scaled["bytes_h2d"] == 0
    for k in ("ttft_mean_s", "e2e_mean_s", "tpot_mean_s"):
        if base[k] is not None and not math.isnan(base[k]):
            assert scaled[k] == pytest.approx(f * base[k], rel=1e-9), k


def test_interference_is_kept_only_when_it_stands_out_of_the_noise() -> None:
    from calibration.bench_interference import Interference

    assert Interference(ratios=[1.15, 1.1, 1.2, 1.12, 1.18]).factor() == pytest.approx(1.15)
    assert Interference(ratios=[0.8, 1.3, 1.0, 1.25, 0.9]).factor() == 1.0  # spread > rise
    assert Interference(ratios=[1.2, 1.3]).factor() == 1.0  # too few rounds to judge
    assert Interference().factor() == 1.0
