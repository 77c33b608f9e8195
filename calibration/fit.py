"""Fitting cost models to measurements by (relative) least squares.

Each fit returns the model and its error (mean absolute percentage error over the
points it was fitted to), so a calibrated profile reports how well each fit holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from specs.errors import InputError
from specs.hardware import LinearCost


@dataclass(frozen=True)
class Fit:
    """A fitted cost with its mean absolute percentage error on the fitted points."""

    cost: LinearCost
    mape: float


@dataclass(frozen=True)
class LinkFit:
    """Transfer time = latency_s + bytes / bandwidth_Bps, fitted to (bytes, seconds)."""

    latency_s: float
    bandwidth_Bps: float
    mape: float


def _mape(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - y) / np.maximum(np.abs(y), 1e-12)))


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Relative least squares (minimises the RMS of (pred - y) / y) with coefficients >= 0.

    Timing noise is proportional to the time, so relative residuals are the right loss;
    costs cannot be negative, so negative columns are dropped and the rest refitted
    (an active-set loop, exact enough for <= 3 columns).
    """
    if (y <= 0).any():
        raise InputError("measurements must be positive times")
    a, y = a / y[:, None], np.ones_like(y)
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(a[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def _check(points: int, needed: int, what: str) -> None:
    if points < needed:
        raise InputError(f"fitting {what} needs at least {needed} measurements, got {points}")


def fit_linear(tokens: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Fit time = fixed_s + per_token_s * tokens."""
    x, y = np.asarray(tokens, float), np.asarray(seconds, float)
    _check(len(x), 2, "a linear cost")
    a = np.stack([np.ones_like(x), x], axis=1)
    c = _nonneg_lstsq(a, y)
    return Fit(LinearCost(fixed_s=float(c[0]), per_token_s=float(c[1])), _mape(a @ c, y))


def fit_dense(tokens: Sequence[float], context: Sequence[float], seconds: Sequence[float]) -> Fit:
    """Fit time = fixed_s + per_token_s * tokens + per_token_context_s * tokens * context."""
    t, c, y = (np.asarray(v, float) for v in (tokens, context, seconds))
    _check(len(t), 3, "a dense-layer cost")
    a = np.stack([np.ones_like(t), t, t * c], axis=1)
    coef = _nonneg_lstsq(a, y)
    cost = LinearCost(
        fixed_s=float(coef[0]), per_token_s=float(coef[1]), per_token_context_s=float(coef[2])
    )
    return Fit(cost, _mape(a @ coef, y))


def fit_link(nbytes: Sequence[float], seconds: Sequence[float]) -> LinkFit:
    """Fit a copy's time as latency + bytes / bandwidth (a line in bytes)."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    _check(len(x), 2, "a link")
    a = np.stack([np.ones_like(x), x], axis=1)
    c = _nonneg_lstsq(a, y)
    if c[1] <= 0:
        raise InputError("link fit found no bandwidth: transfer time does not grow with size")
    return LinkFit(latency_s=float(c[0]), bandwidth_Bps=float(1.0 / c[1]), mape=_mape(a @ c, y))
