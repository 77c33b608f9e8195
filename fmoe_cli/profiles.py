"""`fmoe models` and `fmoe hardware`: list presets and their figures."""

from __future__ import annotations

import argparse

from fmoe_cli.common import add_json_flag, print_json, print_table
from specs.presets import hardware_preset_names, load_hardware, load_model, model_preset_names

GIB = 2**30  # tables print memory sizes in GiB, the unit of every *-gb flag; JSON keeps bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets (or show one) with their figures")
    p.add_argument("name", nargs="?", help="a preset name or a ModelSpec JSON path")
    add_json_flag(p)
    p.set_defaults(func=_models)
    p = sub.add_parser("hardware", help="list hardware presets (or show one) with their figures")
    p.add_argument("name", nargs="?", help="a preset name or a HardwareProfile JSON path")
    add_json_flag(p)
    p.set_defaults(func=_hardware)


def _models(args: argparse.Namespace) -> None:
    specs = [load_model(args.name)] if args.name else [load_model(n) for n in model_preset_names()]
    rows = [s.summary() for s in specs]
    if args.json:
        print_json(rows[0] if args.name else rows)
        return
    for row in rows:
        row["expert_GiB"] = row["expert_bytes"] / GIB
        row["model_GiB"] = row["model_bytes"] / GIB
    cols = [
        "name",
        "num_moe_layers",
        "num_experts",
        "top_k",
        "hidden_size",
        "dtype",
        "expert_GiB",
        "model_GiB",
        "runnable_on_cpu",
    ]
    print_table(rows, cols)
    if args.name:
        print("sources:")
        for s in specs[0].sources:
            print(f"  - {s}")


def _hardware(args: argparse.Namespace) -> None:
    profiles = (
        [load_hardware(args.name)]
        if args.name
        else [load_hardware(n) for n in hardware_preset_names()]
    )
    if args.json:
        rows = [p.summary() for p in profiles]
        print_json(rows[0] if args.name else rows)
        return
    rows = [
        {
            "name": p.name,
            "kind": p.kind,
            "gpus": p.num_gpus,
            "gpu": p.gpu.name,
            "gpu_mem_GiB": p.gpu.memory_bytes / GIB,
            "h2d_pinned_GB/s": p.link.pinned_bandwidth_Bps / 1e9,  # rates: 10^9 B/s
            "link_latency_us": p.link.latency_s * 1e6,
            "emulated_link": p.link.emulated,
        }
        for p in profiles
    ]
    print_table(rows)
    if args.name:
        print("sources:")
        for s in profiles[0].sources:
            print(f"  - {s}")
        if profiles[0].notes:
            print(f"notes: {profiles[0].notes}")
