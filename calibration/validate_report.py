"""`fmoe calibrate validate`, its report: the result type, the rows that put a cell's real
and simulated figures side by side, the drift-corrected summary, and the files written
(runs.csv, requests.csv, summary.json, sim_vs_real.png, captured.fmoe; each atomically)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from specs.jsonio import atomic_output, write_json_atomic


@dataclass
class ValidationResult:
    """Per-run and per-request frames (real and simulated side by side) and the summary."""

    runs: pd.DataFrame
    requests: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "runs": json.loads(self.runs.to_json(orient="records")),
            "files": self.files,
        }


def median_or_none(col: pd.Series) -> float | None:
    """The median of a column's non-null values; None when it has none."""
    vals = col.dropna()
    return float(vals.median()) if len(vals) else None


def request_rows(
    policy: str, cache: int, real: list[dict[str, Any]], sim: pd.DataFrame
) -> list[dict[str, Any]]:
    """One row per request: the real and simulated TTFT, TPOT and e2e side by side."""
    from calibration.sim_error import LATENCIES

    sim_by_id = sim.set_index("id")
    rows = []
    for r in real:
        s = sim_by_id.loc[r["id"]]
        rows.append(
            {
                "policy": policy,
                "cache_experts": cache,
                "request_id": r["id"],
                "prompt_len": int(s["prompt_len"]),
                "output_len": int(s["output_len"]),
                "real_output_len": r["output_len"],
                **{f"real_{m}_s": r[m] for m in LATENCIES},
                **{f"sim_{m}_s": float(s[f"{m}_s"]) for m in LATENCIES},
            }
        )
    return rows


def in_table_order(df: pd.DataFrame, policies: list[str]) -> pd.DataFrame:
    """Rows by policy (in the order given), then cache size; stable within."""
    rank = {p: i for i, p in enumerate(policies)}
    df = df.assign(_rank=df["policy"].map(rank))
    df = df.sort_values(["_rank", "cache_experts"], kind="stable")
    return df.drop(columns="_rank").reset_index(drop=True)


DRIFT_COLUMNS = ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
"""Simulated figures of each cell also reported on drift-corrected compute (``sim_<k>_drift``)."""
DRIFT_SUMMARY = ["ttft_mape", "tpot_mape", "e2e_mape", "hit_rate_abs_error_max",
                 "hit_rate_abs_error_mean"]  # fmt: skip


def drift_corrected(
    req_rows: list[dict[str, Any]], run_rows: list[dict[str, Any]], cells: int
) -> dict[str, Any] | None:
    """The headline errors of the drift-corrected simulations; None unless every cell had
    a slowdown measured (a profile without dense and head fits has none)."""
    from calibration import sim_error

    if not run_rows or len(run_rows) != cells:
        return None
    requests, runs = pd.DataFrame(req_rows), pd.DataFrame(run_rows)
    sim_error.add_errors(requests, runs)
    errors = sim_error.summarise(requests, runs)
    return {k: errors[k] for k in DRIFT_SUMMARY}


RUN_METRICS = ["ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "hit_rate", "stall_s", "bytes_h2d"]
# cache counters side by side: where a hit-rate gap comes from (late or wasted prefetches)
RUN_COUNTERS = ["demand_loads", "prefetches_issued", "prefetches_used", "prefetches_wasted",
                "prefetches_cancelled", "evictions"]  # fmt: skip


def run_row(
    policy: str, cache: int, real: dict[str, Any], sim: dict[str, Any], same_routing: bool
) -> dict[str, Any]:
    """One cell's row of runs.csv: real_<k> and sim_<k> for every run metric and counter."""
    row: dict[str, Any] = {"policy": policy, "cache_experts": cache}
    for k in RUN_METRICS + RUN_COUNTERS:
        row[f"real_{k}"] = real.get(k)
        row[f"sim_{k}"] = sim.get(k)
    n = real["requests"]
    row["real_e2e_total_s"] = (real["e2e_mean_s"] or 0.0) * n
    row["sim_e2e_total_s"] = (sim["e2e_mean_s"] or 0.0) * n
    row["routing_matches_capture"] = same_routing
    return row


def pair_line(row: dict[str, Any]) -> str:
    """The progress line of a finished cell: real/sim TTFT, TPOT, hit rate, stall."""

    def pair(k: str) -> str:
        return f"{row[f'real_{k}']:.4g}/{row[f'sim_{k}']:.4g}"

    return (
        f"{row['policy']} cache {row['cache_experts']}: real/sim ttft {pair('ttft_mean_s')} s, "
        f"tpot {pair('tpot_mean_s')} s, hit {pair('hit_rate')}, stall {pair('stall_s')} s"
    )


def write_outputs(
    result: ValidationResult, out: str | Path, workload: Any | None = None
) -> dict[str, str]:
    """runs.csv, requests.csv, summary.json, sim_vs_real.png and, given the captured
    ``workload``, captured.fmoe (to re-simulate without the model) under ``out``; every
    file is written atomically."""
    from calibration.validate_plot import plot_sim_vs_real

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "runs_csv": str(d / "runs.csv"),
        "requests_csv": str(d / "requests.csv"),
        "summary_json": str(d / "summary.json"),
        "plot_png": str(d / "sim_vs_real.png"),
    }
    _write_csv(result.runs, Path(files["runs_csv"]))
    _write_csv(result.requests, Path(files["requests_csv"]))
    write_json_atomic(files["summary_json"], result.summary)
    s = result.summary
    title = f"{s['model']} on {s['profile']}: simulated vs measured"
    plot_sim_vs_real(result.requests, result.runs, files["plot_png"], title)
    if workload is not None:
        from realrun.capture import write_workload

        files["trace"] = str(d / "captured.fmoe")
        write_workload(workload, files["trace"])
    return files


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_output(path, ".csv") as tmp:
        df.to_csv(tmp, index=False)
