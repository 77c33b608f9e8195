"""How long `fmoe trace mrc` takes on a 1,000-request Mixtral-8x7B trace (goal: < 60 s).

Generates the trace with the synthetic generator's defaults (or reads ``--trace``), then
times what `fmoe trace mrc` runs (every curve out of core: the demands spilled to
temporary files, all six stack passes in one read) and, for the breakdown, each part in
memory: the demand sequence, the global stacks (LRU, LFU, MIN) and the per-layer ones,
plus MIN at one size (the simulator's bound), and prints the figures. The numba kernels are compiled (or loaded from numba's cache) before timing;
the compile time is printed apart.

    python benchmarks/mrc_speed.py [--requests 1000] [--trace PATH]
"""

from __future__ import annotations

import argparse
import time

from specs.presets import load_model
from traces.cachesim import hits_by_capacity, min_run
from traces.demand import demand_sequence, next_use
from traces.io import load_workload
from traces.mrc import miss_ratio_curves, per_layer_curves
from traces.synth import SynthConfig, generate
from traces.types import Request, Routing, Workload


def _warm_up() -> float:
    """Compile (or load) the kernels on a tiny sequence; returns the seconds it took."""
    spec = load_model("mixtral-8x7b")
    t0 = time.perf_counter()
    tiny = generate(spec, SynthConfig(num_requests=1, seed=0))
    seq = demand_sequence(tiny)
    for p in ("lru", "lfu", "min"):
        hits_by_capacity(seq, p)
    min_run(seq, 4)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--trace", help="a trace file instead of a synthetic one")
    args = ap.parse_args()
    compile_s = _warm_up()
    if args.trace:
        w = load_workload(args.trace)
    else:
        spec = load_model("mixtral-8x7b")
        cfg = SynthConfig(
            num_requests=args.requests,
            seed=0,
            with_gate_probs=False,
            with_embeddings=False,
            with_lookahead=False,
        )
        w = generate(spec, cfg)
        w = Workload(  # routing only: what the curves read
            spec,
            [
                Request(
                    r.request_id,
                    r.arrival_s,
                    r.prompt_len,
                    r.output_len,
                    Routing(r.routing.topk_ids, r.routing.topk_weights),
                )
                for r in w.requests
            ],
        )
    spec = w.spec
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    streamed = miss_ratio_curves(w)
    streamed_s, streamed_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    times: dict[str, float] = {}
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    seq = demand_sequence(w)
    nxt = next_use(seq)
    times["demand sequence + next use"] = time.perf_counter() - t0
    for p in ("lru", "lfu", "min"):
        t = time.perf_counter()
        hits_by_capacity(seq, p, nxt)
        times[f"global {p} stack"] = time.perf_counter() - t
    t = time.perf_counter()
    per_layer_curves(seq, spec.num_moe_layers, spec.top_k)
    times["per-layer stacks (3 policies)"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    t = time.perf_counter()
    min_run(seq, spec.total_experts // 4, nxt=nxt)
    min_one = time.perf_counter() - t
    print(
        f"{spec.name}: {len(w.requests)} requests, {w.num_iterations} iterations, "
        f"{seq.num_demands} expert demands in {seq.num_steps} layer steps"
    )
    print(f"  {'fmoe trace mrc (out of core)':32s} {streamed_s:7.2f} s   (goal: < 60 s)")
    print(
        f"  {'  of which CPU time':32s} {streamed_cpu:7.2f} s   (wall > CPU: other processes ran)"
    )
    print(f"  ({len(streamed)} curves; in memory, part by part:)")
    for k, v in times.items():
        print(f"  {k:32s} {v:7.2f} s")
    print(f"  {'all curves in memory':32s} {total:7.2f} s")
    print(f"  {'  of which CPU time':32s} {cpu:7.2f} s")
    print(f"  {'MIN at one size (heap)':32s} {min_one:7.2f} s")
    print(f"  numba compile or cache load: {compile_s:.2f} s (once per process)")


if __name__ == "__main__":
    main()
