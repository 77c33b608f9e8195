"""Piecewise-linear cost fits: time as a function of tokens with knots, by least squares.

A CPU matrix product costs about the same at 2 and at 16 rows (one blocked GEMM) but far
less at 1 row (a matrix-vector product), so the expert and dense costs are fitted as a
piecewise-linear function of the token count (hat basis on the knots, extrapolated
beyond the last knot with the last segment's slope), plus for the dense cost a
``tokens * context`` attention term. The loss is relative (noise is proportional to the
time) and the knot values are nonnegative (see :mod:`calibration.fit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibration.fit import Fit, _mape, _nonneg_lstsq
from specs.errors import InputError
from specs.hardware import LinearCost


def hat_basis(x: np.ndarray, knots: Sequence[float]) -> np.ndarray:
    """[len(x), len(knots)] weights such that ``basis @ values`` interpolates knot values.

    Below the first knot the first value holds; beyond the last the last segment is
    extended (its basis weights there are 1 + s and -s, s = distance in segment widths).
    """
    k = np.asarray(knots, float)
    a = np.zeros((x.size, k.size))
    for i, xi in enumerate(x):
        if k.size == 1 or xi <= k[0]:
            a[i, 0] = 1.0
        elif xi >= k[-1]:
            s = (xi - k[-1]) / (k[-1] - k[-2])
            a[i, -1], a[i, -2] = 1.0 + s, -s
        else:
            j = int(np.searchsorted(k, xi, side="right"))
            w = (xi - k[j - 1]) / (k[j] - k[j - 1])
            a[i, j - 1], a[i, j] = 1.0 - w, w
    return a


def choose_knots(tokens: Sequence[float], max_knots: int = 8) -> list[float]:
    """Up to ``max_knots`` knots among the measured token counts, spread on a log scale
    (always the smallest and the largest)."""
    xs = np.unique(np.asarray(tokens, float))
    if xs.size <= max_knots:
        return xs.tolist()
    idx = np.unique(np.round(np.geomspace(1, xs.size, max_knots)).astype(int) - 1)
    return xs[idx].tolist()


def _cost(knots: Sequence[float], values: np.ndarray, context_coef: float = 0.0) -> LinearCost:
    k = list(knots)
    slope = 0.0
    if len(k) >= 2:
        slope = max(0.0, float((values[-1] - values[-2]) / (k[-1] - k[-2])))
    return LinearCost(
        fixed_s=float(values[0]),
        per_token_s=slope,
        per_token_context_s=float(context_coef),
        knots=[(float(x), float(v)) for x, v in zip(k, values, strict=True)],
    )


def fit_piecewise(
    tokens: Sequence[float], seconds: Sequence[float], knots: Sequence[float] | None = None
) -> Fit:
    """Fit time = piecewise-linear(tokens) with the given knots (default: chosen from data)."""
    x, y = np.asarray(tokens, float), np.asarray(seconds, float)
    knots = list(knots) if knots is not None else choose_knots(x)
    if len(x) < len(knots):
        raise InputError(
            f"a piecewise fit with {len(knots)} knots needs at least {len(knots)} measurements"
        )
    a = hat_basis(x, knots)
    c = _nonneg_lstsq(a, y)
    cost = _cost(knots, c)
    return Fit(cost, _mape(np.array([cost(v) for v in x]), y))


def fit_piecewise_dense(
    tokens: Sequence[float],
    context: Sequence[float],
    seconds: Sequence[float],
    knots: Sequence[float] | None = None,
) -> Fit:
    """Fit time = piecewise-linear(tokens) + per_token_context_s * tokens * context."""
    t, c, y = (np.asarray(v, float) for v in (tokens, context, seconds))
    knots = list(knots) if knots is not None else choose_knots(t)
    if len(t) < len(knots) + 1:
        raise InputError(
            f"a dense fit with {len(knots)} knots needs at least {len(knots) + 1} measurements"
        )
    a = np.concatenate([hat_basis(t, knots), (t * c)[:, None]], axis=1)
    coef = _nonneg_lstsq(a, y)
    cost = _cost(knots, coef[:-1], coef[-1])
    pred = np.array([cost(ti, ci) for ti, ci in zip(t, c, strict=True)])
    return Fit(cost, _mape(pred, y))


def isotonic(y: Sequence[float]) -> np.ndarray:
    """The nondecreasing sequence closest to ``y`` in least squares (pool adjacent
    violators). Compute cannot get cheaper with more tokens or context, so a dip in
    measured times is noise; smoothing it before a fit keeps one noisy point from
    bending a segment."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in np.asarray(y, float):
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])
