"""PNG of simulated vs measured: one scatter per metric, one colour per policy, y = x drawn.

TTFT, TPOT and end-to-end latency per request; hit rate and stall time per run. Written
atomically (temporary file + rename).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from specs.jsonio import save_png  # noqa: E402

PANELS = [
    ("requests", "ttft_s", "TTFT (s), per request"),
    ("requests", "tpot_s", "TPOT (s), per request"),
    ("requests", "e2e_s", "end-to-end (s), per request"),
    ("runs", "hit_rate", "expert hit rate, per run"),
    ("runs", "stall_s", "stall time (s), per run"),
]


def plot_sim_vs_real(
    requests: pd.DataFrame, runs: pd.DataFrame, path: str | Path, title: str = ""
) -> Path:
    """Write the scatter figure to ``path`` and return it."""
    path = Path(path)
    frames = {"requests": requests, "runs": runs}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.0 * len(PANELS), 4.0))
    policies = list(dict.fromkeys(runs["policy"]))
    colours = {p: f"C{i}" for i, p in enumerate(policies)}
    for ax, (frame, metric, label) in zip(axes, PANELS, strict=True):
        df = frames[frame].dropna(subset=[f"real_{metric}", f"sim_{metric}"])
        for p in policies:
            g = df[df["policy"] == p]
            ax.scatter(g[f"real_{metric}"], g[f"sim_{metric}"], s=16, c=colours[p], label=p)
        if len(df):
            lo = float(min(df[f"real_{metric}"].min(), df[f"sim_{metric}"].min()))
            hi = float(max(df[f"real_{metric}"].max(), df[f"sim_{metric}"].max()))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set_xlabel("measured")
        ax.set_ylabel("simulated")
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_png(fig, path, dpi=100)
