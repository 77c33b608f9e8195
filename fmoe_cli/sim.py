"""`fmoe sim` (one simulation) and `fmoe sweep` (policies x cache sizes x traces).

Workloads: ``--trace PATH`` (the traces.io format) or ``--synth`` (traces.synth with its
defaults, for quick use). Offline mode (the paper's): ``--train PATH`` fits the policy on
another trace, ``--train-fraction F`` splits the trace into F train / 1-F test (``--offline``
is ``--train-fraction 0.7``); requests are then served closed loop unless ``--arrivals``
says otherwise. Cache budgets as in DESIGN.md: ``--cache-experts N`` / ``--cache-gb X`` in
total over all GPUs, ``--per-gpu-cache-gb X`` per GPU; sizes in GiB (2**30 bytes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from fmoe_cli import args as argt
from fmoe_cli.common import add_json_flag, parse_policy_opts, print_json, print_table
from specs.errors import InputError
from specs.presets import load_hardware, load_model

SUMMARY_KEYS = [
    "policy",
    "hit_rate",
    "ttft_mean_s",
    "ttft_p99_s",
    "tpot_mean_s",
    "tpot_p99_s",
    "e2e_mean_s",
    "e2e_p99_s",
    "bytes_h2d",
    "prefetch_accuracy",
    "stall_s",
    "layer_steps",
    "wall_s",
]
# the simulator's table: the shared metrics with each bound beside what it bounds (the
# real executor reports SUMMARY_KEYS, not the bounds: they come from the simulator)
SIM_TABLE_KEYS = [
    *SUMMARY_KEYS[: SUMMARY_KEYS.index("hit_rate") + 1],
    "bound_hit_belady",
    *SUMMARY_KEYS[SUMMARY_KEYS.index("hit_rate") + 1 : SUMMARY_KEYS.index("tpot_p99_s") + 1],
    "bound_tpot_s",
    *SUMMARY_KEYS[SUMMARY_KEYS.index("tpot_p99_s") + 1 :],
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="simulate one policy on a workload and print its metrics")
    _workload_flags(p, many=False)
    p.add_argument("--policy", required=True, help="policy name (see `fmoe policies`)")
    p.add_argument(
        "--policy-opt", action="append", metavar="K=V", help="policy option (repeatable)"
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-experts", type=argt.count, help="expert cache in experts, total over GPUs"
    )
    cache.add_argument(
        "--cache-gb", type=argt.gib, help="expert cache in GiB (2^30 bytes), total over GPUs"
    )
    cache.add_argument(
        "--per-gpu-cache-gb",
        type=argt.gib,
        help="expert cache in GiB (2^30 bytes) on each GPU",
    )
    _run_flags(p)
    p.add_argument(
        "--chrome-trace",
        type=argt.output_file,
        metavar="FILE",
        help="write transfers and compute per GPU (Perfetto)",
    )
    p.add_argument(
        "--requests-out",
        type=argt.output_file,
        metavar="FILE.csv",
        help="write the per-request records as CSV",
    )
    add_json_flag(p)
    p.set_defaults(func=_sim)

    p = sub.add_parser(
        "sweep", help="simulate policies x cache sizes x traces; results table and plots"
    )
    _workload_flags(p, many=True)
    p.add_argument(
        "--policies", type=argt.names, required=True, help="comma-separated policy names"
    )
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-gb", type=_float_list, help="comma-separated totals in GiB (2^30 bytes)"
    )
    cache.add_argument("--cache-experts", type=_int_list, help="comma-separated totals in experts")
    p.add_argument("--per-gpu", action="store_true", help="the cache sizes are per GPU")
    _run_flags(p)
    p.add_argument(
        "--workers", type=argt.workers, default=1, help="local worker processes (default 1)"
    )
    p.add_argument(
        "--ray",
        type=argt.ray_address,
        metavar="ADDRESS",
        help="run on a Ray cluster ('local' starts one here)",
    )
    p.add_argument(
        "--out",
        type=argt.output_dir,
        required=True,
        help="directory for the results table and PNG plots",
    )
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=_sweep)


# -- flags --------------------------------------------------------------------------------
_float_list = argt.listed(argt.gib, "positive numbers of GB")
_int_list = argt.listed(argt.count, "positive integers")


def _workload_flags(p: argparse.ArgumentParser, many: bool) -> None:
    p.add_argument("--model", help="model preset or ModelSpec JSON (default: the trace's model)")
    p.add_argument("--hardware", required=True, help="hardware preset or HardwareProfile JSON")
    src = p.add_mutually_exclusive_group(required=True)
    if many:
        src.add_argument(
            "--traces",
            nargs="+",
            type=argt.input_file,
            metavar="PATH",
            help="trace files (traces.io format)",
        )
    else:
        src.add_argument(
            "--trace", type=argt.input_file, metavar="PATH", help="a trace file (traces.io format)"
        )
    src.add_argument(
        "--synth", action="store_true", help="a synthetic workload (traces.synth defaults)"
    )
    p.add_argument(
        "--synth-requests", type=argt.count, default=100, help="requests of --synth (default 100)"
    )
    p.add_argument(
        "--synth-rate",
        type=argt.rate,
        default=0.0,
        help="arrivals per second of --synth (0: all at t=0)",
    )
    train = p.add_mutually_exclusive_group()
    train.add_argument(
        "--train",
        type=argt.input_file,
        metavar="PATH",
        help="offline mode: fit the policy on this trace",
    )
    train.add_argument(
        "--train-fraction",
        type=argt.fraction,
        metavar="F",
        help="offline mode: fit on F of the trace",
    )
    train.add_argument(
        "--offline", action="store_true", help="offline mode with the paper's 70/30 split"
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=argt.batch, default=1)
    p.add_argument("--batching", choices=["static", "continuous"], default="continuous")
    p.add_argument(
        "--arrivals",
        choices=["auto", "trace", "closed", "schedule"],
        default="auto",
        help="trace arrival times, or closed loop (auto: closed in offline mode); schedule: "
        "the iterations a trace of fmoe serve --capture was served in",
    )
    p.add_argument("--prefetch-distance", type=argt.layers, help="d, passed to the policy")
    p.add_argument(
        "--chunk-mb", type=argt.chunk_mb, default=16.0, help="preemption chunk of a copy, MiB"
    )
    p.add_argument(
        "--kv-reserve-gb",
        type=argt.gib_or_zero,
        default=0.0,
        help="GPU memory kept for the KV cache, GiB in total",
    )
    p.add_argument(
        "--pageable", action="store_true", help="copies from pageable (not pinned) host memory"
    )
    p.add_argument(
        "--warm-start", action="store_true", help="fill the caches layer by layer before the run"
    )
    p.add_argument("--seed", type=argt.seed, default=0)
    p.add_argument(
        "--cache-scope",
        choices=["global", "per-layer"],
        default="global",
        help="one slot pool per GPU, or an equal share per MoE layer",
    )
    p.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let the policy take lossy miss actions (low-bit copy, skip); counted in results",
    )
    p.add_argument(
        "--lowbit-format",
        choices=["fp8", "int8", "int4"],
        default="int4",
        help="weight format of the low-bit copy a lossy miss fetches",
    )
    p.add_argument(
        "--weight-format",
        choices=["bf16", "fp16", "fp8", "int8", "int4", "q4_k_m"],
        help="run the model's weights in this format (expert and dense bytes; default: its "
        "dtype); int4 is uniform Q4_K, q4_k_m llama.cpp's Q4_K_M mix",
    )


# -- building inputs ----------------------------------------------------------------------------
def _config(args: argparse.Namespace, spec: Any, **extra: Any) -> Any:
    from sim.config import SimConfig

    if getattr(args, "weight_format", None):
        spec = spec.with_weight_format(args.weight_format)
    try:
        return SimConfig(
            model=spec,
            hardware=load_hardware(args.hardware),
            batch_size=args.batch_size,
            batching=args.batching,
            arrivals=args.arrivals,
            prefetch_distance=args.prefetch_distance,
            chunk_bytes=max(1, int(args.chunk_mb * 2**20)),
            kv_reserve_gb=args.kv_reserve_gb,
            pinned=not args.pageable,
            warm_start=args.warm_start,
            seed=args.seed,
            offline=args.offline,
            train_fraction=args.train_fraction,
            cache_scope=args.cache_scope,
            allow_lossy=args.allow_lossy,
            lowbit_format=args.lowbit_format,
            **extra,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise InputError(f"bad simulation setting {where}: {err['msg']}") from None


def _load_trace(path: str, spec: Any | None, what: str = "trace") -> Any:
    from sim.run import check_workload_model
    from traces.io import load_workload

    if not Path(path).is_file():
        raise InputError(f"{what} {path}: no such file")
    w = load_workload(path)
    if spec is not None:
        check_workload_model(w, spec, f"{what} {path}")
    return w


def _synth(args: argparse.Namespace, spec: Any) -> Any:
    from traces.synth import SynthConfig, generate

    if spec is None:
        raise InputError("--synth needs --model")
    return generate(
        spec,
        SynthConfig(num_requests=args.synth_requests, seed=args.seed, arrival_rate=args.synth_rate),
    )


def _model_and_workload(args: argparse.Namespace) -> tuple[Any, Any]:
    spec = load_model(args.model) if args.model else None
    if args.synth:
        w = _synth(args, spec)
    else:
        w = _load_trace(args.trace, spec)
    return spec or w.spec, w


def _training(args: argparse.Namespace, spec: Any) -> Any:
    return _load_trace(args.train, spec, "training trace") if args.train else None


# -- handlers -------------------------------------------------------------------------------------
def _sim(args: argparse.Namespace) -> int:
    from sim.events import write_chrome_trace
    from sim.run import simulate
    from sim.sweep import save_results

    spec, workload = _model_and_workload(args)
    cache: dict[str, Any] = {}
    if args.cache_experts is not None:
        cache = {"cache_experts": args.cache_experts}
    elif args.cache_gb is not None:
        cache = {"cache_gb": args.cache_gb}
    elif args.per_gpu_cache_gb is not None:
        cache = {"cache_gb": args.per_gpu_cache_gb, "cache_per_gpu": True}
    cfg = _config(
        args,
        spec,
        policy=args.policy,
        policy_options=parse_policy_opts(args.policy_opt),
        record_events=bool(args.chrome_trace),
        **cache,
    )
    result = simulate(workload, cfg, _training(args, spec))
    if args.chrome_trace:
        assert result.events is not None
        write_chrome_trace(result.events, args.chrome_trace)
    if args.requests_out:
        save_results(result.requests, args.requests_out, "csv")
    if args.json:
        print_json(result.metrics)
    else:
        m = result.metrics
        print_table([{k: m.get(k) for k in SIM_TABLE_KEYS}])
        print(
            f"requests {m['requests']}  iterations {m['iterations']}  makespan {m['makespan_s']:.4g} s  "
            f"cache {m['cache_experts']} experts per GPU  link busy {[round(x, 4) for x in m['link_busy_s']]} s"
        )
        if m.get("bound_hit_belady") is not None:
            print(
                f"bounds: MIN hit rate {m['bound_hit_belady']:.4f} (loading on demand; prefetching "
                f"may pass it), fewest loads {m['bound_loads_min']} (this run {m['loads']}), "
                f"TPOT floor {m['bound_tpot_s']:.4g} s (docs/bounds.md)"
            )
        else:
            print(f"bounds: none ({m.get('bound_note')})")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from policies.registry import policy_class
    from sim.sweep import SweepGrid, run_sweep, save_results

    for name in args.policies:  # an unknown name fails here, not in every grid cell
        policy_class(name)
    spec = load_model(args.model) if args.model else None
    workloads: dict[str, Any] = {}
    if args.synth:
        workloads["synth"] = _synth(args, spec)
        traces = ["synth"]
    else:
        traces = list(args.traces)
        if spec is None:  # the first trace names the model; the others must match it
            spec = _load_trace(traces[0], None).spec
        for t in traces:
            _load_trace(t, spec)
    base = _config(args, spec, cache_per_gpu=args.per_gpu, training=_training(args, spec))
    if args.ray:
        argt.probe_ray(args.ray)
    grid = SweepGrid(
        base=base,
        policies=args.policies,
        traces=traces,
        cache_gb=args.cache_gb,
        cache_experts=args.cache_experts,
    )
    df = run_sweep(
        grid,
        workers=args.workers,
        ray_address=args.ray,
        workloads=workloads,
        progress=not args.quiet,
    )
    out = Path(args.out)
    table = save_results(df, out / f"results.{args.format}", args.format)
    plots = []
    if not args.no_plots:
        from sim.plots import plot_all

        plots = plot_all(df, out)
    failed = df[df["error"].notna()]
    for _, row in failed.iterrows():
        sys.stderr.write(f"fmoe sweep: {row['policy']} on {row['trace']}: {row['error']}\n")
    if args.json:
        print_json(
            {
                "results": str(table),
                "plots": [str(p) for p in plots],
                "rows": df.to_dict(orient="records"),
            }
        )
    else:
        cols = [
            "trace",
            "policy",
            "cache_gb_budget",
            "cache_experts_budget",
            "hit_rate",
            "bound_hit_belady",
            "ttft_mean_s",
            "tpot_mean_s",
            "bound_tpot_s",
            "e2e_mean_s",
            "error",
        ]
        print_table(df[[c for c in cols if c in df]].to_dict(orient="records"))
        print(f"results: {table}")
        for p in plots:
            print(f"plot: {p}")
    # every combination refused (a CPU miss without host figures, a lossy action not opted
    # into, a per-layer scope too small, ...): bad input, as `fmoe sim` reports it
    return 2 if len(df) and len(failed) == len(df) else 0
