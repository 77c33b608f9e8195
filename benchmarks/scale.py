"""Scale (issue 21): synthesis and simulation of fine-grained models at 1,000+ requests.

Prints, from one run, each figure next to its goal:

1. ``fmoe trace synth`` of N DeepSeek-V3 requests (default synthetic lengths and fields):
   wall time (goal < 120 s at 1,000) and file size (goal < 3 GB);
2. ``fmoe sim --policy lru`` of that trace on the h100-pcie5 preset with a 16 GB cache:
   wall time (goal < 180 s) and peak RSS (goal < 4 GB); then ``--policy fmoe`` (goal
   < 300 s) on a ``--fmoe-requests``-request trace (5 by default; after an untimed
   one-request run that lets numba compile and cache its kernels), its engine seconds per
   layer step extrapolated to the full trace's layer steps and labelled so;
3. ``fmoe sim --policy lru`` of M and 10 x M Qwen3-30B-A3B requests: the peak RSS ratio
   (goal <= 1.2). These traces carry top-K routing only (no gate, lookahead or embedding
   rows: lru reads none) and short lengths (``--qwen-prompt``/``--qwen-output`` tokens on
   average, 4 and 2 by default), so 10 x M requests simulate within a session on a shared
   2-core machine (the engine's speed is issue 21's other part); what the ratio measures
   is how memory grows with the number of requests, which the lengths do not change
   (token rows are streamed from the file through a bounded cache either way).

Every command runs in its own process (`python -m fmoe_cli.main ...`), which reports its
own peak RSS (``ru_maxrss``). ``--quick`` runs smaller sizes (for checking the script).

    python benchmarks/scale.py [--quick] [--keep DIR] [--part all|deepseek|synth|qwen]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_WRAP = (
    "import resource, sys; from fmoe_cli.main import main; rc = main(sys.argv[1:]); "
    "u = resource.getrusage(resource.RUSAGE_SELF); "
    "sys.stderr.write('MAXRSS_KB %d CPU_S %.2f\\n' % (u.ru_maxrss, u.ru_utime + u.ru_stime)); "
    "sys.exit(rc)"
)
GB = 1e9


CPU: dict[str, float] = {}


def run(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS bytes, stdout) of one fmoe command in a fresh process; its
    CPU seconds (user + system) go to ``CPU["last"]`` (wall time on a shared machine
    includes waiting for a core)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAP, *argv], capture_output=True, text=True, env=env, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"fmoe {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    fields = next(ln.split() for ln in proc.stderr.splitlines() if ln.startswith("MAXRSS_KB"))
    CPU["last"] = float(fields[3])
    return wall, int(fields[1]) * 1024, proc.stdout


def verdict(value: float, goal: float, below: bool = True) -> str:
    ok = value < goal if below else value <= goal
    return "met" if ok else "MISSED"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (50 / 40 / 400 requests)")
    ap.add_argument("--keep", help="keep the traces in this folder (default: a temp folder)")
    ap.add_argument("--qwen-prompt", type=float, default=4.0, help="mean prompt tokens (Qwen3)")
    ap.add_argument("--qwen-output", type=float, default=2.0, help="mean output tokens (Qwen3)")
    ap.add_argument(
        "--part",
        choices=["all", "deepseek", "synth", "qwen"],
        default="all",
        help="run one part only (synth: the DeepSeek-V3 synthesis alone, without its sim)",
    )
    ap.add_argument(
        "--fmoe-requests",
        type=int,
        default=5,
        help="DS-V3 requests of the fmoe run, extrapolated to the full trace's layer steps "
        "(0: no fmoe run; the full trace itself when equal to its size)",
    )
    args = ap.parse_args()
    n_ds = 50 if args.quick else 1000
    n_q = 40 if args.quick else 1000
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fmoe-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    print(f"# benchmarks/scale.py ({'quick' if args.quick else 'full'}), traces in {folder}")
    print(f"# machine: {os.cpu_count()} CPUs visible, python {sys.version.split()[0]}")

    if args.part in ("all", "deepseek", "synth"):
        rows += deepseek(folder, n_ds, simulate=args.part != "synth", fmoe_n=args.fmoe_requests)
    if args.part in ("all", "qwen"):
        rows += qwen(folder, n_q, args.qwen_prompt, args.qwen_output)
    print()
    print(f"{'figure':34s} {'measured':44s} {'goal':8s} verdict")
    for name, value, goal, v in rows:
        print(f"{name:34s} {value:44s} {goal:8s} {v}")
    if args.quick:
        print("(quick: DS-V3 figures scaled linearly to 1,000 requests for the verdicts)")


def deepseek(
    folder: Path, n_ds: int, simulate: bool = True, fmoe_n: int = 0
) -> list[tuple[str, str, str, str]]:
    rows = []
    # 1. DeepSeek-V3 synthesis
    ds = folder / f"deepseek-v3-{n_ds}.trace"
    load0 = os.getloadavg()[0]
    wall, rss, _ = run(["trace", "synth", "--model", "deepseek-v3", "--num-requests", str(n_ds),
                        "--seed", "0", "--out", str(ds), "--json"])  # fmt: skip
    size = ds.stat().st_size
    cpu_synth = CPU["last"]
    load1 = os.getloadavg()[0]
    info = json.loads(run(["trace", "info", str(ds), "--json"])[2])
    print(f"synth deepseek-v3 x {n_ds}: {wall:.1f} s wall ({cpu_synth:.1f} s CPU), file {size / GB:.3f} GB "
          f"({info['tokens']} token rows, {size / max(info['tokens'], 1):.0f} B/row, "
          f"{info['format']['probability_rows']}), synth peak RSS {rss / GB:.2f} GB; "
          f"load average {load0:.1f} before, {load1:.1f} after on {os.cpu_count()} CPUs")  # fmt: skip
    scale = 1000 / n_ds
    rows.append(("synth time (1,000 DS-V3)", f"{wall:.1f} s ({cpu_synth:.0f} s CPU)" + (f" (x{scale:g} ~ {wall * scale:.0f} s)" if scale != 1 else ""), "< 120 s", verdict(wall * scale, 120)))  # fmt: skip
    rows.append(("trace size (1,000 DS-V3)", f"{size / GB:.3f} GB" + (f" (x{scale:g} ~ {size * scale / GB:.2f} GB)" if scale != 1 else ""), "< 3 GB", verdict(size * scale / GB, 3)))  # fmt: skip

    if not simulate:
        return rows
    # 2. DeepSeek-V3 simulation, lru, h100, 16 GB
    wall, rss, out = run(["sim", "--trace", str(ds), "--model", "deepseek-v3", "--hardware",
                          "h100-pcie5", "--cache-gb", "16", "--policy", "lru", "--json"])  # fmt: skip
    m = json.loads(out)
    print(f"sim lru deepseek-v3 x {n_ds} (h100-pcie5, 16 GB): {wall:.1f} s wall, {CPU['last']:.1f} s CPU "
          f"({m['run_wall_s']:.1f} s in the engine, {m['layer_steps']} layer steps, "
          f"{m['layer_steps_per_s']:.0f}/s), peak RSS {rss / GB:.2f} GB, hit rate {m['hit_rate']:.3f}")  # fmt: skip
    rows.append(("sim lru time (1,000 DS-V3)", f"{wall:.1f} s ({CPU['last']:.0f} s CPU)" + (f" (x{scale:g} ~ {wall * scale:.0f} s)" if scale != 1 else ""), "< 180 s", verdict(wall * scale, 180)))  # fmt: skip
    rows.append(("sim lru peak RSS", f"{rss / GB:.2f} GB", "< 4 GB", verdict(rss / GB, 4)))
    if fmoe_n > 0:
        rows += deepseek_fmoe(folder, fmoe_n, m["layer_steps"], n_ds)
    return rows


def deepseek_fmoe(
    folder: Path, n: int, full_steps: int, n_ds: int
) -> list[tuple[str, str, str, str]]:
    """``sim --policy fmoe`` of an ``n``-request DS-V3 trace (same synthesis, seed 0),
    extrapolated to the ``n_ds``-request trace's layer steps (``full_steps``, from the
    lru run): the run's fixed part (process start, bounds) plus its engine seconds per
    layer step times the full trace's steps. Labelled as extrapolated unless n == n_ds."""
    small = folder / f"deepseek-v3-{n}.trace"
    run(["trace", "synth", "--model", "deepseek-v3", "--num-requests", str(n), "--seed", "0",
         "--out", str(small)])  # fmt: skip
    # a one-request run first, untimed: numba compiles fMoE's kernels once a machine (its
    # disk cache), 10-30 s that a 5-request run would otherwise extrapolate per step
    warm = folder / "deepseek-v3-warm.trace"
    run(["trace", "synth", "--model", "deepseek-v3", "--num-requests", "1", "--seed", "1",
         "--out", str(warm)])  # fmt: skip
    run(["sim", "--trace", str(warm), "--model", "deepseek-v3", "--hardware", "h100-pcie5",
         "--cache-gb", "16", "--policy", "fmoe", "--json"])  # fmt: skip
    load0 = os.getloadavg()[0]
    wall, rss, out = run(["sim", "--trace", str(small), "--model", "deepseek-v3", "--hardware",
                          "h100-pcie5", "--cache-gb", "16", "--policy", "fmoe", "--json"])  # fmt: skip
    cpu = CPU["last"]
    load1 = os.getloadavg()[0]
    m = json.loads(out)
    steps, engine_s = m["layer_steps"], m["run_wall_s"]
    per_step = engine_s / max(steps, 1)
    est = (wall - engine_s) + per_step * full_steps
    # the same on CPU seconds (on a shared machine wall time includes waiting for a
    # core): the run's CPU split between its fixed part and its loop as its wall time is
    frac = engine_s / wall if wall > 0 else 0.0
    est_cpu = cpu * (1 - frac) + cpu * frac / max(steps, 1) * full_steps
    print(f"sim fmoe deepseek-v3 x {n} (h100-pcie5, 16 GB): {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"({engine_s:.1f} s in the engine, {steps} layer steps, {1e6 * per_step:.0f} us per "
          f"layer step), peak RSS {rss / GB:.2f} GB, hit rate {m['hit_rate']:.3f}; load average "
          f"{load0:.1f} before, {load1:.1f} after; extrapolated to {n_ds:,} requests "
          f"({full_steps} layer steps): {est:.0f} s wall, {est_cpu:.0f} s on CPU seconds")  # fmt: skip
    label = "measured" if n == n_ds else f"EXTRAPOLATED from {n} requests"
    value = f"~{est:.0f} s (~{est_cpu:.0f} s CPU; {label})"
    rows = [(f"sim fmoe time ({n_ds:,} DS-V3)", value, "< 300 s", verdict(est, 300))]
    rows.append(
        ("sim fmoe peak RSS", f"{rss / GB:.2f} GB ({n} requests)", "< 4 GB", verdict(rss / GB, 4))
    )
    return rows


def qwen(folder: Path, n_q: int, prompt: float, output: float) -> list[tuple[str, str, str, str]]:
    rows = []
    # 3. Qwen3-30B-A3B: M vs 10 M requests, lru, peak RSS ratio
    rss_of = {}
    for n in (n_q, 10 * n_q):
        q = folder / f"qwen3-30b-a3b-{n}.trace"
        wall_s, _, _ = run(["trace", "synth", "--model", "qwen3-30b-a3b", "--num-requests", str(n),
                            "--seed", "0", "--no-with-gate-probs", "--no-with-lookahead",
                            "--no-with-embeddings", "--prompt-len-mean", str(prompt),
                            "--output-len-mean", str(output), "--out", str(q)])  # fmt: skip
        wall, rss, out = run(["sim", "--trace", str(q), "--model", "qwen3-30b-a3b", "--hardware",
                              "h100-pcie5", "--cache-gb", "16", "--policy", "lru", "--json"])  # fmt: skip
        m = json.loads(out)
        rss_of[n] = rss
        print(f"qwen3-30b-a3b x {n}: synth {wall_s:.1f} s, file {q.stat().st_size / GB:.3f} GB; "
              f"sim lru {wall:.1f} s wall, {CPU['last']:.1f} s CPU ({m['layer_steps']} layer steps; "
              f"bounds {m['bound_wall_s']:.1f} s wall), peak RSS {rss / GB:.3f} GB")  # fmt: skip
    ratio = rss_of[10 * n_q] / rss_of[n_q]
    rows.append((f"RSS {10 * n_q:,} / {n_q:,} Qwen3 (lru)", f"{ratio:.3f}", "<= 1.2", verdict(ratio, 1.2, below=False)))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
