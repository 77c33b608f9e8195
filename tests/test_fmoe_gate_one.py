"""fMoE's one-call gate paths (issue 21, speed only) against the step-by-step Python
they replace, end to end on random routings: a simulated run with the switches below on
and one with them off give the same results to the bit, and the one-call paths ran.

- policies.fmoe_admit_one._ONE: a one-row admission pass on one device in one kernel
  call (policies.fmoe_gate_jit.admit_one: merge, calibration notes, chance table,
  victims, ranking and judging);
- policies.fmoe_lookahead._GATE_KERNEL: a one-row gate's lookahead measurement, picks
  and measured orders in one kernel call (policies.fmoe_look_jit.look_gate_row);
- policies.fmoe_gate_row._ROW: a planned one-row gate's observation, transitions and
  lookahead in one kernel call (policies.fmoe_row_jit.gate_row).
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies.fmoe_admit_one as one_mod
import policies.fmoe_gate_row as row_mod
import policies.fmoe_lookahead as look_mod
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from tests.sim_compare import outcome
from traces.synth import SynthConfig, generate

SWITCHES = ((one_mod, "_ONE"), (look_mod, "_GATE_KERNEL"), (row_mod, "_ROW"))
# options that change what the fused paths compute or whether they apply
OPTIONS = [
    {},
    {"victim": "priced"},
    {"victim": "ignored", "blocking": "ignored"},
    {"candidate_chance": "table", "map_value": "whole"},
    {"forecast": "mean", "saving": "finish"},
    {"lookahead": "true"},
    {"transitions": False},  # the one-call gate row does not apply: the lookahead's call does
]


def _run(
    model: str, hardware: str, experts: int, seed: int, fast: bool, opts: dict
) -> tuple[str, dict]:
    """(outcome, how often each one-call path ran) of a 3-request run."""
    spec = load_model(model)
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=0.0, seed=seed))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="fmoe",
        cache_experts=experts,
        policy_options=opts,
        offline=True,
        train_fraction=0.34,
    )
    old = [getattr(mod, name) for mod, name in SWITCHES]
    calls = {"one": 0, "look": 0, "row": 0}
    one0, look0 = one_mod.FmoeAdmitOne._admit_one, look_mod.FmoeLookahead._lookahead_gate_row
    row0 = row_mod.FmoeGateRow._gate_row

    def one(self: Any, *a: Any) -> Any:
        r = one0(self, *a)
        calls["one"] += r is not None
        return r

    def look(self: Any, *a: Any) -> bool:
        r = look0(self, *a)
        calls["look"] += r
        return r

    def row(self: Any, *a: Any) -> bool:
        r = row0(self, *a)
        calls["row"] += r
        return r

    for mod, name in SWITCHES:
        setattr(mod, name, fast)
    one_mod.FmoeAdmitOne._admit_one = one  # type: ignore[method-assign]
    look_mod.FmoeLookahead._lookahead_gate_row = look  # type: ignore[method-assign]
    row_mod.FmoeGateRow._gate_row = row  # type: ignore[method-assign]
    try:
        res = simulate(w, cfg)
    finally:
        for (mod, name), value in zip(SWITCHES, old, strict=True):
            setattr(mod, name, value)
        one_mod.FmoeAdmitOne._admit_one = one0  # type: ignore[method-assign]
        look_mod.FmoeLookahead._lookahead_gate_row = look0  # type: ignore[method-assign]
        row_mod.FmoeGateRow._gate_row = row0  # type: ignore[method-assign]
    return outcome(res), calls


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    opts=st.sampled_from(OPTIONS),
    setup=st.sampled_from(
        [
            ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 300),
            ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 120),
            ("mixtral-8x7b", "a100-80gb-pcie4", 40),
        ]
    ),
)
def test_one_call_gate_paths_give_the_python_results(seed: int, opts: dict, setup: tuple) -> None:
    """Same outcome with the one-call paths as without, and (on one GPU, deadline
    admission) the one-call admission ran; the one-call lookahead ran where it applies
    (``lookahead="auto"``, the default)."""
    model, hardware, experts = setup
    fast, calls = _run(model, hardware, experts, seed, True, opts)
    slow, off = _run(model, hardware, experts, seed, False, opts)
    assert fast == slow
    assert off == {"one": 0, "look": 0, "row": 0}
    assert calls["one"] > 0
    if opts.get("lookahead", "auto") == "auto":
        assert calls["row" if opts.get("transitions", True) else "look"] > 0


def test_several_gpus_take_the_one_call_admission_too() -> None:
    """On several GPUs (each device's victims listed in the call) the one-call pass
    gives the step-by-step results too."""
    fast, calls = _run("mixtral-8x7b", "paper-6x3090", 60, 7, True, {})
    slow, _ = _run("mixtral-8x7b", "paper-6x3090", 60, 7, False, {})
    assert fast == slow
    assert calls["one"] > 0 and calls["row"] > 0
