"""The engine's compiled path (sim.engine_fast, sim.fastkernel) against the Python engine.

The Python engine is the reference: on every run the compiled path takes, both give the
same metrics (wall-clock keys aside) and the same per-request records, bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.lru import LRU
from policies.registry import make_policy
from sim import engine_fast
from sim.config import SimConfig
from sim.run import simulate
from specs.errors import InputError
from specs.presets import load_hardware, load_model
from tests.sim_compare import both, engine
from tests.strategies import fitted_costs, random_workload, small_spec, specs
from tests.test_sim_kit import exact_profile
from traces.synth import SynthConfig, generate

POLICIES = [("lru", {}), ("lfu", {}), ("lfu", {"scope": "run"})]


@st.composite
def runs(draw: st.DrawFn) -> tuple[Any, SimConfig]:
    """Small random runs the compiled path takes: made-up models, fitted costs, links of
    one copy at a time; caches from top-K experts (waves) to all of them."""
    spec = draw(specs())
    w = random_workload(
        spec,
        num_requests=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=draw(st.integers(1, 6)),
        with_probs=False,
        with_embeddings=False,
        arrival_gap_s=draw(st.sampled_from([0.0, 1e-4, 5e-4, 3e-3, 1e-2])),
    )
    hw = exact_profile(
        **draw(fitted_costs()),
        bandwidth_Bps=draw(st.floats(2e4, 1e8)),
        num_gpus=min(draw(st.integers(1, 3)), spec.total_experts),
    )
    if draw(st.booleans()):  # the real executor's one fused call per layer
        hw = hw.model_copy(
            update={"compute": hw.compute.model_copy(update={"experts_wait_for_loads": True})}
        )
    policy, options = draw(st.sampled_from(POLICIES))
    low = max(spec.top_k, hw.num_gpus)
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        policy=policy,
        policy_options=options,
        cache_experts=draw(st.integers(low, max(low, spec.total_experts))),
        batch_size=draw(st.integers(1, 4)),
        batching=draw(st.sampled_from(["static", "continuous"])),
        train_fraction=draw(st.sampled_from([None, 0.5])) if len(w.requests) > 1 else None,
        warm_start=draw(st.booleans()),
        seed=draw(st.integers(0, 3)),
    )
    return w, cfg


@settings(max_examples=40, deadline=None)
@given(runs())
def test_compiled_equals_python_engine(run: tuple[Any, SimConfig]) -> None:
    """Same metrics and request records from both engines on random small runs (arrivals
    that interleave with layer steps, waves, both batchers, warm caches, lru and lfu)."""
    workload, cfg = run
    ref, fast, built = both(workload, cfg)
    assert built, "the compiled path did not run"
    assert fast == ref


def test_compiled_equals_python_on_a_preset_run() -> None:
    """Mixtral-8x7B on the 6-GPU preset: Poisson arrivals, batch 3, lfu over the run."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=2.91, seed=1))
    cfg = SimConfig(
        model=spec, hardware=hw, policy="lfu", policy_options={"scope": "run"}, cache_gb=24,
        batch_size=3,
    )  # fmt: skip
    ref, fast, built = both(w, cfg)
    assert built and built[0].python_iterations == 0
    assert fast == ref


def test_waves_on_one_gpu_run_in_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache smaller than a prefill layer needs, one GPU: the kernel runs the waves,
    stepping simpy's clock as LayerSteps._waves does; the results match."""
    from sim import fastkernel

    codes: list[int] = []
    kernel = fastkernel.iteration

    def spy(*args: Any) -> int:
        codes.append(int(kernel(*args)))
        return codes[-1]

    monkeypatch.setattr(fastkernel, "iteration", spy)
    spec, hw = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie4")
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=2))
    cfg = SimConfig(model=spec, hardware=hw, policy="lru", cache_experts=3, batch_size=2)
    ref, fast, built = both(w, cfg)
    assert built and built[0].python_iterations == 0 and fastkernel.YIELD_TO in codes
    assert fast == ref


def test_waves_on_several_gpus_run_on_the_python_engine() -> None:
    """Waves on one of several GPUs (wave processes interleave on simpy's clock): those
    iterations go to the Python engine inside a compiled run; the results match."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=2))
    cfg = SimConfig(model=spec, hardware=hw, policy="lfu", cache_experts=6, batch_size=2)
    ref, fast, built = both(w, cfg)
    assert built and 0 < built[0].python_iterations
    assert fast == ref


def test_lfu_run_counts_reach_the_policy() -> None:
    """The kernel adds every use to lfu's own run counts, as on_expert_used does."""
    spec, hw = load_model("qwen1.5-moe-a2.7b"), load_hardware("a100-80gb-pcie4")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=3))
    cfg = SimConfig(model=spec, hardware=hw, policy="lfu", cache_gb=4)
    counts = []
    for name in ("python", "compiled"):
        pol = make_policy("lfu")
        with engine(name):
            simulate(w, cfg, policy=pol)
        counts.append(pol._run_uses.copy())  # type: ignore[attr-defined]
    assert counts[0].sum() > 0
    assert (counts[0] == counts[1]).all()


class GateWatcher(LRU):
    """lru plus a gate hook: its own class declares no kernel eviction."""

    name = "lru-gate-watcher"

    def on_gate(self, ev: Any) -> None:
        self.seen = getattr(self, "seen", 0) + 1


def _config(policy: str = "lru", **kw: Any) -> SimConfig:
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    return SimConfig(model=spec, hardware=hw, policy=policy, cache_gb=24, **kw)


def test_runs_the_compiled_path_cannot_take_use_the_python_engine() -> None:
    spec = load_model("mixtral-8x7b")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=0))
    cases = [
        (_config("fmoe"), None),  # prefetches
        (_config(record_events=True), None),  # an event log
        (_config(), GateWatcher()),  # a subclass with a hook of its own
    ]
    for cfg, pol in cases:
        with engine("compiled") as built:
            simulate(w, cfg, policy=pol)
        assert not built, cfg.policy
    with engine("compiled") as built:
        simulate(w, _config())
    assert built


def test_auto_takes_small_runs_on_the_python_engine() -> None:
    spec = load_model("mixtral-8x7b")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=0))
    assert sum(r.output_len for r in w.requests) * spec.num_moe_layers < engine_fast.AUTO_MIN_STEPS
    with engine("auto") as built:
        simulate(w, _config())
    assert not built


def test_unknown_engine_setting_is_one_input_error() -> None:
    spec = load_model("mixtral-8x7b")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=0))
    with engine("turbo"), pytest.raises(InputError, match=engine_fast.ENGINE_ENV):
        simulate(w, _config())


def test_arrivals_during_a_load_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests arriving while a layer step waits for its loads: the kernel hands the
    wait back to simpy (WAIT) and resumes; the results match the Python engine's."""
    from sim import fastkernel

    codes: list[int] = []
    kernel = fastkernel.iteration

    def spy(*args: Any) -> int:
        codes.append(int(kernel(*args)))
        return codes[-1]

    monkeypatch.setattr(fastkernel, "iteration", spy)
    spec = small_spec()
    w = random_workload(
        spec, num_requests=5, seed=1, arrival_gap_s=1e-2, with_probs=False, with_embeddings=False
    )
    # a copy takes ~77 ms: the arrivals 10 ms apart land inside the first waits
    cfg = SimConfig(
        model=spec, hardware=exact_profile(bandwidth_Bps=2e4), policy="lru", cache_experts=10,
        batch_size=2,
    )  # fmt: skip
    ref, fast, built = both(w, cfg)
    assert built and fastkernel.WAIT in codes
    assert fast == ref


def test_no_offload_on_the_compiled_path() -> None:
    """Every expert preloaded: all hits, on both engines alike."""
    spec, hw = load_model("qwen1.5-moe-a2.7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=4))
    cfg = SimConfig(model=spec, hardware=hw, policy="no-offload", cache_gb=40, batch_size=2)
    ref, fast, built = both(w, cfg)
    assert built
    assert fast == ref
    assert json.loads(fast)["metrics"]["loads"] == 0
