"""The paper's studies (cache limit, prefetch distance, store capacity, batch size,
ablation, online), each a thin layer over :func:`sim.paper_setup.run_policies`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from sim.config import SimConfig
from sim.paper_setup import (
    BASELINES,
    PaperSetup,
    base_config,
    paper_workload,
    run_policies,
    workloads_for,
)
from specs.presets import load_model
from traces.types import Workload

STUDY_POLICIES = ["fmoe", *BASELINES]


def run_variants(
    setup: PaperSetup,
    variants: dict[str, tuple[str, dict[str, Any]]],
    *,
    workloads: dict[str, Workload] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """Run labelled (policy, options) variants; rows carry a ``variant`` column."""
    workloads = workloads if workloads is not None else workloads_for(setup)
    frames = []
    for label, (policy, options) in variants.items():
        s = setup.model_copy(update={"policy_options": {policy: options}})
        df = run_policies(s, [policy], workloads=workloads, progress=progress, **overrides)
        frames.append(df.assign(variant=label))
    return pd.concat(frames, ignore_index=True)


def study_cache_limit(
    setup: PaperSetup,
    sizes_gb: Sequence[float] = (6, 12, 24, 48, 96),
    policies: Sequence[str] = STUDY_POLICIES,
) -> pd.DataFrame:
    """The paper's expert cache limit study (6..96 GiB total)."""
    return run_policies(setup, policies, cache_gb=sizes_gb)


def study_prefetch_distance(
    setup: PaperSetup, distances: Sequence[int] = (1, 2, 3, 4, 6, 8)
) -> pd.DataFrame:
    """fMoE's hit rate and latency as the prefetch distance d grows, beside the oracle
    restricted to the same d (it prefetches the true experts up to d layers ahead: what
    any predictor at that distance could reach)."""
    workloads = workloads_for(setup)
    frames = [
        run_policies(setup, ["fmoe", "oracle"], workloads=workloads, prefetch_distance=d).assign(
            prefetch_distance=d
        )
        for d in distances
    ]
    return pd.concat(frames, ignore_index=True)


def study_store_capacity(
    setup: PaperSetup, capacities: Sequence[int] = (16, 64, 256, 1000, 4000)
) -> pd.DataFrame:
    """fMoE with expert map stores of different capacities C."""
    variants = {str(c): ("fmoe", {"store_capacity": c}) for c in capacities}
    df = run_variants(setup, variants)
    return df.assign(store_capacity=df["variant"].astype(int))


def study_batch_size(
    setup: PaperSetup, sizes: Sequence[int] = (1, 2, 4, 8), policies: Sequence[str] = STUDY_POLICIES
) -> pd.DataFrame:
    """Latency and hit rate per policy as the batch grows (continuous batching)."""
    workloads = workloads_for(setup)
    frames = [
        run_policies(setup, policies, workloads=workloads, batch_size=b).assign(batch=b)
        for b in sizes
    ]
    return pd.concat(frames, ignore_index=True)


ABLATION_PREDICTION = {
    "Speculate (mixtral-offloading)": ("mixtral-offloading", {}),
    "Hit count (lfu)": ("lfu", {}),
    "Map(T)": ("fmoe", {"prediction": "traj"}),
    "Map(T+S), top-K": ("fmoe", {"prediction": "traj+sem"}),
    "Map(T+S+delta)": ("fmoe", {"prediction": "traj+sem+delta"}),
    "Map(S+delta), no trajectory": ("fmoe", {"prediction": "sem+delta"}),
}
ABLATION_CACHING = {
    "LRU": ("fmoe", {"eviction": "lru"}),
    "LFU": ("fmoe", {"eviction": "lfu"}),
    "paper (p x freq)": ("fmoe", {"eviction": "paper"}),
    "fMoE, age only (no request frequency)": ("fmoe", {"request_frequency": False}),
    "fMoE (expected next use)": ("fmoe", {"eviction": "fmoe"}),
}
ABLATION_PREFETCH = {
    "no prefetch (eviction only)": ("fmoe", {"admission": "none"}),
    "every selection (paper)": ("fmoe", {"admission": "all"}),
    "deadline-aware": ("fmoe", {"admission": "deadline"}),
}
ABLATION_LOOKAHEAD = {
    "no lookahead (paper)": ("fmoe", {"lookahead": "false"}),
    "lookahead where measured right (auto)": ("fmoe", {"lookahead": "auto"}),
    "lookahead always": ("fmoe", {"lookahead": "true"}),
}


def study_ablation(setup: PaperSetup) -> pd.DataFrame:
    """The paper's prediction and caching ablations, the prefetch admission's and the
    lookahead's (Mixtral-Offloading's next-layer rows: never, where measured right, always),
    each part changing one thing of the full policy; ``part`` tells them apart."""
    workloads = workloads_for(setup)
    parts = (
        ("prediction", ABLATION_PREDICTION),
        ("caching", ABLATION_CACHING),
        ("prefetch", ABLATION_PREFETCH),
        ("lookahead", ABLATION_LOOKAHEAD),
    )
    frames = [
        run_variants(setup, variants, workloads=workloads).assign(part=part)
        for part, variants in parts
    ]
    return pd.concat(frames, ignore_index=True)


def _online_one(args: tuple[str, Workload, SimConfig]) -> tuple[str, dict[str, Any], pd.DataFrame]:
    from sim.run import simulate

    name, workload, cfg = args
    res = simulate(workload, cfg)
    return name, res.metrics, res.requests


def study_online(
    setup: PaperSetup,
    num_requests: int = 256,
    rate: float = 2.91,
    batch_size: int = 8,
    policies: Sequence[str] = (*STUDY_POLICIES, "oracle"),
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The online setup: Poisson arrivals at ``rate``, stores start empty, continuous batching.

    The paper replays Azure LLM inference arrivals at 2.91 req/s; that trace is not
    shipped, so arrivals here are Poisson at the same rate. Returns the per-policy metric
    rows and each policy's per-request records (for latency CDFs).
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    spec = load_model(setup.model)
    workload = paper_workload(
        "lmsys", spec, num_requests, setup.seed, arrival="poisson", arrival_rate=rate
    )
    jobs = [
        (
            name,
            workload,
            base_config(
                setup, policy=name, train_fraction=None, batch_size=batch_size, arrivals="trace"
            ),
        )
        for name in policies
    ]
    rows, per_request = [], {}
    with ProcessPoolExecutor(max_workers=setup.workers, mp_context=get_context("spawn")) as pool:
        for name, metrics, requests in pool.map(_online_one, jobs):
            rows.append(
                {
                    "policy": name,
                    **{k: v for k, v in metrics.items() if not isinstance(v, list | dict)},
                }
            )
            per_request[name] = requests
    return pd.DataFrame(rows), per_request
