"""PNG plots of sweep results (matplotlib, Agg backend).

Inputs are :func:`sim.sweep.run_sweep` frames: one row per (trace, policy, budget) with
``expert_memory_bytes``, ``hit_rate`` and the latency metrics, and the bounds
(``bound_hit_belady``, ``bound_tpot_s``, drawn as black dashed lines where present; see
docs/bounds.md). Rows with an ``error`` are left out. Every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from sim.config import GB  # noqa: E402
from specs.jsonio import save_png  # noqa: E402


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    if "error" in df:
        df = df[df["error"].isna()]
    return df.assign(expert_memory_gb=df["expert_memory_bytes"].astype(float) / GB)


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated in (x, y), both lower-is-better, sorted by x."""
    front = []
    best = float("inf")
    for _, row in points.sort_values([x, y]).iterrows():
        if row[y] < best:
            front.append(row)
            best = row[y]
    return pd.DataFrame(front)


def bound_line(df: pd.DataFrame, col: str, best: str) -> pd.DataFrame:
    """A bound per cache size: per (trace, size) the ``best`` ("max" or "min") over the
    runs (runs that preload every expert start warmer), then the mean over traces.
    Empty when no run carries ``col``."""
    if col not in df or df[col].isna().all():
        return pd.DataFrame(columns=["expert_memory_gb", col])
    d = df.dropna(subset=[col]).assign(**{col: lambda x: x[col].astype(float)})
    per = d.groupby(["trace", "expert_memory_gb"], as_index=False)[col].agg(best)
    return per.groupby("expert_memory_gb", as_index=False)[col].mean()


def _draw_bound(ax: plt.Axes, line: pd.DataFrame, col: str, label: str) -> None:
    if len(line):
        ax.plot(line["expert_memory_gb"], line[col], "k--", marker="x", lw=1.2, label=label)


def plot_pareto(df: pd.DataFrame, path: str | Path, latency: str = "e2e_mean_s") -> Path:
    """Latency vs expert memory per policy, with the Pareto front over all runs (and the
    TPOT floor when ``latency`` is the mean TPOT)."""
    d = _ok(df).dropna(subset=[latency])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, g in d.groupby("policy"):
        ax.scatter(g["expert_memory_gb"], g[latency], label=name, s=28)
    if len(d):
        front = pareto_front(d, "expert_memory_gb", latency)
        ax.step(
            front["expert_memory_gb"],
            front[latency],
            where="post",
            color="black",
            lw=1,
            label="Pareto front",
        )
    if latency == "tpot_mean_s":
        _draw_bound(ax, bound_line(d, "bound_tpot_s", "min"), "bound_tpot_s", "TPOT floor (bound)")
    ax.set_xlabel("expert memory on GPUs (GiB)")
    ax.set_ylabel(latency.replace("_s", " (s)"))
    ax.set_title("latency vs memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_hit_rate(df: pd.DataFrame, path: str | Path) -> Path:
    """Expert hit rate vs cache size, one line per policy (mean over traces), and Belady's
    MIN: the bound for demand loading (a prefetching policy may pass it)."""
    d = _ok(df).dropna(subset=["hit_rate"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, g in d.groupby("policy"):
        g = g.groupby("expert_memory_gb", as_index=False)["hit_rate"].mean()
        ax.plot(g["expert_memory_gb"], g["hit_rate"], marker="o", label=name)
    _draw_bound(
        ax, bound_line(d, "bound_hit_belady", "max"), "bound_hit_belady", "MIN, demand loading"
    )
    ax.set_xlabel("expert cache (GiB)")
    ax.set_ylabel("hit rate")
    ax.set_ylim(0, 1.02)
    ax.set_title("hit rate vs cache size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_latency_bars(df: pd.DataFrame, path: str | Path) -> Path:
    """Mean TTFT and TPOT per policy, one bar per cache size (mean over traces)."""
    d = _ok(df)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    policies = sorted(d["policy"].unique())
    sizes = sorted(d["expert_memory_gb"].unique())
    width = 0.8 / max(len(sizes), 1)
    for ax, col, title in ((axes[0], "ttft_mean_s", "TTFT"), (axes[1], "tpot_mean_s", "TPOT")):
        means = d.groupby(["policy", "expert_memory_gb"])[col].mean()
        for j, size in enumerate(sizes):
            vals = [means.get((p, size), float("nan")) for p in policies]
            xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(policies))]
            ax.bar(xs, vals, width=width, label=f"{size:.1f} GiB")
        ax.set_xticks(range(len(policies)), policies, rotation=30, ha="right")
        ax.set_ylabel(f"{title} mean (s)")
        ax.set_title(f"{title} per policy")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, title="expert cache")
    return save_png(fig, path)


def plot_all(df: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """The sweep figures into ``out_dir``."""
    out = Path(out_dir)
    return [
        plot_pareto(df, out / "pareto_latency_memory.png"),
        plot_pareto(df, out / "pareto_tpot_memory.png", latency="tpot_mean_s"),
        plot_hit_rate(df, out / "hit_rate_vs_cache.png"),
        plot_latency_bars(df, out / "ttft_tpot_bars.png"),
    ]
