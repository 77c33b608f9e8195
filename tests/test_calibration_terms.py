"""The calibrated terms the simulator uses (executor overhead, experts after loads) and the
small pure pieces of bench and validate: medians, overhead split, host cap, errors."""

from __future__ import annotations

import itertools
import math
import statistics

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import approx

from calibration.bench_compute import Overhead, median_standard_error
from calibration.bench_link import copy_sizes, host_cap
from calibration.sim_error import add_errors, summarise
from calibration.stopwatch import interleaved_times, robust_time
from sim.run import simulate
from specs.hardware import HardwareProfile
from tests.strategies import small_spec
from tests.test_sim_kit import EXPERT_BYTES, ScriptPolicy, config, exact_profile, routed_workload

H, D, E, LAT = 5e-4, 2e-3, 1e-3, 1e-4
BW = EXPERT_BYTES / 4e-3


def _with(hw: HardwareProfile, **compute: object) -> HardwareProfile:
    return hw.model_copy(update={"compute": hw.compute.model_copy(update=compute)})


def test_layer_overhead_adds_per_moe_layer_and_row() -> None:
    """Every expert resident: TTFT of a P-token prompt grows by exactly L x (fixed +
    policy fixed + policy per row x P) with the overhead terms set."""
    spec = small_spec(layers=3, experts=4, top_k=2)
    routes = [[[0, 1]] * 3] * 5  # 5 prompt tokens, one output token
    w = routed_workload(spec, [{"routes": routes, "prompt_len": 5}])
    kw = {"cache_experts": spec.total_experts, "warm_start": True, "policy": "lru"}
    plain = simulate(w, config(spec, exact_profile(), **kw))
    hw = _with(
        exact_profile(),
        layer_overhead_s=1e-4,
        policy_overhead_s={"lru": 2e-5, "fmoe": 1.0},
        policy_overhead_per_row_s={"lru": 3e-6},
    )
    over = simulate(w, config(spec, hw, **kw))
    assert plain.metrics["hit_rate"] == over.metrics["hit_rate"] == 1.0
    added = spec.num_moe_layers * (1e-4 + 2e-5 + 3e-6 * 5)
    assert over.requests.ttft_s[0] - plain.requests.ttft_s[0] == approx(added)
    assert hw.compute.layer_overhead("fmoe", 1) == approx(1e-4 + 1.0)
    assert hw.compute.layer_overhead(None) == 1e-4


def test_experts_wait_for_loads_runs_the_layer_after_its_last_copy() -> None:
    """One resident and one missing expert. Overlapped: the resident one computes while
    the other copies; waiting (the real executor's one fused call): both compute after
    the copy lands, so the layer ends one expert time later and the stall is the copy."""
    spec = small_spec(layers=1, experts=4, top_k=2)
    w = routed_workload(spec, [{"routes": [[[0, 1]]]}])
    copy = LAT + EXPERT_BYTES / BW
    runs = {}
    for wait in (False, True):
        hw = _with(exact_profile(), experts_wait_for_loads=wait)
        runs[wait] = simulate(
            w, config(spec, hw, cache_experts=2), policy=ScriptPolicy(preload=[(0, 0)])
        )
    assert runs[False].requests.e2e_s[0] == approx(H + D + copy + E)
    assert runs[True].requests.e2e_s[0] == approx(H + D + copy + 2 * E)
    assert runs[True].metrics["stall_s"] == approx(copy)
    assert runs[False].metrics["stall_s"] == approx(copy - E)


def test_interleaved_times_visit_points_round_robin_and_skip_each_first_call() -> None:
    calls: list[str] = []
    seq = {"a": itertools.count(), "b": itertools.count()}

    def point(name: str, values: list[float]):
        def run() -> float:
            calls.append(name)
            return values[next(seq[name]) % len(values)]

        return run

    ticks = []
    got = interleaved_times(
        {"a": point("a", [9.0, 1.0, 3.0]), "b": point("b", [7.0, 2.0, 2.0])},
        repeats=2,
        tick=ticks.append,
        burst=2,
    )
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    # a's recorded samples: 1, 3 (first of visit 1 skipped), 1, 3 (9 skipped)
    assert got == {"a": robust_time([1.0, 3.0, 1.0, 3.0]), "b": 2.0}
    assert ticks == [1] * 4


def test_overhead_split_into_fixed_and_per_row() -> None:
    steady = [2e-4 + 31e-4 + d for d in (-1e-6, 0.0, 1e-6, 2e-6)]  # a clear rise per row
    lfu = [1e-6, 0.0, -1e-6, 2e-6]
    o = Overhead("lru", 3e-4, {"fmoe": 2e-4, "lfu": -1e-5}, {"fmoe": steady, "lfu": lfu}, 32)
    fixed, per_row = o.per_policy()
    rise = statistics.median(steady) - 2e-4
    assert per_row["fmoe"] == approx(rise / 31) and fixed["fmoe"] == approx(2e-4 - rise / 31)
    assert fixed["lfu"] == 0.0 and per_row["lfu"] == approx((5e-7 + 1e-5) / 31)


def test_a_prefill_rise_within_its_rounds_noise_is_no_per_row_cost() -> None:
    # the medians rise by 4 ms per layer, but the rounds spread over +-15 ms: noise
    noisy = [-0.011, 0.019, 0.004, -0.015, 0.017]
    o = Overhead("lru", 3e-4, {"mixtral-offloading": 2e-4}, {"mixtral-offloading": noisy}, 32)
    fixed, per_row = o.per_policy()
    assert per_row["mixtral-offloading"] == 0.0 and fixed["mixtral-offloading"] == 2e-4
    # the same median rise over a tight spread is a per-row cost
    tight = [0.0039, 0.0041, 0.004, 0.0040, 0.0042]
    o = Overhead("lru", 3e-4, {"mixtral-offloading": 2e-4}, {"mixtral-offloading": tight}, 32)
    assert o.per_policy()[1]["mixtral-offloading"] == approx((0.0040 - 2e-4) / 31)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0), min_size=0, max_size=9))
def test_median_standard_error_is_a_spread_or_unknown(samples: list[float]) -> None:
    se = median_standard_error(samples)
    if len(samples) < 3:
        assert se == math.inf
    else:
        assert se >= 0.0
        assert (se == 0.0) == (
            sum(x == statistics.median(samples) for x in samples) * 2 > len(samples)
        )


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(1e8, 3e10), min_size=1, max_size=8), st.floats(0.1, 1.5))
def test_host_cap_only_when_links_slow_each_other_down(single: list[float], share: float) -> None:
    together = share * sum(single)
    cap = host_cap(single, together)
    if len(single) < 2 or share >= 0.9:
        assert cap is None
    else:
        assert cap == approx(together)


def test_copy_sizes_halve_down_from_one_expert() -> None:
    assert copy_sizes(64 << 20, points=4) == [8 << 20, 16 << 20, 32 << 20, 64 << 20]
    assert copy_sizes(10_000, points=6, smallest=4096) == [5000, 10_000]


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    req = pd.DataFrame(
        {
            "policy": ["lru", "lru", "fmoe"],
            "real_ttft_s": [1.0, 2.0, 1.0],
            "sim_ttft_s": [1.1, 1.8, 1.0],
            "real_tpot_s": [0.1, 0.2, float("nan")],
            "sim_tpot_s": [0.1, 0.25, 0.1],
            "real_e2e_s": [2.0, 4.0, 1.0],
            "sim_e2e_s": [2.0, 4.0, 1.5],
        }
    )
    runs = pd.DataFrame(
        {
            "policy": ["lru", "fmoe"],
            "real_ttft_mean_s": [1.5, 1.0],
            "sim_ttft_mean_s": [1.45, 1.0],
            "real_tpot_mean_s": [0.15, 0.1],
            "sim_tpot_mean_s": [0.175, 0.1],
            "real_e2e_mean_s": [3.0, 1.0],
            "sim_e2e_mean_s": [3.0, 1.5],
            "real_hit_rate": [0.5, 0.9],
            "sim_hit_rate": [0.5, 0.93],
            "real_stall_s": [1.0, 0.0],
            "sim_stall_s": [0.5, 0.1],
            "real_e2e_total_s": [6.0, 1.0],
            "sim_e2e_total_s": [6.0, 1.5],
        }
    )
    return req, runs


def test_errors_are_per_request_mape_and_per_run_absolute() -> None:
    req, runs = _frames()
    add_errors(req, runs)
    s = summarise(req, runs)
    assert s["ttft_mape"] == approx((0.1 + 0.1 + 0.0) / 3)
    assert s["tpot_mape"] == approx((0.0 + 0.25) / 2)  # the NaN TPOT is left out
    assert s["tpot_mape_run_means"] == approx((1 / 6 + 0) / 2)
    assert s["hit_rate_abs_error_max"] == approx(0.03)
    assert s["stall_abs_error_s_mean"] == approx(0.3)
    assert s["targets"]["hit_rate_abs_error_max"]["met"] is False
    assert s["targets"]["ttft_mape"]["met"] is True


@pytest.mark.parametrize("bad", [0, -1])
def test_interleaved_times_need_a_repeat(bad: int) -> None:
    with pytest.raises(ValueError):
        interleaved_times({"a": lambda: 1.0}, repeats=bad)


def test_robust_time_is_the_lower_quartile_so_added_load_moves_it_less() -> None:
    quiet = [1.0] * 6 + [1.1, 1.2]
    loaded = quiet + [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]  # contention only adds time
    assert robust_time(quiet) == approx(1.0)
    assert robust_time(loaded) < statistics.median(loaded)
    assert robust_time(loaded) == approx(1.0)
