"""fMoE's compiled victim choice (FmoeEviction.victim_index with its ranking kept between
loads) against its Python scores, end to end: a simulated run whose caches always take
the compiled path and one whose caches never do give the same results to the bit."""

from __future__ import annotations

import pytest

import policies.cache as cache_mod
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from traces.synth import SynthConfig, generate

WALL = {"wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s"}


def _run(model: str, hardware: str, experts: int, batch: int, threshold: int) -> dict:
    spec = load_model(model)
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=0.0, seed=5))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="fmoe",
        cache_experts=experts,
        batch_size=batch,
    )
    old = cache_mod.VICTIM_INDEX_MIN
    cache_mod.VICTIM_INDEX_MIN = threshold
    try:
        m = simulate(w, cfg).metrics
    finally:
        cache_mod.VICTIM_INDEX_MIN = old
    return {k: v for k, v in m.items() if k not in WALL}


@pytest.mark.parametrize(
    ("model", "hardware", "experts", "batch"),
    [
        ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 400, 1),
        ("qwen1.5-moe-a2.7b", "paper-6x3090", 300, 2),
        ("mixtral-8x7b", "a100-80gb-pcie4", 120, 1),
    ],
)
def test_compiled_victims_give_the_scores_results(
    model: str, hardware: str, experts: int, batch: int
) -> None:
    compiled = _run(model, hardware, experts, batch, threshold=0)
    scored = _run(model, hardware, experts, batch, threshold=1 << 30)
    assert compiled["evictions"] > 50  # the victim choice was exercised
    assert compiled == scored
