"""The fMoE paper's setup: its constants, workloads, configs and policy runs (see :mod:`sim.paper`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from sim.config import SimConfig
from sim.sweep import SweepGrid, run_sweep, save_results
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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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
        "bound_hit_belady": "bound_hit_belady",
        "bound_tpot_s": "bound_tpot_s",
        "prefetch_accuracy": "prefetch_accuracy",
        "bytes_h2d": "bytes_h2d",
    }
    out = df[[c for c in cols if c in df]].rename(columns=cols)
    return out.reset_index(drop=True)


def save_csv(df: pd.DataFrame, path: str | Path) -> Path:
    return save_results(df, path, "csv")


# -- the paper's other studies ------------------------------------------------------------
