"""Fits recover known parameters from synthetic measurements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from calibration.fit import fit_dense, fit_linear, fit_link
from specs.errors import InputError


@given(
    fixed=st.floats(1e-6, 1e-2),
    per=st.floats(1e-7, 1e-3),
    noise=st.floats(0, 0.02),
    seed=st.integers(0, 99),
)
def test_linear_fit_recovers_parameters(fixed: float, per: float, noise: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.array([1, 2, 4, 8, 16, 32, 64, 128], float)
    y = (fixed + per * x) * (1 + noise * rng.uniform(-1, 1, size=x.size))
    fit = fit_linear(x, y)
    # relative least squares: the fit's error cannot exceed the true model's (<= noise)
    assert fit.cost.per_token_s == pytest.approx(
        per, rel=4 * noise + 1e-6, abs=fixed * 4 * noise + 1e-12
    )
    assert fit.mape <= noise + 1e-9


def test_dense_fit_recovers_three_terms() -> None:
    t = np.array([1, 1, 1, 8, 8, 32, 32, 64], float)
    c = np.array([16, 256, 1024, 16, 512, 64, 1024, 128], float)
    y = 2e-4 + 3e-6 * t + 5e-9 * t * c
    fit = fit_dense(t, c, y)
    assert fit.cost.fixed_s == pytest.approx(2e-4)
    assert fit.cost.per_token_s == pytest.approx(3e-6)
    assert fit.cost.per_token_context_s == pytest.approx(5e-9)
    assert fit.mape < 1e-9


def test_link_fit_recovers_latency_and_bandwidth() -> None:
    sizes = np.array([1e5, 1e6, 4e6, 16e6, 64e6])
    times = 50e-6 + sizes / 2e9
    fit = fit_link(sizes, times)
    assert fit.latency_s == pytest.approx(50e-6, rel=1e-6)
    assert fit.bandwidth_Bps == pytest.approx(2e9, rel=1e-6)


def test_negative_coefficients_are_clipped() -> None:
    # data that would give a negative intercept: fixed must clip to 0, slope refit
    x = np.array([1.0, 2.0, 3.0])
    y = np.array([0.5, 2.0, 3.5])
    fit = fit_linear(x, y)
    assert fit.cost.fixed_s == 0.0 and fit.cost.per_token_s > 0


def test_too_few_points_is_input_error() -> None:
    with pytest.raises(InputError, match="at least 2"):
        fit_linear([1], [1.0])
