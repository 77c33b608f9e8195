"""Metrics of a real run, under the simulator's names (so one table holds both).

Latency: TTFT is the prefill forward of the request's batch (waits for expert loads
included; measured from the batch's start, as the simulator's closed loop measures it),
TPOT a request's mean decode step (the batch's steps while the request was in it), e2e
their sum; ``*_mean_s`` average over requests and ``*_p99_s`` is the
99th percentile over requests. Cache figures sum over devices. ``tokens_sha256`` hashes
the generated token ids so runs can be compared for exactness at a glance. Per-device
figures (``cache_experts``, ``link_busy_s``) are lists, as in the simulator; ``emulated``
(the simulator's name) and ``emulated_link`` both say whether the host link was emulated.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from policies.cache import CacheCounters
from realrun.generate import Generation


def tokens_sha256(gens: Sequence[Generation]) -> str:
    """sha256 of the generated ids: one line per request, ids comma-separated."""
    text = "\n".join(",".join(str(t) for t in g.output_ids) for g in gens)
    return hashlib.sha256(text.encode()).hexdigest()


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.mean(xs)) if xs else math.nan


def _p99(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(np.percentile(xs, 99)) if xs else math.nan


def summarise(
    gens: Sequence[Generation],
    counters: CacheCounters,
    *,
    stall_s: float,
    layer_steps: int,
    wall_s: float,
    link_busy_s: list[float],
    link: dict[str, Any],
    batch_size: int = 1,
    iterations: int | None = None,
) -> dict[str, Any]:
    """The run's metrics dict (times in seconds, sizes in bytes, rates 0..1).

    ``batch_size`` is the largest static batch run; ``iterations`` the forward passes
    (default: one per generated token, which is exact at batch size 1)."""
    c = counters
    ttft = [g.ttft_s for g in gens]
    tpot = [g.tpot_s for g in gens]
    e2e = [g.e2e_s for g in gens]
    return {
        "emulated": bool(link.get("emulated_link")),
        # routed experts only: the real executor does not count shared-expert uses
        "hit_rate": c.hits / c.demands if c.demands else math.nan,
        "hit_rate_routed": c.hits / c.demands if c.demands else math.nan,
        "ttft_mean_s": _mean(ttft),
        "ttft_p99_s": _p99(ttft),
        "tpot_mean_s": _mean(tpot),
        "tpot_p99_s": _p99(tpot),
        "e2e_mean_s": _mean(e2e),
        "e2e_p99_s": _p99(e2e),
        "bytes_h2d": c.bytes_loaded,
        # resident at first demand / started: a copy still in flight when demanded is late
        "prefetch_accuracy": c.prefetches_timely / c.prefetches_issued
        if c.prefetches_issued
        else math.nan,
        "prefetch_timely": c.prefetches_timely,
        "prefetch_late": c.prefetches_late,
        "prefetch_wasted": c.prefetches_wasted + c.prefetches_cancelled,
        "stall_s": stall_s,
        "layer_steps": layer_steps,
        "wall_s": wall_s,
        "link_busy_s": link_busy_s,
        "requests": len(gens),
        "batch_size": batch_size,
        # forward passes: a batch's rows share them (None: one request at a time)
        "iterations": iterations
        if iterations is not None
        else sum(len(g.output_ids) for g in gens),
        "tokens_generated": sum(len(g.output_ids) for g in gens),
        "tokens_sha256": tokens_sha256(gens),
        **{k: v for k, v in c.as_dict().items() if k != "bytes_loaded"},
        **link,
    }
