"""Hybrid CPU/GPU study: for each model x machine x cache x batch, every miss-action policy.

    python -m experiments.hybrid --out DIR [--quick] [--workers N]

Simulated (published figures, not measurements): models with the weights users run in
hybrid setups (Q4_K-class int4 for Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3), on the
hybrid presets (desktop RTX 4090 + 2-channel DDR5, an 8-channel DDR5 workstation, an
H100 PCIe with a 2-socket Xeon), two cache sizes, batch 1 and 8, a synthetic offline
workload (a training split fills fMoE's store and the hot lists). Writes
``hybrid.csv`` (one row per setting and policy: setting, policy, exact, tpot_mean_s,
ttft_mean_s, hit_rate, action_share_fetch/_cpu/_lowbit/_skip, and more),
``hybrid_summary.csv`` (per setting: fmoe-hybrid's TPOT against the best other exact
policy) and ``hybrid_tpot.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

MODELS: dict[str, tuple[str, list[float]]] = {
    # model preset: (weight format users run, two cache sizes in GiB)
    "mixtral-8x7b": ("int4", [8.0, 16.0]),
    "qwen3-30b-a3b": ("int4", [2.0, 8.0]),
    "deepseek-v3": ("int4", [2.0, 4.0]),
}
HARDWARE = ["rtx4090-ddr5", "workstation-8ch-ddr5", "h100-pcie-2s-xeon"]
BATCHES = [1, 8]
EXACT_POLICIES = [
    "lru",
    "lfru",
    "least-stale",
    "fmoe",
    "llama-cpp",
    "ktransformers",
    "fiddler",
    "fmoe-hybrid",
]
LOSSY_POLICIES = ["hobbit"]
PER_LAYER = {"lfru"}  # vLLM's LFRU is one cache per layer
COLUMNS = [
    "setting",
    "policy",
    "exact",
    "tpot_mean_s",
    "ttft_mean_s",
    "hit_rate",
    "action_share_fetch",
    "action_share_cpu",
    "action_share_lowbit",
    "action_share_skip",
]
TIE = 0.005  # ties within 0.5% count as a win (the goal)


def setting_name(model: str, hardware: str, cache_gb: float, batch: int) -> str:
    return f"{model}/{hardware}/{cache_gb:g}GB/b{batch}"


def _workloads(model: str, fmt: str, requests: int, output_len: float, seed: int) -> Any:
    from specs.presets import load_model
    from traces.synth import SynthConfig, generate

    spec = load_model(model).with_weight_format(fmt)
    common = {
        "world_seed": seed,
        "output_len_mean": output_len,
        "max_output_len": 4 * int(output_len),
    }
    train = generate(spec, SynthConfig(num_requests=requests, seed=seed + 1, **common))
    test = generate(spec, SynthConfig(num_requests=requests, seed=seed + 2, **common))
    return spec, train, test


def run_setting(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every policy on one setting; rows of the CSV."""
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.errors import InputError
    from specs.presets import load_hardware

    spec, train, test = _workloads(
        job["model"], job["format"], job["requests"], job["output_len"], job["seed"]
    )
    hw = load_hardware(job["hardware"])
    rows = []
    for policy in job["policies"]:
        cfg = SimConfig(
            model=spec,
            hardware=hw,
            policy=policy,
            cache_gb=job["cache_gb"],
            batch_size=job["batch"],
            arrivals="closed",
            cache_scope="per-layer" if policy in PER_LAYER else "global",
            allow_lossy=policy in LOSSY_POLICIES,
            seed=job["seed"],
        )
        t0 = time.perf_counter()
        row: dict[str, Any] = {"setting": job["setting"], "policy": policy}
        try:
            m = simulate(test, cfg, training=train).metrics
        except InputError as exc:  # e.g. per-layer scope with too few slots: a refusal
            row.update({"exact": policy not in LOSSY_POLICIES, "refused": str(exc)})
            rows.append(row)
            sys.stderr.write(f"{job['setting']} {policy}: refused: {exc}\n")
            continue
        row.update({k: m.get(k) for k in COLUMNS[2:]})
        row.update(
            model=job["model"],
            weight_format=job["format"],
            hardware=job["hardware"],
            cache_gb=job["cache_gb"],
            batch_size=job["batch"],
            cache_scope=cfg.cache_scope,
            bytes_transferred=m["bytes_transferred"],
            cpu_busy_s=m["cpu_busy_s"],
            stall_s=m["stall_s"],
            wall_s=time.perf_counter() - t0,
            refused="",
        )
        rows.append(row)
        sys.stderr.write(
            f"{job['setting']} {policy}: tpot {m['tpot_mean_s']:.4g} s "
            f"({row['wall_s']:.0f} s wall)\n"
        )
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per setting: fmoe-hybrid's TPOT, the best other exact policy's, and the margin."""
    out = []
    for setting, g in df.groupby("setting", sort=False):
        exact = g[g["exact"].astype(bool) & g["tpot_mean_s"].notna()]
        mine = exact[exact.policy == "fmoe-hybrid"]
        others = exact[exact.policy != "fmoe-hybrid"]
        if mine.empty or others.empty:
            continue
        best = others.loc[others.tpot_mean_s.idxmin()]
        t = float(mine.tpot_mean_s.iloc[0])
        gain = (float(best.tpot_mean_s) - t) / float(best.tpot_mean_s)
        out.append(
            {
                "setting": setting,
                "fmoe_hybrid_tpot_s": t,
                "best_other_policy": best.policy,
                "best_other_tpot_s": float(best.tpot_mean_s),
                "tpot_reduction": gain,
                "lowest_or_tie": gain >= -TIE,
            }
        )
    return pd.DataFrame(out)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(df.setting))
    policies = list(dict.fromkeys(df.policy))
    fig, ax = plt.subplots(figsize=(max(8, len(settings) * 0.9), 5))
    width = 0.8 / len(policies)
    for i, pol in enumerate(policies):
        g = df[df.policy == pol].set_index("setting").reindex(settings)
        ax.bar([x + i * width for x in range(len(settings))], g.tpot_mean_s, width, label=pol)
    ax.set_xticks([x + 0.4 for x in range(len(settings))])
    ax.set_xticklabels(settings, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("TPOT mean (s, simulated)")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("Hybrid CPU/GPU execution: TPOT per setting and policy (simulated)")
    fig.tight_layout()
    from specs.jsonio import save_png

    save_png(fig, path, tight=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the CSVs and the plot")
    p.add_argument("--requests", type=int, default=8, help="test requests (and as many to train)")
    p.add_argument("--output-len", type=float, default=24.0, help="mean output tokens")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one model, one machine (a smoke run)")
    p.add_argument("--models", help="comma-separated subset of the models")
    p.add_argument("--hardware", help="comma-separated subset of the machines")
    a = p.parse_args(argv)
    models = a.models.split(",") if a.models else list(MODELS)
    machines = a.hardware.split(",") if a.hardware else list(HARDWARE)
    if a.quick:
        models, machines = models[1:2], machines[:1]
    bad = [m for m in models if m not in MODELS] + [h for h in machines if h not in HARDWARE]
    if bad:
        p.error(f"unknown model or machine: {', '.join(bad)}")
    jobs = []
    for model in models:
        fmt, caches = MODELS[model]
        for hw in machines:
            for cache in caches:
                for b in BATCHES:
                    jobs.append(
                        {
                            "setting": setting_name(model, hw, cache, b),
                            "model": model,
                            "format": fmt,
                            "hardware": hw,
                            "cache_gb": cache,
                            "batch": b,
                            "requests": max(a.requests, b),
                            "output_len": a.output_len,
                            "seed": a.seed,
                            "policies": EXACT_POLICIES + LOSSY_POLICIES,
                        }
                    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(
        f"hybrid study: {len(jobs)} settings x {len(EXACT_POLICIES + LOSSY_POLICIES)} policies, "
        "simulated from published figures\n"
    )
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    order = {j["setting"]: i for i, j in enumerate(jobs)}

    def save() -> pd.DataFrame:
        """Write what has finished so far (a long run leaves usable files at each step)."""
        from sim.sweep import save_results

        df = pd.DataFrame(rows)
        df = df.sort_values("setting", key=lambda c: c.map(order), kind="stable")
        save_results(df, out / "hybrid.csv", "csv")
        save_results(summary(df), out / "hybrid_summary.csv", "csv")
        return df

    if a.workers > 1:
        with ProcessPoolExecutor(a.workers) as pool:
            for fut in as_completed([pool.submit(run_setting, j) for j in jobs]):
                rows += fut.result()
                save()
    else:
        for job in jobs:
            rows += run_setting(job)
            save()
    df = save()
    s = summary(df)
    plot(df, out / "hybrid_tpot.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(s.to_string(index=False))
    print(
        f"wrote {out / 'hybrid.csv'}, {out / 'hybrid_summary.csv'}, {out / 'hybrid_tpot.png'} "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
