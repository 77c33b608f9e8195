"""The run bounds alone at scale (issue 21): their time and peak memory on a trace, through
the temporary file (sim/bounds_stream.py) and, with ``--in-memory``, the in-memory path.

Each path runs in its own process, which loads the trace, notes its peak RSS
(``ru_maxrss``), computes the bounds of one ``fmoe sim`` configuration (batch 1, trace
arrivals, the given hardware and cache) and notes its peak RSS, wall and CPU time again.
The bounds' values are printed so the paths can be compared (they must be equal).

    python benchmarks/bounds_scale.py TRACE --model deepseek-v3 [--hardware h100-pcie5]
        [--cache-gb 16] [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
from policies.placement import Placement
from sim.bounds import run_bounds
from sim.config import SimConfig
from sim.memory import cache_capacities
from specs.presets import load_hardware, load_model
from traces.io import load_workload

path, model, hw, gb, spill = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
spec = load_model(model)
w = load_workload(path)
cfg = SimConfig(model=spec, hardware=load_hardware(hw), cache_gb=gb)
caps = cache_capacities(cfg, Placement(spec.num_moe_layers, spec.num_experts, cfg.hardware.num_gpus))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0, c0 = time.perf_counter(), time.process_time()
b = run_bounds(w, cfg, caps, closed=False, spill=spill)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
b.pop("bound_wall_s")
print(json.dumps({"bounds": b, "wall_s": wall, "cpu_s": cpu, "rss_before": rss0, "rss_after": rss1,
                  "tokens": w.num_tokens, "requests": len(w.requests)}))
"""


def measure(trace: str, model: str, hardware: str, cache_gb: float, spill: bool) -> dict:
    """One path in a fresh process (see the module doc)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", _CHILD, trace, model, hardware, str(cache_gb), str(int(spill))]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bounds on {trace} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--model", required=True)
    ap.add_argument("--hardware", default="h100-pcie5")
    ap.add_argument("--cache-gb", type=float, default=16.0)
    ap.add_argument("--in-memory", action="store_true", help="also run the in-memory path")
    args = ap.parse_args()
    paths = [("file", True)] + ([("in memory", False)] if args.in_memory else [])
    for name, spill in paths:
        r = measure(args.trace, args.model, args.hardware, args.cache_gb, spill)
        gb = 1e9
        print(
            f"{name:9s}: {r['requests']} requests, {r['tokens']} tokens: bounds {r['wall_s']:.1f} s "
            f"wall, {r['cpu_s']:.1f} s CPU; peak RSS {r['rss_before'] / gb:.3f} GB after loading, "
            f"{r['rss_after'] / gb:.3f} GB after the bounds (+{(r['rss_after'] - r['rss_before']) / gb:.3f})"
        )
        print(f"{'':9s}  {json.dumps(r['bounds'])}")


if __name__ == "__main__":
    main()
