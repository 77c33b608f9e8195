"""Run metrics and per-request records, with names shared with the real executor.

Per request: TTFT = first token time - arrival; TPOT = (last token - first token) /
(output_len - 1), undefined (NaN, left out of means and percentiles) when output_len is
1; e2e = last token - arrival. Rates are 0..1, times seconds, sizes bytes; a metric with
no defined value (prefetch accuracy without prefetches) is None.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from policies.cache import CacheCounters, ExpertCache
from sim.iteration import RequestState

# Keys that depend on the wall clock, not on the inputs (left out when comparing runs).
WALL_CLOCK_KEYS = ("wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s")
REQUEST_COLUMNS = [
    "id",
    "arrival_s",
    "start_s",
    "prompt_len",
    "output_len",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "hits",
    "demands",
]


def request_frame(states: list[RequestState]) -> pd.DataFrame:
    """One row per request (in workload order) with its latencies and expert hits."""
    rows = []
    for s in states:
        out = s.req.output_len
        tpot = (s.last_token_s - s.first_token_s) / (out - 1) if out > 1 else math.nan
        rows.append(
            (
                s.req.request_id,
                s.arrival_s,
                s.start_s,
                s.req.prompt_len,
                out,
                s.first_token_s - s.arrival_s,
                tpot,
                s.last_token_s - s.arrival_s,
                s.hits,
                s.demands,
            )
        )
    return pd.DataFrame.from_records(rows, columns=REQUEST_COLUMNS)


def _stat(x: pd.Series, how: str) -> float | None:
    v = x.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return None
    return float(v.mean()) if how == "mean" else float(np.percentile(v, 99))


def latency_metrics(frame: pd.DataFrame) -> dict[str, float | None]:
    """Mean and p99 of TTFT, TPOT and e2e over the requests (NaN TPOTs left out)."""
    out: dict[str, float | None] = {}
    for col in ("ttft", "tpot", "e2e"):
        out[f"{col}_mean_s"] = _stat(frame[f"{col}_s"], "mean")
        out[f"{col}_p99_s"] = _stat(frame[f"{col}_s"], "p99")
    return out


def cache_metrics(caches: list[ExpertCache], shared_demands: int = 0) -> dict[str, Any]:
    """Totals of the per-GPU cache counters, hit rates and prefetch figures.

    ``hit_rate`` counts the ``shared_demands`` (uses of shared experts, always resident)
    as hits, as the fMoE paper does; ``hit_rate_routed`` is the routed experts' alone.
    ``prefetch_accuracy`` = prefetches resident at their first demand / prefetches
    started (a copy still in flight when demanded is ``prefetch_late``, not accurate);
    ``prefetch_wasted`` = prefetches evicted or cancelled before any demand.
    """
    total = CacheCounters()
    for c in caches:
        total = total.add(c.counters)
    t = total.as_dict()
    demands = t["demands"] + shared_demands
    issued = t["prefetches_issued"]
    return {
        "hit_rate": (t["hits"] + shared_demands) / demands if demands else None,
        "hit_rate_routed": t["hits"] / t["demands"] if t["demands"] else None,
        "prefetch_accuracy": t["prefetches_timely"] / issued if issued else None,
        "prefetch_timely": t["prefetches_timely"],
        "prefetch_late": t["prefetches_late"],
        "prefetch_wasted": t["prefetches_wasted"] + t["prefetches_cancelled"],
        "shared_demands": shared_demands,
        "bytes_h2d": t["bytes_loaded"],
        **{k: v for k, v in t.items() if k != "bytes_loaded"},
        "cache_experts": [c.capacity for c in caches],
        "expert_memory_bytes": sum(c.capacity * c.expert_bytes for c in caches),
    }
