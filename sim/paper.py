"""The fMoE paper's experiments, reproduced in simulation.

Everything here is a thin layer over :func:`sim.sweep.run_sweep`: it fixes the paper's
setup (Mixtral-8x7B on the 6 x RTX 3090 testbed, LMSYS-Chat-like and ShareGPT-like
workloads, 70% of requests fill the stores and 30% are measured), runs the policies and
turns the rows into the paper's tables. The workloads are synthetic (``traces.synth``,
shaped like the paper's by their mean prompt/output lengths and given semantic
structure); the hardware figures are published ones (``paper-6x3090``), not measured.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from sim.config import SimConfig
from sim.sweep import SweepGrid, run_sweep, save_results, single_thread_blas
from specs.errors import InputError
from specs.model_spec import ModelSpec
from specs.presets import load_hardware, load_model
from traces.synth import SynthConfig, generate
from traces.types import Workload

BASELINES = ["deepspeed", "mixtral-offloading", "promoe", "moe-infinity"]
BOUNDS = ["oracle", "no-offload"]
DEMO_POLICIES = ["fmoe", *BASELINES, *BOUNDS]

# Figure 10 of the paper (offline, averages over models and workloads): fMoE's reduction
# of TTFT and TPOT against each baseline. Hit-rate gains are from the text.
PAPER_TTFT_REDUCTION = {
    "deepspeed": 0.74,
    "mixtral-offloading": 0.67,
    "promoe": 0.56,
    "moe-infinity": 0.53,
}
PAPER_TPOT_REDUCTION = {
    "deepspeed": 0.46,
    "mixtral-offloading": 0.38,
    "promoe": 0.27,
    "moe-infinity": 0.22,
}
PAPER_HIT_RATE_GAIN = {"mixtral-offloading": 0.14, "promoe": 0.37, "moe-infinity": 0.68}

PAPER_CACHE_GB = 24.0
"""The studies' default expert cache on Mixtral-8x7B (GiB, total over the GPUs)."""


WORKLOADS = {"lmsys": "LMSYS-Chat-like", "sharegpt": "ShareGPT-like"}


class PaperSetup(BaseModel):
    """The knobs every study shares; defaults are the paper's offline setup."""

    model_config = ConfigDict(extra="forbid")

    model: str = "mixtral-8x7b"
    hardware: str = "paper-6x3090"
    workloads: list[str] = Field(default_factory=lambda: list(WORKLOADS))
    num_requests: int = Field(
        30, ge=4, description="requests per workload (70% train, 30% measured)"
    )
    cache_gb: float = Field(
        PAPER_CACHE_GB, gt=0, description="total expert cache over all GPUs (GiB)"
    )
    batch_size: int = Field(1, ge=1)
    train_fraction: float = Field(0.7, ge=0, le=1)
    seed: int = 0
    workers: int = Field(2, ge=1)
    policy_options: dict[str, dict[str, Any]] = Field(default_factory=dict)


def paper_workload(
    kind: str, spec: ModelSpec, num_requests: int, seed: int = 0, **knobs: Any
) -> Workload:
    """A bundled synthetic workload shaped like the paper's ``kind`` ('lmsys' or 'sharegpt').

    Both share one routing "world" (topics, popularity, cross-layer affinity) per seed, as
    two datasets served by one model would; the preset sets the mean prompt/output
    lengths (37/127 for LMSYS-Chat, 43/122 for ShareGPT).
    """
    if kind not in WORKLOADS:
        raise InputError(f"unknown workload {kind!r} (known: {', '.join(WORKLOADS)})")
    token_seed = seed * 2 + (0 if kind == "lmsys" else 1)
    cfg = SynthConfig(
        num_requests=num_requests, seed=token_seed, world_seed=seed, preset=kind, **knobs
    )
    workload = generate(spec, cfg)
    workload.provenance["workload"] = WORKLOADS[kind]
    return workload


def scaled_cache_gb(model: str) -> float:
    """The cache that holds the same share of ``model``'s expert bytes as
    :data:`PAPER_CACHE_GB` holds of Mixtral-8x7B's (about 29%), in GiB to 0.1: the
    default when a study runs another model, so models compare at equal cache pressure."""
    share = PAPER_CACHE_GB / load_model("mixtral-8x7b").experts_total_bytes
    return round(share * load_model(model).experts_total_bytes, 1)


def base_config(setup: PaperSetup, **overrides: Any) -> SimConfig:
    """The SimConfig of the paper's setup (offline: ``train_fraction`` of each workload trains)."""
    fields: dict[str, Any] = dict(
        model=load_model(setup.model),
        hardware=load_hardware(setup.hardware),
        cache_gb=setup.cache_gb,
        batch_size=setup.batch_size,
        train_fraction=setup.train_fraction if setup.train_fraction > 0 else None,
        seed=setup.seed,
    )
    fields.update(overrides)
    return SimConfig(**fields)


def workloads_for(setup: PaperSetup, **knobs: Any) -> dict[str, Workload]:
    spec = load_model(setup.model)
    return {
        k: paper_workload(k, spec, setup.num_requests, setup.seed, **knobs) for k in setup.workloads
    }


def run_policies(
    setup: PaperSetup,
    policies: Sequence[str],
    *,
    workloads: dict[str, Workload] | None = None,
    cache_gb: Sequence[float] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> pd.DataFrame:
    """Simulate ``policies`` on the setup's workloads; one row per (workload, policy, budget).

    ``overrides`` go into the base SimConfig (batch_size, prefetch_distance, ...);
    ``policy_options`` of the setup apply per policy name.
    """
    workloads = workloads if workloads is not None else workloads_for(setup)
    frames = []
    # options differ per policy, so run one grid per policy; rows keep the grid order
    for name in policies:
        base = base_config(setup, policy_options=setup.policy_options.get(name, {}), **overrides)
        grid = SweepGrid(
            base=base,
            policies=[name],
            traces=list(workloads),
            cache_gb=list(cache_gb) if cache_gb is not None else [setup.cache_gb],
        )
        frames.append(
            run_sweep(grid, workers=setup.workers, workloads=workloads, progress=progress)
        )
    df = pd.concat(frames, ignore_index=True)
    if "error" in df and df["error"].notna().any():
        bad = df[df["error"].notna()].iloc[0]
        raise InputError(f"policy {bad['policy']!r} on {bad['trace']!r}: {bad['error']}")
    return df


def reductions(
    df: pd.DataFrame, ours: str = "fmoe", baselines: Sequence[str] = BASELINES
) -> pd.DataFrame:
    """fMoE's reduction of mean TTFT and TPOT (1 - ours/theirs) and hit-rate gain per baseline.

    Averaged over the workloads in ``df``, as the paper averages; the paper's figures sit
    beside ours.
    """
    mean = df.groupby("policy")[["ttft_mean_s", "tpot_mean_s", "hit_rate"]].mean()
    if ours not in mean.index:
        raise InputError(f"no {ours!r} rows to compare")
    rows = []
    for b in baselines:
        if b not in mean.index:
            continue
        rows.append(
            {
                "baseline": b,
                "ttft_reduction": 1 - mean.loc[ours, "ttft_mean_s"] / mean.loc[b, "ttft_mean_s"],
                "paper_ttft_reduction": PAPER_TTFT_REDUCTION.get(b),
                "tpot_reduction": 1 - mean.loc[ours, "tpot_mean_s"] / mean.loc[b, "tpot_mean_s"],
                "paper_tpot_reduction": PAPER_TPOT_REDUCTION.get(b),
                "hit_rate_gain": mean.loc[ours, "hit_rate"] - mean.loc[b, "hit_rate"],
                "paper_hit_rate_gain": PAPER_HIT_RATE_GAIN.get(b),
            }
        )
    return pd.DataFrame(rows)


def policy_table(df: pd.DataFrame) -> pd.DataFrame:
    """The demo table: one row per (workload, policy) with latency and cache figures."""
    cols = {
        "trace": "workload",
        "policy": "policy",
        "ttft_mean_s": "ttft_mean_s",
        "tpot_mean_s": "tpot_mean_s",
        "e2e_mean_s": "e2e_mean_s",
        "hit_rate": "hit_rate",
        "prefetch_accuracy": "prefetch_accuracy",
        "bytes_h2d": "bytes_h2d",
    }
    out = df[[c for c in cols if c in df]].rename(columns=cols)
    return out.reset_index(drop=True)


def save_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return save_results(df, path, "csv")


# -- the paper's other studies ------------------------------------------------------------
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
}
ABLATION_CACHING = {
    "LRU": ("fmoe", {"eviction": "lru"}),
    "LFU": ("fmoe", {"eviction": "lfu"}),
    "fMoE (p x freq)": ("fmoe", {"eviction": "fmoe"}),
}


def study_ablation(setup: PaperSetup) -> pd.DataFrame:
    """The paper's prediction and caching ablations; ``part`` tells them apart."""
    workloads = workloads_for(setup)
    pred = run_variants(setup, ABLATION_PREDICTION, workloads=workloads).assign(part="prediction")
    cache = run_variants(setup, ABLATION_CACHING, workloads=workloads).assign(part="caching")
    return pd.concat([pred, cache], ignore_index=True)


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


# -- the quality table: fMoE vs every baseline, and its ablation -------------------
QUALITY_VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # label: (group, policy, options); variants equal to plain fmoe reuse its runs
    "fmoe": ("fmoe", "fmoe", {}),
    **{b: ("baseline", b, {}) for b in BASELINES},
    **{b: ("bound", b, {}) for b in BOUNDS},
    "fmoe prediction=traj": ("ablation: prediction", "fmoe", {"prediction": "traj"}),
    "fmoe prediction=traj+sem": ("ablation: prediction", "fmoe", {"prediction": "traj+sem"}),
    "fmoe prediction=traj+sem+delta": (
        "ablation: prediction",
        "fmoe",
        {"prediction": "traj+sem+delta"},
    ),
    "fmoe eviction=lru": ("ablation: eviction", "fmoe", {"eviction": "lru"}),
    "fmoe eviction=lfu": ("ablation: eviction", "fmoe", {"eviction": "lfu"}),
    "fmoe eviction=fmoe": ("ablation: eviction", "fmoe", {"eviction": "fmoe"}),
    # reported beside the claims, not part of them: a run-long LFU (not the paper's caching
    # ablation) and MoE-Infinity unbounded (every remaining layer, every expert its match used)
    "fmoe eviction=lfu-global": ("extra", "fmoe", {"eviction": "lfu-global"}),
    "moe-infinity unbounded": (
        "extra",
        "moe-infinity",
        {"prefetch_layers": 10_000, "top_experts": 10_000},
    ),
}
# rough relative cost of a run (moe-infinity scores every remaining layer per gate): the
# longest go first so two workers finish together
_RUN_COST = {"moe-infinity": 3.0, "promoe": 1.5, "fmoe": 1.5, "oracle": 1.5}


def _quality_job(args: tuple[str, Workload, SimConfig]) -> tuple[str, dict[str, Any]]:
    from sim.run import simulate

    trace, workload, cfg = args
    return trace, simulate(workload, cfg).metrics


def run_quality(
    setup: PaperSetup,
    variants: dict[str, tuple[str, str, dict[str, Any]]] | None = None,
    *,
    workloads: dict[str, Workload] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Simulate every variant on every workload of ``setup`` in one process pool.

    One row per (variant, workload): ``variant``, ``group``, ``policy``, ``workload`` and
    the run's scalar metrics. Variants whose (policy, options) equal an earlier one's
    (``fmoe`` and its default ablation settings) share that run.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from policies.registry import policy_class

    variants = variants if variants is not None else QUALITY_VARIANTS
    workloads = workloads if workloads is not None else workloads_for(setup)
    defaults: dict[str, dict[str, Any]] = {}
    runs: dict[tuple[str, str], int] = {}  # (policy, options) -> run index
    labels: list[tuple[str, str, str, int]] = []
    configs: list[tuple[str, SimConfig]] = []
    for label, (group, policy, options) in variants.items():
        cls = policy_class(policy)
        if policy not in defaults:
            defaults[policy] = cls.Options().model_dump()
        full = {**defaults[policy], **cls.Options(**options).model_dump()}
        key = (policy, repr(sorted(full.items())))
        if key not in runs:
            runs[key] = len(configs)
            cache = None if cls.preload_all else setup.cache_gb
            cfg = base_config(setup, policy=policy, policy_options=options, cache_gb=cache)
            configs.append((policy, cfg))
        labels.append((label, group, policy, runs[key]))
    jobs = [
        (i, trace, workloads[trace], cfg)
        for i, (_, cfg) in enumerate(configs)
        for trace in workloads
    ]
    jobs.sort(key=lambda j: -_RUN_COST.get(configs[j[0]][0], 1.0))
    results: dict[tuple[int, str], dict[str, Any]] = {}

    def note(n: int) -> None:
        if progress:
            sys.stderr.write(f"\rquality: {n}/{len(jobs)} runs")

    if setup.workers <= 1:
        for n, (i, trace, w, c) in enumerate(jobs, 1):
            results[(i, trace)] = _quality_job((trace, w, c))[1]
            note(n)
    else:
        single_thread_blas()
        ctx = get_context("spawn")
        with ProcessPoolExecutor(max_workers=setup.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_quality_job, (t, w, c)) for _, t, w, c in jobs]
            for n, ((i, trace, _, _), fut) in enumerate(zip(jobs, futures, strict=True), 1):
                results[(i, trace)] = fut.result()[1]
                note(n)
    if progress:
        sys.stderr.write("\n")
    rows = []
    for label, group, policy, i in labels:
        for trace in workloads:
            m = results[(i, trace)]
            flat = {k: v for k, v in m.items() if not isinstance(v, list | dict)}
            meta = m.get("policy_metadata", {})  # the policy's own counters, one column each
            flat.update(
                {
                    f"policy_metadata.{k}": v
                    for k, v in meta.items()
                    if not isinstance(v, list | dict)
                }
            )
            rows.append(
                {**flat, "variant": label, "group": group, "policy": policy, "workload": trace}
            )
    return pd.DataFrame(rows)


def quality_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: hit rate and mean TPOT per workload and their mean over workloads."""
    out = []
    for label, part in df.groupby("variant", sort=False):
        row: dict[str, Any] = {"variant": label, "group": part["group"].iloc[0]}
        for _, r in part.iterrows():
            row[f"hit_rate_{r['workload']}"] = r["hit_rate"]
            row[f"tpot_s_{r['workload']}"] = r["tpot_mean_s"]
        row["hit_rate"] = part["hit_rate"].mean()
        row["tpot_mean_s"] = part["tpot_mean_s"].mean()
        out.append(row)
    return pd.DataFrame(out)


QUALITY_MIN_GAIN = 0.001
"""Hit-rate gain an ablation step must show to count as an improvement (0.1 points): a
handful of demands out of ~10^5 is no effect."""


def quality_checks(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The issue's claims, each with whether it holds on ``table`` (means over workloads).

    fMoE has a higher hit rate and a lower mean TPOT than every baseline (bounds excluded),
    and the ablation orders traj < traj+sem < traj+sem+delta in hit rate, each step by at
    least ``QUALITY_MIN_GAIN``; the caching ablation's paper order (lru < lfu < fmoe) is
    reported too.
    """
    t = table.set_index("variant")
    checks = []
    if "fmoe" in t.index:
        ours = t.loc["fmoe"]
        for b in t.index[t["group"] == "baseline"]:
            other = t.loc[b]
            checks.append(
                {
                    "claim": f"fmoe beats {b}",
                    "holds": bool(
                        ours["hit_rate"] > other["hit_rate"]
                        and ours["tpot_mean_s"] < other["tpot_mean_s"]
                    ),
                    "detail": f"hit {ours['hit_rate']:.3f} vs {other['hit_rate']:.3f}, "
                    f"TPOT {ours['tpot_mean_s']:.3f} s vs {other['tpot_mean_s']:.3f} s",
                }
            )
    for claim, names in (
        ("prediction: traj < traj+sem < traj+sem+delta", ["traj", "traj+sem", "traj+sem+delta"]),
        ("eviction: lru < lfu < fmoe", ["lru", "lfu", "fmoe"]),
    ):
        kind = claim.split(":")[0]
        labels = [f"fmoe {kind}={n}" for n in names]
        if not all(x in t.index for x in labels):
            continue
        hits = [float(t.loc[x, "hit_rate"]) for x in labels]
        checks.append(
            {
                "claim": f"{claim} (hit rate)",
                "holds": all(
                    b - a >= QUALITY_MIN_GAIN for a, b in zip(hits, hits[1:], strict=False)
                ),
                "detail": " / ".join(f"{h:.5f}" for h in hits),
            }
        )
    return checks
