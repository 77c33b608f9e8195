"""fMoE's admission forecasts the first layer step's link time from the gate's own demand
loads (forecast="gate", policies/fmoe_forecast.py first_step_shift): the next gate comes
when the slowest device's demand loads have landed and the layer has computed."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.fmoe_forecast import first_step_shift
from policies.placement import Placement
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from tests.test_fmoe_deadline import SPEC, FakeView, J, L, _gate, _start
from traces.synth import SynthConfig, generate

WALL = {"wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s"}


@settings(max_examples=30, deadline=None)
@given(
    n=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    copy=st.floats(1e-4, 2e-2),
    compute=st.floats(0.0, 5e-3),
    spread=st.floats(0.0, 3.0),
    bump=st.integers(0, 5),
)
def test_the_first_step_is_compute_plus_the_slowest_devices_loads(n, copy, compute, spread, bump):
    """T1 = avail - shift: the device with the most loads gets the compute time, every other
    device that plus the difference in loads (its link idles while the slowest loads);
    one more load on a device not the slowest takes one copy from it, one more on the
    slowest gives every other device one copy more."""
    max_s = spread * copy
    interval = compute + max_s
    avail = [interval - 0.5 * k * copy for k in range(len(n))]  # any mean forecast
    t1 = [
        a - s for a, s in zip(avail, first_step_shift(avail, interval, max_s, n, copy), strict=True)
    ]
    c = max(interval - max_s, 0.0)
    top = max(n)
    for d, k in enumerate(n):
        assert math.isclose(t1[d], c + (top - k) * copy, rel_tol=1e-9, abs_tol=1e-12)
        assert t1[d] >= c - 1e-12
    d = bump % len(n)
    more = list(n)
    more[d] += 1
    t2 = [
        a - s
        for a, s in zip(avail, first_step_shift(avail, interval, max_s, more, copy), strict=True)
    ]
    for e in range(len(n)):
        if n[d] < top:  # not the slowest: only its own link time shrinks, by one copy
            want = t1[e] - copy if e == d else t1[e]
        else:  # the slowest gets slower: every other device waits one copy longer
            want = t1[e] if e == d else t1[e] + copy
        assert math.isclose(t2[e], want, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(0, 8), interval=st.floats(0.0, 1e-2), demand=st.floats(0.0, 1e-2))
def test_one_link_keeps_the_mean_forecast(n, interval, demand):
    """One device: its loads are the slowest's, so the shift is zero to the bit (the
    admission is the mean forecast's on one GPU)."""
    avail = max(interval - demand, 0.0)
    assert first_step_shift([avail], interval, demand, [n], 1e-3) == [0.0]


class TwoLinks(FakeView):
    """Two GPUs, idle links."""


def _two(forecast: str) -> FmoePolicy:
    pol = FmoePolicy(store_capacity=4, admission="deadline", forecast=forecast)
    caches = [ExpertCache(capacity=32, expert_bytes=1, device=d) for d in range(2)]
    ctx = PolicyContext(SPEC, Placement(L, J, num_devices=2), caches, executor=TwoLinks(7e-4, 3e-4))
    pol.bind(ctx)
    m = np.full((1, L, J), 0.02, np.float32)
    m[0, np.arange(L), np.arange(L) % J] = 0.94  # expert layer % J at every layer
    pol.store.add_batch(m, np.eye(3, dtype=np.float32)[:1])
    # last decode iteration: 1 ms a gate, each device loading at half the gates (one
    # device a gate): 0.65 ms of prefetch time a step, less than a 0.7 ms copy
    pol._by_kind[False] = (1e-3, [3.5e-4, 3.5e-4], 7e-4)
    return pol


def test_a_copy_on_an_idle_link_while_another_device_loads_lands_in_time():
    """Gate 1 demands (1, 1) on device 1 (absent): the layer waits 0.7 ms for it, then
    computes 0.3 ms, so device 0's link has 1 ms before gate 2, and the copy of (2, 2)
    (device 0) lands in time. The mean forecast (0.65 ms a step) judges it late."""
    late = {}
    for forecast in ("gate", "mean"):
        pol = _two(forecast)
        _start(pol)
        pol.decide_prefetch()
        _gate(pol, 0, now=1e-3)
        pol.decide_prefetch()
        before = pol.metadata()["orders_admitted_late"]
        _gate(pol, 1, now=2e-3)
        sent = {(o.layer, o.expert) for o in pol.decide_prefetch().enqueue}
        assert (2, 2) in sent, forecast
        late[forecast] = pol.metadata()["orders_admitted_late"] - before
    assert late["gate"] == 0 and late["mean"] > 0  # (each of the gate's two passes counts)


def _sim(hardware: str, forecast: str) -> dict:
    spec = load_model("qwen1.5-moe-a2.7b")
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=0.0, seed=5))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="fmoe",
        cache_experts=400,
        policy_options={"forecast": forecast},
    )
    m = simulate(w, cfg).metrics
    out = {k: v for k, v in m.items() if k not in WALL}
    out["policy_metadata"] = {k: v for k, v in m["policy_metadata"].items() if k != "forecast"}
    return out


def test_on_one_gpu_the_gate_forecast_is_the_mean_forecast_to_the_bit():
    assert _sim("a100-80gb-pcie4", "gate") == _sim("a100-80gb-pcie4", "mean")


def test_on_six_gpus_the_gate_forecast_changes_the_admission():
    gate, mean = _sim("paper-6x3090", "gate"), _sim("paper-6x3090", "mean")
    assert (
        gate["policy_metadata"]["orders_admitted_late"]
        != (mean["policy_metadata"]["orders_admitted_late"])
    )
