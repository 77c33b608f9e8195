"""`fmoe calibrate`: measure this machine (bench) and the simulator's error (validate).

- ``fmoe calibrate bench [--device cpu|cuda] [--model M] [--link-gbps G] --out PROFILE.json``
  times the link, expert FFN, dense/attention, head, the executor's per-layer overhead
  and an async policy's search time on this machine, fits the profile's cost model
  and writes a calibrated HardwareProfile (atomically). A progress bar goes to stderr.
- ``fmoe calibrate validate --profile PROFILE.json [--model M] [--batch-size B]
  [--batching static|continuous] [--output-lens fixed|reference] [--repeats N] [--out DIR]
  [--json]`` runs the real executor and the
  simulator (static batches of B, or continuous batching up to B; closed loop)
  on the same captured workload over policies
  x cache sizes and reports the simulator's error per metric (table or one JSON
  document; CSV files and a PNG under --out).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fmoe_cli import args as argt
from fmoe_cli.budgets import add_link_time_flag, check_bench_memory, check_link_time
from fmoe_cli.common import (
    add_batch_size_flag,
    add_json_flag,
    add_output_lens_flag,
    add_prompt_flags,
    print_json,
    print_table,
    prompt_options,
)

_names = argt.names
_ints = argt.listed(argt.count, "positive integers")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _sizes(text: str) -> list[int]:
    """Comma-separated byte counts with an optional binary suffix K, M or G."""
    out = []
    for t in _names(text):
        num, unit = (t[:-1], t[-1].upper()) if t[-1].upper() in "KMG" else (t, "")
        try:
            n = int(float(num) * _UNITS[unit])
        except (ValueError, OverflowError):  # not a number, nan, inf
            n = 0
        if not 1 <= n <= argt.MAX_COPY_BYTES:
            raise argparse.ArgumentTypeError(f"expected byte counts like 4K,1M,256M, got {text!r}")
        out.append(n)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure this machine; validate the simulator against it")
    cs = p.add_subparsers(dest="calibrate_command", metavar="SUBCOMMAND")
    _register_bench(cs)
    _register_validate(cs)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    """`fmoe calibrate` alone: one line naming the subcommands (exit 2)."""
    sys.stderr.write(f"{p.prog}: error: no subcommand given (one of: bench, validate)\n")
    return 2


def _register_bench(cs: argparse._SubParsersAction) -> None:
    b = cs.add_parser("bench", help="microbenchmarks -> a calibrated hardware profile")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    b.add_argument("--num-devices", type=argt.devices, help="GPUs to measure (default: all)")
    b.add_argument(
        "--model", default="tiny-mixtral-wide", help="tiny preset or local checkpoint directory"
    )
    b.add_argument(
        "--link-gbps",
        type=argt.gbps,
        help="CPU: emulate a host link of this many GB/s (10^9 bytes/s)",
    )
    b.add_argument(
        "--link-latency-us", type=argt.latency_us, help="CPU: the emulated link's latency"
    )
    add_link_time_flag(b)
    b.add_argument("--threads", type=argt.threads, help="torch threads (as `fmoe run`)")
    b.add_argument("--repeats", type=argt.rounds, default=7, help="rounds per point")
    b.add_argument(
        "--max-tokens", type=argt.integer(1, 2**16), default=128, help="largest prefill timed"
    )
    b.add_argument("--max-context", type=argt.tokens, default=256, help="longest KV timed")
    b.add_argument(
        "--policies",
        type=_names,
        help="policies whose executor overhead is measured (default: lru,lfu,mixtral-offloading,fmoe)",
    )
    b.add_argument("--overhead-rounds", type=argt.rounds, default=4)
    b.add_argument(
        "--search-store-rows",
        type=argt.count,
        default=256,
        help="iterations in the expert map store while an async policy's search is timed",
    )
    b.add_argument(
        "--interference-rounds",
        type=argt.rounds,
        default=7,
        help="rounds of (idle, copying, idle) decode steps for the copy interference (default 7)",
    )
    b.add_argument("--store", choices=["auto", "ram", "file"], default="auto")
    b.add_argument(
        "--link-sizes",
        type=_sizes,
        help="copy sizes to time, e.g. 4K,1M,256M (default: one expert row down by halves)",
    )
    b.add_argument(
        "--expert-shapes",
        type=_names,
        default=[],
        help="also time the expert FFN of these model presets' real shapes, "
        "e.g. mixtral-8x7b,qwen3-30b-a3b,deepseek-v3 (random weights)",
    )
    b.add_argument("--shape-tokens", type=_ints, help="token counts for --expert-shapes")
    b.add_argument(
        "--shape-dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="default bf16"
    )
    b.add_argument("--name", help="profile name (default: calibrated-DEVICE-MODEL)")
    b.add_argument("--seed", type=argt.seed, default=0)
    b.add_argument("--out", type=argt.output_file, required=True, help="profile JSON to write")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_flag(b)
    b.set_defaults(func=_cmd_bench)


def _register_validate(cs: argparse._SubParsersAction) -> None:
    v = cs.add_parser("validate", help="simulator vs real executor on the same workload")
    v.add_argument("--profile", required=True, help="calibrated profile JSON (or a preset name)")
    v.add_argument("--model", help="model (default: the one the profile was fitted for)")
    v.add_argument("--device", choices=["cpu", "cuda"], help="default: the profile's device")
    v.add_argument(
        "--policies", type=_names, help="comma-separated (default: lru,mixtral-offloading,fmoe)"
    )
    v.add_argument(
        "--cache-experts",
        type=_ints,
        help="comma-separated cache sizes in experts (default: 1/4, 1/2, 3/4 of all experts)",
    )
    add_prompt_flags(v, max_prompt_tokens=64, explicit=False)
    add_batch_size_flag(v)
    add_output_lens_flag(v)
    v.add_argument(
        "--repeats",
        type=argt.rounds,
        default=1,
        help="real runs per policy x cache (interleaved); real figures are their medians "
        "and their spread is reported beside the error (default 1)",
    )
    v.add_argument("--store", choices=["auto", "ram", "file"], default="auto")
    add_link_time_flag(v)
    v.add_argument("--seed", type=argt.seed, default=0)
    v.add_argument(
        "--out",
        type=argt.output_dir,
        help="directory for runs.csv, requests.csv, summary.json, PNG",
    )
    v.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_json_flag(v)
    v.set_defaults(func=_cmd_validate)


class _Bar:
    """A tqdm bar on stderr whose messages also go to stderr (tqdm.write defaults to stdout,
    which must hold nothing but the --json document)."""

    def __init__(self, disabled: bool) -> None:
        from tqdm import tqdm

        self._tqdm = tqdm
        self._disabled = disabled
        self.bar = tqdm(file=sys.stderr, disable=disabled, unit="step", dynamic_ncols=True)

    def reset(self, total: int | None = None) -> None:
        self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def write(self, s: str) -> None:
        self._tqdm.write(s, file=sys.stderr)

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _bar(disabled: bool) -> Any:
    return _Bar(disabled)


def _cmd_bench(args: argparse.Namespace) -> int:
    from calibration.bench import DEFAULT_POLICIES, BenchConfig, execute_bench, prepare_bench
    from policies.registry import policy_class

    for name in args.policies or []:
        policy_class(name)
    check_link_time(args.model, args.link_gbps, args.link_latency_us, args.link_time_limit_s)
    check_bench_memory(args.model, args.max_tokens, args.max_context, args.link_sizes)
    cfg = BenchConfig(
        model=args.model,
        device=args.device,
        num_devices=args.num_devices,
        link_gbps=args.link_gbps,
        link_latency_us=args.link_latency_us,
        threads=args.threads,
        repeats=args.repeats,
        max_tokens=args.max_tokens,
        max_context=args.max_context,
        policies=args.policies or list(DEFAULT_POLICIES),
        overhead_rounds=args.overhead_rounds,
        interference_rounds=args.interference_rounds,
        store=args.store,
        seed=args.seed,
        name=args.name,
        search_store_rows=args.search_store_rows,
        link_sizes=args.link_sizes,
        expert_shapes=args.expert_shapes,
        shape_tokens=args.shape_tokens,
        shape_dtype=args.shape_dtype,
    )
    prep = prepare_bench(cfg)
    with _bar(args.no_progress) as bar:
        result = execute_bench(prep, bar)
    result.profile.to_json(args.out)
    summary = {"path": args.out, **result.summary()}
    if args.json:
        print_json(summary)
        return 0
    summary.pop("measurements")
    errors = summary.pop("fit_errors")
    print_table([{"figure": k, "value": v} for k, v in summary.items()])
    print_table([{"fit": k, "mape": v} for k, v in errors.items()])
    return 0


def _check_profile_link(args: argparse.Namespace) -> None:
    """The emulated link validate rebuilds from the profile (calibration.validate) must
    copy the model's experts within --link-time-limit-s, as `fmoe run --link-gbps`."""
    from specs.presets import load_hardware

    profile = load_hardware(args.profile)
    lk = profile.link
    model = args.model or profile.compute.fitted_for_model
    if (args.device or profile.device) != "cpu" or not lk.emulated or model is None:
        return
    gbps = lk.emulated_gbps or lk.pinned_bandwidth_Bps / 1e9
    lat = lk.emulated_latency_us if lk.emulated_gbps is not None else lk.latency_s * 1e6
    check_link_time(model, gbps, lat, args.link_time_limit_s, source=f"{args.profile} link")


_RUN_COLUMNS = [
    "policy",
    "cache_experts",
    "real_ttft_mean_s",
    "sim_ttft_mean_s",
    "real_tpot_mean_s",
    "sim_tpot_mean_s",
    "real_hit_rate",
    "sim_hit_rate",
    "real_stall_s",
    "sim_stall_s",
    "ttft_mean_ape",
    "tpot_mean_ape",
    "hit_rate_abs_error",
    "compute_slowdown",
    "sim_tpot_mean_s_drift",
]


def _cmd_validate(args: argparse.Namespace) -> int:
    from calibration.validate import (
        DEFAULT_POLICIES,
        ValidateConfig,
        execute_validation,
        prepare_validation,
    )
    from policies.registry import policy_class

    for name in args.policies or []:
        policy_class(name)
    _check_profile_link(args)
    cfg = ValidateConfig(
        profile=args.profile,
        model=args.model,
        device=args.device,
        policies=args.policies or list(DEFAULT_POLICIES),
        cache_experts=args.cache_experts,
        **prompt_options(args),
        repeats=args.repeats,
        store=args.store,
        seed=args.seed,
        out=args.out,
    )
    prep = prepare_validation(cfg)
    with _bar(args.no_progress) as bar:
        result = execute_validation(prep, bar)
    if args.json:
        print_json(result.to_json())
        return 0
    columns = _RUN_COLUMNS + (["real_tpot_mean_spread"] if cfg.repeats > 1 else [])
    columns = [c for c in columns if c in result.runs.columns]  # no drift without a probe
    print_table(result.runs[columns].to_dict(orient="records"))
    print()
    s = result.summary
    rows = [
        {"metric": k, "error": s[k], "target": t["target"], "met": t["met"]}
        for k, t in s["targets"].items()
    ]
    rows += [
        {"metric": k, "error": s[k], "target": "", "met": ""}
        for k in (
            "e2e_mape",
            "ttft_mape_run_means",
            "tpot_mape_run_means",
            "hit_rate_abs_error_mean",
            "stall_abs_error_s_mean",
            "stall_share_abs_error_mean",
        )
    ]
    print_table(rows)
    print(
        f"compute slowdown vs the profile (median over runs): {s['compute_slowdown_median']:.3g}"
        " (machine load while validating; 1 = as when benched)"
    )
    drift = s.get("drift_corrected")
    if drift:
        print(
            "with each cell simulated on compute scaled by its slowdown: "
            + ", ".join(f"{k} {v:.3g}" for k, v in drift.items() if v is not None)
        )
    if result.files:
        print(f"wrote {', '.join(result.files.values())}")
    if s.get("emulated_link"):
        print("(host link emulated on the CPU)")
    return 0
