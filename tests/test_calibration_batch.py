"""The batched decode diagnostic (calibration.bench_batch): predicted steps and the
per-row residual of a B-row decode step against a profile."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pytest import approx

from calibration.bench_batch import BatchRound, DecodeStep, batch_residuals, predicted_step_s
from specs.hardware import HardwareProfile
from tests.strategies import small_spec
from tests.test_sim_kit import exact_profile

SPEC = small_spec(layers=3, experts=4, top_k=2)


def _with(hw: HardwareProfile, **compute: object) -> HardwareProfile:
    return hw.model_copy(update={"compute": hw.compute.model_copy(update=compute)})


def _step(hw: HardwareProfile, rows: int, counts, extra: float) -> DecodeStep:
    s = DecodeStep(rows, 40.0, 0.0, counts)
    return DecodeStep(rows, 40.0, predicted_step_s(hw, SPEC, "lru", s) + extra, counts)


@settings(max_examples=40, deadline=None)
@given(
    x=st.floats(1e-5, 5e-3),
    bias=st.floats(-1e-3, 1e-3),
    rows=st.integers(2, 8),
    jitter=st.lists(st.floats(-1e-2, 1e-2), min_size=4, max_size=6),
)
def test_batch_residuals_recovers_the_per_row_residual(
    x: float, bias: float, rows: int, jitter: list[float]
) -> None:
    """Steps timed as the fits predict plus a bias shared by both sides of a round, plus
    x x (rows - 1) x MoE layers on the batched side (with a small relative spread across
    rounds): the fit returns ~x; the shared bias (already in the 1-row terms) cancels."""
    hw = _with(exact_profile(), layer_overhead_s=1e-4)
    L = SPEC.num_moe_layers
    one = ((1, 1),) * L
    many = ((2, 1, 1),) * L
    rounds = []
    for j in jitter:
        per_row = x * (1 + j)
        rounds.append(
            BatchRound(
                [_step(hw, 1, one, bias)] * 3,
                [_step(hw, rows, many, bias + per_row * (rows - 1) * L)] * 3,
            )
        )
    got, per_round = batch_residuals(hw, SPEC, "lru", rounds)
    assert len(per_round) == len(jitter)
    assert got == approx(x, rel=0.02)


def test_batch_residuals_is_zero_when_negative_noisy_or_unmeasured() -> None:
    hw = exact_profile()
    L = SPEC.num_moe_layers
    one, many = ((1, 1),) * L, ((1, 1, 1, 1),) * L

    def rounds(extras: list[float]) -> list[BatchRound]:
        return [BatchRound([_step(hw, 1, one, 0.0)], [_step(hw, 4, many, e)]) for e in extras]

    assert batch_residuals(hw, SPEC, "lru", rounds([-1e-3] * 4))[0] == 0.0
    noisy = [1e-3, -2e-3, 4e-3, -1e-3, 1.5e-3]  # median > 0, well within the spread
    assert batch_residuals(hw, SPEC, "lru", rounds(noisy))[0] == 0.0
    assert batch_residuals(hw, SPEC, "lru", [])[0] == 0.0
    steady = [3.0e-3, 3.1e-3, 2.9e-3, 3.0e-3]
    got = batch_residuals(hw, SPEC, "lru", rounds(steady))[0]
    assert got == approx(3.0e-3 / (3 * L))


def test_predicted_step_is_what_the_simulator_adds_up() -> None:
    """Every expert resident, a static batch of 3 identical requests: each simulated
    decode step takes predicted_step_s of its rows, routing and KV length (P + k for
    decode step k), so the simulated TPOT is their mean."""
    from sim.run import simulate
    from tests.test_sim_kit import config, routed_workload

    spec = small_spec(layers=2, experts=4, top_k=2)
    hw = _with(
        exact_profile(dense_per_token_s=1e-4, dense_per_token_context_s=1e-6),
        layer_overhead_s=2e-4,
    )
    P, rows = 2, 3
    req = {"routes": [[[0, 1], [2, 3]]] * 4, "prompt_len": P}  # 3 output tokens
    w = routed_workload(spec, [dict(req) for _ in range(rows)])
    kw = {"cache_experts": spec.total_experts, "warm_start": True, "policy": "lru"}
    kw |= {"batch_size": rows, "batching": "static"}
    tpot = simulate(w, config(spec, hw, **kw)).requests.tpot_s
    counts = ((3, 3), (3, 3))  # per layer: both experts get every row
    steps = [DecodeStep(rows, float(P + k), 0.0, counts) for k in (1, 2)]
    want = sum(predicted_step_s(hw, spec, "lru", s) for s in steps) / 2
    assert list(tpot) == approx([want] * rows)
