"""Piecewise-linear costs: the LinearCost knots contract and fits that recover them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from calibration.piecewise import (
    choose_knots,
    fit_piecewise,
    fit_piecewise_dense,
    hat_basis,
    isotonic,
)
from specs.errors import InputError
from specs.hardware import LinearCost

TOKENS = np.array([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128], float)


def test_knots_interpolate_clamp_below_and_extend_beyond() -> None:
    c = LinearCost(fixed_s=9.0, per_token_s=0.5, knots=[(1, 1.0), (3, 5.0), (5, 6.0)])
    assert c(1) == 1.0
    assert c(2) == 3.0  # halfway between 1 and 5
    assert c(4) == 5.5
    assert c(0.5) == 1.0  # below the first knot: its value (fixed_s unused)
    assert c(9) == 6.0 + 0.5 * 4  # beyond: last value + per_token_s per token


def test_context_term_adds_to_knots() -> None:
    c = LinearCost(fixed_s=0, per_token_s=0, per_token_context_s=0.25, knots=[(1, 1.0), (3, 3.0)])
    assert c(2, context=8) == 2.0 + 0.25 * 2 * 8


def test_without_knots_the_cost_stays_linear() -> None:
    c = LinearCost(fixed_s=1e-3, per_token_s=2e-4, per_token_context_s=1e-6)
    assert c(10, 100) == pytest.approx(1e-3 + 2e-3 + 1e-3)


@pytest.mark.parametrize("knots", [[(2, 1.0), (1, 2.0)], [(1, 1.0), (1, 2.0)], [(1, -1.0)]])
def test_bad_knots_are_rejected(knots: list[tuple[float, float]]) -> None:
    with pytest.raises(ValidationError):
        LinearCost(fixed_s=0, per_token_s=0, knots=knots)


def test_hat_basis_rows_sum_to_one_inside_and_extrapolate_outside() -> None:
    a = hat_basis(np.array([1.0, 2.5, 4.0, 6.0]), [1, 2, 4])
    assert np.allclose(a[:3].sum(axis=1), 1.0)
    assert np.allclose(a[1], [0, 0.75, 0.25])
    assert np.allclose(a[3], [0, -1.0, 2.0])  # one segment width past the last knot


def test_choose_knots_keeps_the_ends_and_at_most_the_cap() -> None:
    k = choose_knots(TOKENS, max_knots=6)
    assert k[0] == 1 and k[-1] == 128 and len(k) <= 6
    assert choose_knots([1, 2, 2, 3]) == [1, 2, 3]


@settings(max_examples=20, deadline=None)
@given(
    v1=st.floats(1e-4, 1e-2),
    jump=st.floats(1.0, 4.0),
    slope=st.floats(1e-6, 1e-3),
    noise=st.floats(0, 0.02),
    seed=st.integers(0, 99),
)
def test_fit_recovers_a_gemv_then_gemm_cost(
    v1: float, jump: float, slope: float, noise: float, seed: int
) -> None:
    """A cost with a jump from 1 to 2 tokens (GEMV -> GEMM) and a line after: with knots
    at the jump, the fit reproduces every point within the noise."""
    rng = np.random.default_rng(seed)
    true = np.where(TOKENS < 2, v1, v1 * jump + slope * (TOKENS - 2))
    y = true * (1 + noise * rng.uniform(-1, 1, TOKENS.size))
    fit = fit_piecewise(TOKENS, y, knots=[1, 2, 128])
    assert fit.mape <= noise + 1e-9  # relative least squares: no worse than the truth
    pred = np.array([fit.cost(t) for t in TOKENS])
    assert np.max(np.abs(pred - true) / true) <= 4 * noise + 1e-9
    if noise == 0:
        assert fit.cost.per_token_s == pytest.approx(slope, rel=1e-6)


def test_dense_fit_recovers_the_context_term() -> None:
    t = np.array([1, 2, 4, 8, 16, 32, 1, 1, 1, 1], float)
    ctx = np.concatenate([(t[:6] + 1) / 2, [16, 64, 128, 256]])
    base = np.interp(t, [1, 2, 32], [1e-3, 2e-3, 4e-3])
    y = base + 3e-7 * t * ctx
    fit = fit_piecewise_dense(t, ctx, y, knots=[1, 2, 32])
    assert fit.cost.per_token_context_s == pytest.approx(3e-7, rel=1e-6)
    assert fit.cost(1, 0) == pytest.approx(1e-3, rel=1e-6)
    assert fit.mape < 1e-9


def test_too_few_points_is_input_error() -> None:
    with pytest.raises(InputError, match="at least 3"):
        fit_piecewise([1, 2], [1e-3, 2e-3], knots=[1, 2, 4])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1e3), min_size=1, max_size=30))
def test_isotonic_is_nondecreasing_keeps_the_mean_and_fixes_sorted_input(y: list[float]) -> None:
    out = isotonic(y)
    assert len(out) == len(y)
    assert np.all(np.diff(out) >= -1e-9)
    assert out.sum() == pytest.approx(sum(y), rel=1e-9, abs=1e-9)
    assert np.allclose(isotonic(sorted(y)), sorted(y))


def test_isotonic_pools_a_dip() -> None:
    assert np.allclose(isotonic([1.0, 5.0, 3.0, 6.0]), [1.0, 4.0, 4.0, 6.0])
