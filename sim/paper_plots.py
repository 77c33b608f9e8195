"""Figures of the paper's experiments (PNG, matplotlib Agg), from sim.paper frames."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from specs.jsonio import save_png  # noqa: E402

SOURCE_NOTE = "simulated: paper-6x3090 published figures, synthetic workloads"


def policy_bars(df: pd.DataFrame, path: str | Path, policies: Sequence[str]) -> Path:
    """TTFT, TPOT and hit rate per policy, one bar group per workload; dashed lines (in
    each workload's colour) mark the TPOT floor and Belady's MIN hit rate of the
    offloading runs where present (docs/bounds.md)."""
    metrics = [
        ("ttft_mean_s", "TTFT mean (s)"),
        ("tpot_mean_s", "TPOT mean (s); dashed: floor"),
        ("hit_rate", "expert hit rate; dashed: MIN"),
    ]
    traces = list(dict.fromkeys(df["trace"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    width = 0.8 / max(len(traces), 1)
    for ax, (col, label) in zip(axes, metrics, strict=True):
        for j, tr in enumerate(traces):
            d = df[df["trace"] == tr].set_index("policy")
            vals = [float(d[col].get(p, np.nan)) for p in policies]
            xs = np.arange(len(policies)) + (j - (len(traces) - 1) / 2) * width
            bars = ax.bar(xs, vals, width=width, label=tr)
            bound = {"tpot_mean_s": "bound_tpot_s", "hit_rate": "bound_hit_belady"}.get(col)
            if bound in d and d[bound].notna().any():
                # the offloading runs' bound: a run that preloads every expert (no-offload)
                # has the trivial one (hit rate 1, compute alone), left out here
                vals = d[bound].dropna().astype(float)
                ax.axhline(
                    float(vals.min() if col == "hit_rate" else vals.max()),
                    ls="--",
                    lw=1,
                    color=bars.patches[0].get_facecolor(),
                )
        ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, title="workload")
    fig.suptitle(f"Mixtral-8x7B offline, per policy ({SOURCE_NOTE})", fontsize=10)
    return save_png(fig, path)


def reduction_bars(red: pd.DataFrame, path: str | Path) -> Path:
    """fMoE's TTFT/TPOT reduction per baseline, ours beside the paper's."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(red))
    for ax, what in zip(axes, ("ttft", "tpot"), strict=True):
        ax.bar(xs - 0.2, red[f"{what}_reduction"] * 100, width=0.4, label="this simulator")
        ax.bar(
            xs + 0.2,
            red[f"paper_{what}_reduction"].astype(float) * 100,
            width=0.4,
            label="paper (Fig. 10)",
        )
        ax.set_xticks(xs, red["baseline"], rotation=20, ha="right")
        ax.set_ylabel(f"fMoE {what.upper()} reduction (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"fMoE vs baselines ({SOURCE_NOTE})", fontsize=10)
    return save_png(fig, path)


def lines(
    df: pd.DataFrame,
    x: str,
    ys: Sequence[tuple[str, str]],
    path: str | Path,
    title: str,
    group: str = "policy",
) -> Path:
    """One panel per metric: metric vs ``x``, one line per ``group`` (mean over workloads)."""
    fig, axes = plt.subplots(1, len(ys), figsize=(5.2 * len(ys), 4))
    axes = np.atleast_1d(axes)
    for ax, (col, label) in zip(axes, ys, strict=True):
        for name, g in df.groupby(group, sort=False):
            g = g.groupby(x, as_index=False)[col].mean().sort_values(x)
            ax.plot(g[x], g[col], marker="o", label=str(name))
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} ({SOURCE_NOTE})", fontsize=10)
    return save_png(fig, path)


def latency_cdf(frames: dict[str, pd.Series], path: str | Path, xlabel: str, title: str) -> Path:
    """Empirical CDF of a per-request latency, one line per policy."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, s in frames.items():
        v = np.sort(s.dropna().to_numpy())
        if len(v):
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{title}\n({SOURCE_NOTE})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
