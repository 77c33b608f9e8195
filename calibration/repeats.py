"""Repeated real runs of one validation cell, folded into one: medians and spread.

A real run on a shared machine varies from run to run (on the 2-core development VM a
cell's mean TPOT moved by 10-18% between two runs of the same command), so one run per
cell mixes that noise into the simulator's error. With repeats, each figure is the median
over the cell's runs (latencies per request, so per-request errors stay per request), and
the spread of the runs is reported beside the error: an error within the spread is not
evidence of a model gap.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LATENCY_KEYS = ("ttft", "tpot", "e2e")
SPREAD_METRICS = ("ttft_mean_s", "tpot_mean_s")


@dataclass(frozen=True)
class RealRun:
    """One real run of a cell: its metrics (``RunSession.metrics``) and per-request rows
    (``id``, ``ttft``, ``tpot``, ``e2e``, ``output_len``)."""

    metrics: dict[str, Any]
    requests: list[dict[str, Any]]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _median(values: Sequence[Any]) -> Any:
    """Median of the finite numbers among ``values``; NaN when there are none (a TPOT of
    a one-token output), None when every value is None."""
    nums = [float(v) for v in values if _is_number(v) and math.isfinite(float(v))]
    if nums:
        return float(statistics.median(nums))
    return None if all(v is None for v in values) else math.nan


def median_run(runs: Sequence[RealRun]) -> RealRun:
    """One run from ``runs`` (>= 1, the same requests in each): every numeric metric the
    median over the runs, every other metric the first run's (identical by construction
    for what a validation reads, e.g. ``tokens_sha256``: every run computes the same
    tokens); each request's latencies the medians of its own. One run is returned as is."""
    if not runs:
        raise ValueError("median_run needs at least one run")
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    metrics = {
        k: _median([r.metrics.get(k) for r in runs]) if _is_number(v) else v
        for k, v in first.metrics.items()
    }
    by_id = [{q["id"]: q for q in r.requests} for r in runs]
    requests = []
    for q in first.requests:
        rows = [m[q["id"]] for m in by_id]
        requests.append({**q, **{k: _median([row[k] for row in rows]) for k in LATENCY_KEYS}})
    return RealRun(metrics, requests)


def spread(runs: Sequence[RealRun], metric: str) -> float | None:
    """(max - min) / median of ``metric`` over the runs; None for one run or no value."""
    vals = [float(r.metrics[metric]) for r in runs if _is_number(r.metrics.get(metric))]
    vals = [v for v in vals if math.isfinite(v)]
    if len(vals) < 2:
        return None
    mid = statistics.median(vals)
    return (max(vals) - min(vals)) / mid if mid > 0 else None
