"""`fmoe demo`: the paper's main comparison in simulation, on embedded default workloads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fmoe_cli import args as argt
from fmoe_cli.common import add_json_flag, print_json, print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="fMoE vs the baselines on Mixtral-8x7B / paper-6x3090 in simulation (the paper's Fig. 10)",
    )
    p.add_argument(
        "--out", type=argt.output_dir, default="demo_out", help="folder for CSV and PNG results"
    )
    p.add_argument("--model", default="mixtral-8x7b", help="model preset or ModelSpec JSON")
    p.add_argument("--hardware", default="paper-6x3090", help="hardware preset or profile JSON")
    p.add_argument(
        "--num-requests",
        type=argt.integer(4, argt.MAX_COUNT),  # PaperSetup: 70% train, 30% measured, >= 4
        default=30,
        help="requests per workload",
    )
    p.add_argument(
        "--cache-gb", type=argt.gib, default=24.0, help="total expert cache in GiB (2^30 bytes)"
    )
    p.add_argument("--workers", type=argt.workers, default=2, help="simulation processes")
    p.add_argument("--seed", type=argt.seed, default=0)
    add_json_flag(p)
    p.set_defaults(func=_demo)


def _figures(hardware: str) -> str:
    from specs.presets import load_hardware

    kind = load_hardware(hardware).kind
    return {
        "published": "published hardware figures, not measured",
        "calibrated": "calibrated profile",
    }.get(kind, f"{kind} profile")


def _demo(args: argparse.Namespace) -> None:
    from sim.paper import (
        DEMO_POLICIES,
        PaperSetup,
        policy_table,
        reductions,
        run_policies,
        save_csv,
    )
    from sim.paper_plots import policy_bars, reduction_bars

    setup = PaperSetup(
        model=args.model,
        hardware=args.hardware,
        num_requests=args.num_requests,
        cache_gb=args.cache_gb,
        workers=args.workers,
        seed=args.seed,
    )
    from specs.presets import load_model

    load_model(setup.model)  # a bad model or profile fails in one line, before the banner
    figures = _figures(setup.hardware)
    out = Path(args.out)
    sys.stderr.write(
        f"fmoe demo: {setup.model} on {setup.hardware} ({figures}), "
        f"synthetic LMSYS-Chat-like and ShareGPT-like workloads of {setup.num_requests} requests "
        f"(70% fill the stores, 30% measured), expert cache {setup.cache_gb:g} GiB total\n"
    )
    t0 = time.perf_counter()
    df = run_policies(setup, DEMO_POLICIES, progress=not args.json)
    table = policy_table(df)
    red = reductions(df)
    save_csv(df, out / "demo_runs.csv")
    save_csv(red, out / "demo_reductions.csv")
    plots = [
        policy_bars(df, out / "demo_policies.png", DEMO_POLICIES),
        reduction_bars(red, out / "demo_reductions.png"),
    ]
    wall = time.perf_counter() - t0
    if args.json:
        print_json(
            {
                "setup": setup.model_dump(),
                "runs": table.to_dict(orient="records"),
                "reductions": red.to_dict(orient="records"),
                "plots": [str(p) for p in plots],
                "wall_s": wall,
                "source": "simulation with published hardware figures and synthetic workloads",
            }
        )
        return
    print(
        f"Per policy (simulated; {setup.model}, {setup.hardware}, {setup.cache_gb:g} GiB expert cache)"
    )
    print_table(table.to_dict(orient="records"))
    print(
        "bounds (same for every policy of a workload): bound_hit_belady = Belady's MIN hit rate "
        "loading on demand (prefetching may pass it); bound_tpot_s = TPOT floor: the larger of "
        "the compute and MIN's fewest copies at full link bandwidth (docs/bounds.md)"
    )
    print()
    print(
        "fMoE's reduction vs each baseline (mean over both workloads) beside the paper's Figure 10"
    )
    print_table(red.to_dict(orient="records"))
    print()
    print(
        f"wrote {out / 'demo_runs.csv'}, {out / 'demo_reductions.csv'}, "
        + ", ".join(str(p) for p in plots)
    )
    print(f"simulated in {wall:.0f} s")
