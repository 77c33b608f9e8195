"""fMoE's one-row admission kernel (policies.fmoe_admit_jit, called by
FmoeDeadline._admit from _KERNEL_MIN candidates), one-row lookahead measurement kernel
(policies.fmoe_look_jit) and _order's bulk protection, against the code they replace,
end to end: a simulated run that always takes the fast paths and one that never does
give the same results to the bit. The one-call paths that now run instead of these
(policies.fmoe_admit_one._ONE, policies.fmoe_lookahead._GATE_KERNEL) are off in both runs:
tests/test_fmoe_gate_one.py holds them equal to the paths tested here."""

from __future__ import annotations

import pytest

import policies.fmoe_admit_one as one_mod
import policies.fmoe_deadline as deadline_mod
import policies.fmoe_lookahead as lookahead_mod
import policies.fmoe_orders as orders_mod
from policies.fmoe_deadline import FmoeDeadline
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from traces.synth import SynthConfig, generate

WALL = {"wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s"}


def _run(model: str, hardware: str, experts: int, fast: bool, opts: dict) -> tuple[dict, int]:
    """The run's metrics (wall times aside) and how many gates the kernel judged."""
    spec = load_model(model)
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=0.0, seed=5))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="fmoe",
        cache_experts=experts,
        policy_options=opts,
    )
    calls = [0]
    inner = FmoeDeadline._admit_kernel

    def counted(self, *a):  # noqa: ANN001, ANN202
        done = inner(self, *a)
        calls[0] += done
        return done

    old = deadline_mod._KERNEL_MIN, orders_mod._BULK, lookahead_mod._KERNEL
    old_one = one_mod._ONE, lookahead_mod._GATE_KERNEL
    deadline_mod._KERNEL_MIN, orders_mod._BULK, lookahead_mod._KERNEL = (
        (1, 0, True) if fast else (1 << 30, 1 << 30, False)
    )
    one_mod._ONE = lookahead_mod._GATE_KERNEL = False
    FmoeDeadline._admit_kernel = counted
    try:
        m = simulate(w, cfg).metrics
    finally:
        deadline_mod._KERNEL_MIN, orders_mod._BULK, lookahead_mod._KERNEL = old
        one_mod._ONE, lookahead_mod._GATE_KERNEL = old_one
        FmoeDeadline._admit_kernel = inner
    return {k: v for k, v in m.items() if k not in WALL}, calls[0]


# with and without the victim's price, under either ranking (the defaults: priced, chance)
OPTS = ({"victim": "ignored", "rank": "chance"}, {"victim": "ignored", "rank": "p"}, {"rank": "p"})


@pytest.mark.parametrize(
    ("model", "hardware", "experts", "opts"),
    [
        ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 400, OPTS[0]),
        ("qwen1.5-moe-a2.7b", "paper-6x3090", 300, OPTS[1]),
        ("mixtral-8x7b", "paper-6x3090", 60, {}),
        ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 400, {}),
        ("qwen1.5-moe-a2.7b", "paper-6x3090", 300, OPTS[2]),
    ],
)
def test_fast_paths_give_the_loops_results(
    model: str, hardware: str, experts: int, opts: dict
) -> None:
    fast, calls = _run(model, hardware, experts, True, opts)
    slow, none = _run(model, hardware, experts, False, opts)
    assert none == 0
    assert calls > 100
    meta = fast["policy_metadata"]
    # every branch of the judgement was taken
    assert meta["lookahead_picks_scored"] > 100 and meta["map_topk_precision"] is not None
    for branch in ("rejected_late", "queued_none_done", "admitted_late", "reranked"):
        assert meta[f"orders_{branch}"] > 0, branch
    assert fast == slow
