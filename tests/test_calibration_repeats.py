"""Folding a validation cell's repeated real runs into one (calibration.repeats)."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calibration.repeats import RealRun, median_run, spread

_lat = st.floats(min_value=1e-4, max_value=10.0, allow_nan=False)


def _run(tpot: float, ttfts: list[float], sha: str = "abc") -> RealRun:
    reqs = [
        {"id": f"r{i}", "ttft": t, "tpot": tpot, "e2e": t + 3 * tpot, "output_len": 4}
        for i, t in enumerate(ttfts)
    ]
    metrics = {"tpot_mean_s": tpot, "hit_rate": 0.5, "loads": 3, "tokens_sha256": sha}
    return RealRun(metrics, reqs)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_lat, st.lists(_lat, min_size=2, max_size=2)), min_size=1, max_size=5))
def test_every_figure_is_the_median_over_the_runs(cells):
    runs = [_run(tpot, ttfts) for tpot, ttfts in cells]
    out = median_run(runs)
    assert out.metrics["tpot_mean_s"] == pytest.approx(statistics.median(c[0] for c in cells))
    assert out.metrics["tokens_sha256"] == "abc" and out.metrics["loads"] == 3
    for i, q in enumerate(out.requests):
        assert q["id"] == f"r{i}" and q["output_len"] == 4
        assert q["ttft"] == pytest.approx(statistics.median(c[1][i] for c in cells))
    # the spread is 0 only when the runs agree, and never negative
    s = spread(runs, "tpot_mean_s")
    if len(runs) == 1:
        assert s is None and out is runs[0]
    else:
        tp = [c[0] for c in cells]
        assert s == pytest.approx((max(tp) - min(tp)) / statistics.median(tp))
        assert s >= 0


def test_a_one_token_output_keeps_no_tpot_and_requests_match_by_id():
    a = RealRun(
        {"tpot_mean_s": None},
        [
            {"id": "x", "ttft": 1.0, "tpot": math.nan, "e2e": 1.0},
            {"id": "y", "ttft": 2.0, "tpot": 0.1, "e2e": 2.3},
        ],
    )
    b = RealRun(
        {"tpot_mean_s": None},
        [
            {"id": "y", "ttft": 4.0, "tpot": 0.3, "e2e": 4.9},
            {"id": "x", "ttft": 3.0, "tpot": math.nan, "e2e": 3.0},
        ],
    )
    out = median_run([a, b])
    x, y = out.requests
    assert x["id"] == "x" and x["ttft"] == 2.0 and math.isnan(x["tpot"])
    assert y["id"] == "y" and y["ttft"] == 3.0 and y["tpot"] == pytest.approx(0.2)
    assert out.metrics["tpot_mean_s"] is None and spread([a, b], "tpot_mean_s") is None
    with pytest.raises(ValueError):
        median_run([])
