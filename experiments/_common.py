"""Shared handling for the study scripts: each writes a CSV and a PNG into --out and prints
its table (the README copies these tables)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from sim.paper import PaperSetup, save_csv, scaled_cache_gb
from sim.paper_plots import lines
from specs.errors import InputError

METRICS = ["ttft_mean_s", "tpot_mean_s", "hit_rate"]


def parse(description: str, default_requests: int = 40) -> tuple[PaperSetup, Path]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default="experiments_out", help="folder for the CSV and PNG")
    p.add_argument(
        "--num-requests", type=int, default=default_requests, help="requests per workload"
    )
    p.add_argument(
        "--model",
        default="mixtral-8x7b",
        help="model preset (the paper's: mixtral-8x7b, qwen1.5-moe-a2.7b, phi-3.5-moe)",
    )
    p.add_argument(
        "--cache-gb",
        type=float,
        default=None,
        help="total expert cache (GiB); default 24 on Mixtral-8x7B and the same share of "
        "the experts' bytes on another model",
    )
    p.add_argument(
        "--hardware",
        default="paper-6x3090",
        help="hardware preset (the paper's testbed: paper-6x3090; one GPU: a100-80gb-pcie4, ...)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workloads", default="lmsys,sharegpt", help="comma-separated: lmsys, sharegpt")
    a = p.parse_args()
    try:
        cache_gb = a.cache_gb if a.cache_gb is not None else scaled_cache_gb(a.model)
    except InputError as e:  # an unknown preset: one line, exit status 2
        p.error(str(e))
    setup = PaperSetup(
        model=a.model,
        hardware=a.hardware,
        num_requests=a.num_requests,
        cache_gb=cache_gb,
        workers=a.workers,
        seed=a.seed,
        workloads=a.workloads.split(","),
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(
        f"{Path(sys.argv[0]).name}: simulated, {setup.model} on {setup.hardware} (published figures), "
        f"synthetic workloads {setup.workloads} of {setup.num_requests} requests\n"
    )
    return setup, out


def report(df: pd.DataFrame, columns: list[str], csv: Path, pngs: list[Path], t0: float) -> None:
    """Print the study's table and where its files went."""
    save_csv(df, csv)
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format
    ):
        print(df[columns].to_string(index=False))
    print(f"wrote {', '.join(str(p) for p in [csv, *pngs])} in {time.perf_counter() - t0:.0f} s")


def line_study(
    name: str,
    description: str,
    study: Callable[[PaperSetup], pd.DataFrame],
    keys: list[str],
    x: str,
    panels: list[tuple[str, str]],
    title: str,
) -> None:
    """Run ``study``, average the metrics over workloads per ``keys``, plot metric vs ``x``."""
    setup, out = parse(description)
    t0 = time.perf_counter()
    df = study(setup).groupby(keys, as_index=False, sort=False)[METRICS].mean()
    group = next((k for k in keys if k != x), None)
    png = lines(df, x, panels, out / f"{name}.png", title, group=group or x)
    report(df, [*keys, *METRICS], out / f"{name}.csv", [png], t0)


def write_table(df: pd.DataFrame, out: str | Path, name: str) -> str:
    """Write ``df`` to ``out/name`` as CSV (atomically; the folder made if absent) and
    return its rows as a markdown table."""
    from specs.jsonio import atomic_output

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / name) as tmp:
        df.to_csv(tmp, index=False)
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)
