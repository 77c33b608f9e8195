"""Hybrid execution in the simulator: miss actions, the host CPU, cache scope, refusals.

Properties (hypothesis, drawn models, workloads and action mixes): every demanded expert
is served by exactly one action; bytes over the link count fetches (and low-bit copies)
only; CPU actions never change the cache; per-layer scope never lets a layer use another
layer's slots.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, MissAction, Policy, RecencyEviction
from policies.cache import ExpertKey, ExpertState
from policies.cache_scope import LayerScopedCache, make_caches
from sim.config import SimConfig
from sim.run import simulate
from specs import costs
from specs.errors import InputError
from specs.hardware import HostSpec
from specs.model_spec import FORMAT_BITS
from specs.presets import hardware_preset_names, load_hardware, load_model
from tests.strategies import random_workload, small_spec
from tests.test_sim_kit import exact_profile

HOST = HostSpec(name="test host", memory_bandwidth_Bps=1e7, cores=4, flops=1e9)
ACTIONS = [MissAction.FETCH, MissAction.CPU, MissAction.LOWBIT, MissAction.SKIP]


class Scripted(RecencyEviction, Policy):
    """Chooses each miss action at random (seeded) among ``allowed``."""

    name = "scripted-actions"

    def __init__(self, allowed: list[MissAction], seed: int, on_loading: bool = False) -> None:
        super().__init__()
        self.allowed, self.rng = allowed, np.random.default_rng(seed)
        self.miss_action_on_loading = on_loading
        self.asked: list[ExpertKey] = []

    def on_gate(self, ev: GateOutput) -> None:
        # a few prefetches, so demands also find copies under way (LOADING keys)
        assert self.ctx is not None
        L, J = self.ctx.spec.num_moe_layers, self.ctx.spec.num_experts
        for _ in range(2):
            self.prefetch((ev.layer + 1) % L, int(self.rng.integers(J)), 1.0)

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        self.asked.append(key)
        return self.allowed[int(self.rng.integers(len(self.allowed)))]


def _run(
    allowed: list[MissAction],
    seed: int,
    layers: int,
    cache: int,
    on_loading: bool = False,
    **cfg: Any,
):
    spec = small_spec(layers=layers, experts=6, top_k=2)
    w = random_workload(spec, num_requests=3, seed=seed, max_prompt=4, max_output=4)
    hw = exact_profile().model_copy(update={"host": HOST})
    config = SimConfig(
        model=spec,
        hardware=hw,
        cache_experts=cache,
        allow_lossy=True,
        record_events=True,
        batch_size=2,
        **cfg,
    )
    pol = Scripted(allowed, seed, on_loading)
    return simulate(w, config, policy=pol), pol, spec


mixes = st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=4, unique=True)


@settings(max_examples=25, deadline=None)
@given(
    allowed=mixes,
    seed=st.integers(0, 2**16),
    layers=st.integers(1, 3),
    cache=st.integers(2, 12),
    on_loading=st.booleans(),
)
def test_every_demanded_expert_is_served_by_exactly_one_action(
    allowed, seed, layers, cache, on_loading
):
    r, pol, spec = _run(allowed, seed, layers, cache, on_loading)
    m = r.metrics
    served = sum(m[f"actions_{a.value}"] for a in ACTIONS)
    assert m["hits"] + served == m["demands"]
    assert served == m["misses"]
    for a in ACTIONS:
        # a copy under way is a fetch without asking unless the policy asks to be asked
        if a not in allowed and (a is not MissAction.FETCH or on_loading):
            assert m[f"actions_{a.value}"] == 0
    # the policy was asked once per ABSENT demand; the rest of the misses were loading keys
    assert len(pol.asked) <= m["misses"]
    assert m["exact"] == (m["actions_lowbit"] == 0 and m["actions_skip"] == 0)
    shares = [m[f"action_share_{a.value}"] for a in ACTIONS]
    assert m["misses"] == 0 or math.isclose(sum(shares), 1.0)


@settings(max_examples=25, deadline=None)
@given(
    allowed=mixes, seed=st.integers(0, 2**16), layers=st.integers(1, 3), cache=st.integers(2, 12)
)
def test_link_bytes_count_fetches_and_low_bit_copies_only(allowed, seed, layers, cache):
    r, _, spec = _run(allowed, seed, layers, cache)
    m = r.metrics
    spans = [s for s in r.events.spans if s.cat == "h2d"]
    assert sum(s.args["bytes"] for s in spans) == m["bytes_transferred"]
    lowbit = spec.expert_bytes_as("int4")
    assert m["bytes_lowbit"] == m["actions_lowbit"] * lowbit
    # fetches (demand loads and prefetches) and low-bit copies are all that cross the link;
    # a cancelled prefetch moved at most its expert's bytes
    assert m["bytes_transferred"] - m["bytes_lowbit"] <= m["loads"] * spec.expert_bytes
    assert m["demand_loads"] <= m["actions_fetch"]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.integers(1, 3), cache=st.integers(2, 12))
def test_cpu_and_skip_actions_never_change_the_cache(seed, layers, cache):
    r, _, _ = _run([MissAction.CPU, MissAction.SKIP], seed, layers, cache)
    m = r.metrics
    # no demand load ever: what the cache holds came from prefetches only
    assert m["demand_loads"] == 0
    assert m["loads"] == m["prefetches_issued"]
    assert m["actions_cpu"] + m["actions_skip"] + m["actions_fetch"] == m["misses"]
    assert m["cpu_busy_s"] > 0 or m["actions_cpu"] == 0


@settings(max_examples=20, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans()), max_size=60),
    per_layer=st.integers(1, 3),
)
def test_per_layer_scope_never_lets_a_layer_use_another_layers_slots(ops, per_layer):
    cache = LayerScopedCache(4 * per_layer, 100, layer_capacity=per_layer)
    now = 0.0
    for layer, e, finish in ops:
        key = (layer, e)
        now += 1.0
        before = {k for k in cache.entries}
        if key not in cache.entries:
            try:
                evicted = cache.begin_load(key, now, prefetch=False)
            except Exception:
                continue
            assert all(k[0] == layer for k in evicted)  # only its own layer's entries go
            assert before - set(evicted) | {key} == set(cache.entries)
            if finish:
                cache.finish_load(key, now)
        elif cache.entries[key].state is ExpertState.RESIDENT:
            cache.use(key, now)
        elif finish:
            cache.finish_load(key, now)
        for lay in range(4):
            n = sum(1 for k in cache.entries if k[0] == lay)
            assert n == cache.layer_used(lay) <= per_layer


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_per_layer_scope_in_a_run_keeps_each_layer_within_its_share(seed):
    spec = small_spec(layers=3, experts=6, top_k=2)
    w = random_workload(spec, num_requests=3, seed=seed)
    hw = exact_profile()
    caches_seen = []

    class Watch(RecencyEviction, Policy):
        name = "watch"

        def on_load_finished(self, key, by_prefetch, now):
            assert self.ctx is not None
            c = self.ctx.cache_of(key)
            caches_seen.append([sum(1 for k in c.entries if k[0] == lay) for lay in range(3)])

    cfg = SimConfig(model=spec, hardware=hw, cache_experts=7, cache_scope="per-layer")
    simulate(w, cfg, policy=Watch())
    assert caches_seen and all(max(c) <= 7 // 3 for c in caches_seen)


def test_per_layer_scope_with_fewer_slots_than_layers_x_top_k_is_refused():
    with pytest.raises(InputError, match="layers x top-K"):
        make_caches([5], 100, "per-layer", num_layers=3, top_k=2)


def test_cpu_expert_cost_is_bandwidth_bound_at_one_token_and_compute_bound_at_many():
    hw = load_hardware("rtx4090-ddr5")
    spec = load_model("qwen3-30b-a3b").with_weight_format("int4")
    host = hw.host
    assert host is not None
    bw_s = spec.expert_bytes / (host.memory_bandwidth_Bps * host.expert_bandwidth_efficiency)
    assert costs.cpu_expert_time_s(hw, spec, 1) == pytest.approx(bw_s + host.task_overhead_s)
    n = 4096
    flop_s = 6 * spec.hidden_size * spec.expert_intermediate_size * n / host.flops
    assert flop_s > bw_s
    assert costs.cpu_expert_time_s(hw, spec, n) == pytest.approx(flop_s + host.task_overhead_s)
    # copies taking half the memory bandwidth double the bandwidth-bound part
    half = costs.cpu_expert_time_s(hw, spec, 1, memory_share=0.5)
    assert half == pytest.approx(2 * bw_s + host.task_overhead_s)


def test_weight_formats_size_experts_by_their_bits_per_weight():
    spec = load_model("mixtral-8x7b")
    assert spec.expert_bytes_as("bf16") == spec.expert_bytes == 3 * 4096 * 14336 * 2
    assert spec.expert_bytes_as("int4") == math.ceil(3 * 4096 * 14336 * 4.5 / 8)
    assert spec.expert_bytes_as("int8") == math.ceil(3 * 4096 * 14336 * 8.5 / 8)
    q = spec.with_weight_format("fp8")
    assert q.expert_bytes == spec.expert_bytes_as("fp8") and q.name == spec.name
    assert q.non_expert_bytes < spec.non_expert_bytes
    assert set(FORMAT_BITS) >= {"bf16", "fp8", "int8", "int4"}


HYBRID_PRESETS = [
    "rtx3090-ddr4",
    "rtx4090-ddr5",
    "rtx5090-ddr5",
    "workstation-8ch-ddr5",
    "h100-pcie-2s-xeon",
    "h200-2s-xeon",
    "gh200",
]


@pytest.mark.parametrize("name", HYBRID_PRESETS)
def test_hybrid_presets_have_host_figures_and_cite_both_figure_files(name):
    assert name in hardware_preset_names()
    hw = load_hardware(name)
    assert hw.host is not None and hw.host.memory_bandwidth_Bps > 0
    text = json.dumps(hw.model_dump(mode="json"))
    assert "HYBRID_FIGURES.md" in text and "HARDWARE_FIGURES.md" in text


def test_cpu_work_overlaps_gpu_compute_and_a_faster_host_is_faster():
    spec = small_spec(layers=2, experts=6, top_k=2)
    w = random_workload(spec, num_requests=2, seed=1)

    def tpot(bw: float) -> float:
        hw = exact_profile().model_copy(
            update={"host": HOST.model_copy(update={"memory_bandwidth_Bps": bw})}
        )
        cfg = SimConfig(model=spec, hardware=hw, policy="ktransformers", cache_experts=4)
        return simulate(w, cfg).metrics["e2e_mean_s"]

    assert tpot(1e6) > tpot(1e8)


# -- refusals: one line, exit 2 -------------------------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, str]:
    from fmoe_cli.main import main

    rc = main(list(argv))
    return rc, capsys.readouterr().err


BASE = ["sim", "--model", "qwen3-30b-a3b", "--synth", "--synth-requests", "2", "--json"]


def test_cpu_action_without_host_figures_is_one_line_and_exit_2(capsys):
    rc, err = _cli(
        capsys, *BASE, "--hardware", "rtx3090-pcie4", "--policy", "ktransformers", "--cache-gb", "2"
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "host figures" in err


def test_lossy_action_not_opted_into_is_one_line_and_exit_2(capsys):
    args = [*BASE, "--hardware", "rtx4090-ddr5", "--policy", "hobbit", "--cache-gb", "1"]
    rc, err = _cli(capsys, *args)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--allow-lossy" in err


def test_per_layer_scope_too_small_is_one_line_and_exit_2(capsys):
    args = [*BASE, "--hardware", "rtx4090-ddr5", "--policy", "lru", "--cache-experts", "100"]
    rc, err = _cli(capsys, *args, "--cache-scope", "per-layer")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "layers x top-K" in err


SWEEP = ["sweep", "--model", "qwen3-30b-a3b", "--synth", "--synth-requests", "2", "--no-plots"]


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--hardware", "rtx3090-pcie4", "--policies", "ktransformers"], "host figures"),
        (["--hardware", "rtx4090-ddr5", "--policies", "hobbit"], "--allow-lossy"),
        (
            ["--hardware", "rtx4090-ddr5", "--policies", "lru", "--cache-scope", "per-layer"],
            "layers x top-K",
        ),
    ],
)
def test_sweep_whose_every_combination_is_refused_says_why_in_one_line_and_exits_2(
    capsys, tmp_path, extra, words
):
    budget = ["--cache-experts", "100"] if "per-layer" in extra else ["--cache-gb", "2"]
    rc, err = _cli(capsys, *SWEEP, *extra, *budget, "--out", str(tmp_path), "--quiet")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and words in err
