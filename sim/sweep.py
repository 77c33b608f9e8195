"""Sweeps: policies x cache budgets x traces, in a local process pool or on a Ray cluster.

Each job simulates one (trace, policy, cache budget) with the grid's base config and
returns one results row: the job's labels plus the scalar metrics (lists and dicts as
JSON strings). A job whose inputs are invalid (say a budget below top-K) gives a row with
``error`` set instead of stopping the sweep. Policies that keep every expert resident
(no-offload) run once per trace, with the budget the GPUs hold.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from policies.registry import policy_class
from sim.config import SimConfig
from specs.errors import InputError
from specs.jsonio import atomic_output
from traces.types import Workload


class SweepGrid(BaseModel):
    """The grid: ``base`` config with every combination of policy, budget and trace.

    ``traces`` are trace file paths (traces.io format) or keys of the in-memory workloads
    given to :func:`run_sweep`. At most one of ``cache_gb`` / ``cache_experts`` (totals,
    or per GPU when ``base.cache_per_gpu``); neither: the base config's budget.
    """

    model_config = ConfigDict(extra="forbid")

    base: SimConfig
    policies: list[str] = Field(min_length=1)
    traces: list[str] = Field(min_length=1)
    cache_gb: list[float] | None = None
    cache_experts: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepGrid:
        if self.cache_gb is not None and self.cache_experts is not None:
            raise ValueError("give at most one of cache_gb and cache_experts")
        return self


class SweepJob(BaseModel):
    """One simulation of a sweep (picklable; the workload travels only when in memory)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    trace: str
    config: SimConfig
    workload: Any = None


def expand(grid: SweepGrid, workloads: Mapping[str, Workload] | None = None) -> list[SweepJob]:
    """The grid's jobs in a fixed order: trace, then policy, then budget."""
    for name in grid.policies:
        policy_class(name)  # unknown names fail before any job runs
    workloads = workloads or {}
    for tr in grid.traces:
        if tr not in workloads and not Path(tr).is_file():
            raise InputError(f"trace {tr!r}: no such file")
    budgets: list[dict[str, Any]]
    if grid.cache_gb is not None:
        budgets = [{"cache_gb": g, "cache_experts": None} for g in grid.cache_gb]
    elif grid.cache_experts is not None:
        budgets = [{"cache_experts": n, "cache_gb": None} for n in grid.cache_experts]
    else:
        budgets = [{}]
    jobs = []
    for tr in grid.traces:
        for name in grid.policies:
            keep_all = policy_class(name).preload_all
            for b in [{"cache_gb": None, "cache_experts": None}] if keep_all else budgets:
                cfg = grid.base.model_copy(update={"policy": name, **b})
                jobs.append(
                    SweepJob(index=len(jobs), trace=tr, config=cfg, workload=workloads.get(tr))
                )
    return jobs


_loaded: dict[str, Workload] = {}


def _workload(job: SweepJob) -> Workload:
    if job.workload is not None:
        return job.workload
    if job.trace not in _loaded:  # each worker process reads a trace once
        from traces.io import load_workload

        _loaded[job.trace] = load_workload(job.trace)
    return _loaded[job.trace]


def _flat(value: Any) -> Any:
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def run_job(job: SweepJob) -> dict[str, Any]:
    """Simulate one job; a row of labels and scalar metrics (``error`` on bad input)."""
    from sim.run import simulate

    cfg = job.config
    row: dict[str, Any] = {"job": job.index, "trace": job.trace, **cfg.label(), "error": None}
    try:
        result = simulate(_workload(job), cfg)
    except InputError as exc:
        row["error"] = str(exc)
        return row
    row.update(
        {k: _flat(v) for k, v in result.metrics.items() if k not in ("policy", "model", "hardware")}
    )
    return row


def _progress(total: int, enabled: bool) -> tqdm:
    return tqdm(total=total, file=sys.stderr, disable=not enabled, desc="sweep", unit="run")


def single_thread_blas() -> None:
    """Make worker processes spawned from now on use one BLAS/OpenMP thread (unless the
    user set a count): a simulation's numpy products are tiny, so on a small machine
    threads only contend with the other workers (measured ~10% faster per run on 2 cores).
    The running process keeps what it loaded; spawned ones read the variables at import."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _run_local(jobs: list[SweepJob], workers: int, progress: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any] | None] = [None] * len(jobs)
    with _progress(len(jobs), progress) as bar:
        if workers <= 1:
            for i, job in enumerate(jobs):
                rows[i] = run_job(job)
                bar.update()
        else:
            single_thread_blas()
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    rows[futures[fut]] = fut.result()
                    bar.update()
    return [r for r in rows if r is not None]


@contextmanager
def _stderr_held() -> Iterator[io.StringIO]:
    """Hold what is written to file descriptor 2 (Ray's C++ client logs every retry of a
    failed connection there) in the yielded buffer; the caller replays it on success."""
    import tempfile

    held = io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield held
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            held.write(tmp.read().decode(errors="replace"))


def _run_ray(
    jobs: list[SweepJob], address: str, workers: int, progress: bool
) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs the 'ray' package (pip install 'fmoe-sim[ray]')") from None
    started = False
    if not ray.is_initialized():
        if address == "local":
            ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False)
        else:
            try:  # a wrong address is the user's input: one line, not Ray's traceback
                with _stderr_held() as held:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, TimeoutError, ValueError) as exc:
                raise InputError(f"--ray {address}: cannot join the Ray cluster ({exc})") from None
            sys.stderr.write(held.getvalue())
        started = True
    try:
        remote = ray.remote(num_cpus=1)(run_job)
        refs = [remote.remote(job) for job in jobs]
        pending = list(refs)
        with _progress(len(jobs), progress) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return list(ray.get(refs))
    finally:
        if started:
            ray.shutdown()


def run_sweep(
    grid: SweepGrid,
    workers: int = 1,
    ray_address: str | None = None,
    workloads: Mapping[str, Workload] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run every job of ``grid``; one row per job, in :func:`expand` order.

    ``workers`` processes (spawned) run the jobs locally; with ``ray_address`` they run as
    Ray tasks instead (``"local"`` starts a local Ray; otherwise ``ray.init(address)``).
    A tqdm progress bar goes to stderr.
    """
    jobs = expand(grid, workloads)
    if ray_address:
        rows = _run_ray(jobs, ray_address, workers, progress)
    else:
        rows = _run_local(jobs, workers, progress)
    return pd.DataFrame(rows).sort_values("job").reset_index(drop=True)


Format = Literal["csv", "parquet"]


def save_results(df: pd.DataFrame, path: str | Path, fmt: Format = "csv") -> Path:
    """Write ``df`` as CSV or parquet, atomically (temp file + rename)."""
    if fmt not in ("csv", "parquet"):
        raise InputError(f"unknown results format {fmt!r} (csv or parquet)")
    with atomic_output(path) as tmp:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)
    return Path(path)
