"""The simulator's error against real runs: per-request and per-run figures, and targets.

Inputs are two frames built by :mod:`calibration.validate`:

- ``requests``: one row per (policy, cache_experts, request) with ``real_<m>_s`` and
  ``sim_<m>_s`` for m in ttft, tpot, e2e;
- ``runs``: one row per (policy, cache_experts) with ``real_<k>`` and ``sim_<k>`` for the
  run metrics (latency means, ``hit_rate``, ``stall_s``, ``bytes_h2d``).

Definitions (all errors are fractions, 0.1 = 10 %):

- ``<m>_mape``: mean over every request of every run of |sim - real| / real (the
  headline figure: per request, the strictest reading);
- ``<m>_mape_run_means``: mean over runs of |sim mean - real mean| / real mean;
- ``hit_rate_abs_error_max`` / ``_mean``: |sim - real| of each run's hit rate;
- ``stall_abs_error_s_mean``: mean |sim - real| stall seconds per run, and
  ``stall_share_abs_error_mean``: the same for stall as a share of the run's e2e total
  (stall can be near zero, where a relative error means nothing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

LATENCIES = ("ttft", "tpot", "e2e")
TARGETS: dict[str, float] = {"tpot_mape": 0.10, "ttft_mape": 0.15, "hit_rate_abs_error_max": 0.02}
"""The issue's targets (CPU, emulated link, a tiny model with tens-of-MB experts)."""


def _ape(sim: pd.Series, real: pd.Series) -> pd.Series:
    real = real.astype(float)
    ok = real.notna() & sim.notna() & (real > 0)
    return ((sim[ok].astype(float) - real[ok]).abs() / real[ok]).astype(float)


def add_errors(requests: pd.DataFrame, runs: pd.DataFrame) -> None:
    """Add per-row error columns in place (``<m>_ape``; runs: ``hit_rate_abs_error`` ...)."""
    for m in LATENCIES:
        requests[f"{m}_ape"] = _ape(requests[f"sim_{m}_s"], requests[f"real_{m}_s"])
        runs[f"{m}_mean_ape"] = _ape(runs[f"sim_{m}_mean_s"], runs[f"real_{m}_mean_s"])
    runs["hit_rate_abs_error"] = (runs["sim_hit_rate"] - runs["real_hit_rate"]).abs()
    runs["stall_abs_error_s"] = (runs["sim_stall_s"] - runs["real_stall_s"]).abs()
    real_share = runs["real_stall_s"] / runs["real_e2e_total_s"]
    sim_share = runs["sim_stall_s"] / runs["sim_e2e_total_s"]
    runs["stall_share_abs_error"] = (sim_share - real_share).abs()


def _mean(x: pd.Series) -> float | None:
    v = x.dropna().to_numpy(dtype=float)
    return float(v.mean()) if v.size else None


def summarise(requests: pd.DataFrame, runs: pd.DataFrame) -> dict[str, Any]:
    """The error figures of the module docstring, and which targets they meet."""
    out: dict[str, Any] = {"requests": int(len(requests)), "runs": int(len(runs))}
    for m in LATENCIES:
        out[f"{m}_mape"] = _mean(requests[f"{m}_ape"])
        out[f"{m}_mape_run_means"] = _mean(runs[f"{m}_mean_ape"])
        ape = requests[f"{m}_ape"].dropna()
        out[f"{m}_ape_p90"] = float(np.percentile(ape, 90)) if len(ape) else None
    out["hit_rate_abs_error_max"] = float(runs["hit_rate_abs_error"].max())
    out["hit_rate_abs_error_mean"] = float(runs["hit_rate_abs_error"].mean())
    out["stall_abs_error_s_mean"] = float(runs["stall_abs_error_s"].mean())
    out["stall_share_abs_error_mean"] = _mean(runs["stall_share_abs_error"])
    out["targets"] = {
        k: {"target": t, "value": out[k], "met": out[k] is not None and out[k] <= t}
        for k, t in TARGETS.items()
    }
    return out


def per_policy(requests: pd.DataFrame, runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The headline errors per policy (where a model gap shows first)."""
    rows = []
    for p, g in runs.groupby("policy", sort=False):
        r = requests[requests["policy"] == p]
        rows.append(
            {
                "policy": p,
                **{f"{m}_mape": _mean(r[f"{m}_ape"]) for m in LATENCIES},
                "hit_rate_abs_error_max": float(g["hit_rate_abs_error"].max()),
                "stall_abs_error_s_mean": float(g["stall_abs_error_s"].mean()),
            }
        )
    return rows
