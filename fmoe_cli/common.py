"""Helpers shared by command modules: JSON output, tables, argument types."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from fmoe_cli import args as argt
from specs.errors import InputError


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def print_json(payload: Any) -> None:
    """Exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, default=_jsonable, indent=2) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """A plain aligned text table on stdout."""
    if not rows:
        print("(nothing)")
        return
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


# Unbounded-above forms kept for plugins and older modules; new flags use fmoe_cli.args.
positive_int = argt.integer(1)
positive_float = argt.number(0, lo_open=True)
non_negative_float = argt.number(0)
gb_or_auto = argt.gib_or_auto


def parse_policy_opts(items: list[str] | None) -> dict[str, Any]:
    """`--policy-opt key=value` pairs; values parsed as JSON when they can be."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise InputError(f"--policy-opt expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value, parse_constant=_no_constant, parse_float=_finite)
        except json.JSONDecodeError:
            out[key] = value
        except ValueError as exc:
            raise InputError(f"--policy-opt {item!r}: {exc}") from None
    return out


def _finite(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} is not a finite number")
    return v


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def add_batch_size_flag(p: argparse.ArgumentParser) -> None:
    """``--batch-size B`` and ``--batching`` of commands that run a real model (closed loop)."""
    from sim.batching import BATCHERS  # the simulator's batchers: one list of names

    p.add_argument(
        "--batch-size",
        type=argt.batch,
        default=1,
        help="static: prompts per batch (left-padded; a batch runs until all its rows "
        "finish); continuous: requests running at once",
    )
    p.add_argument(
        "--batching",
        choices=list(BATCHERS),
        default="static",
        help="static batches, or continuous (iteration-level) batching up to --batch-size",
    )


def add_output_lens_flag(p: argparse.ArgumentParser) -> None:
    """``--output-lens`` of commands that run a real model (realrun.output_lens)."""
    from realrun.output_lens import OUTPUT_LENS

    p.add_argument(
        "--output-lens",
        choices=list(OUTPUT_LENS),
        default="fixed",
        help="fixed: every request generates --max-new-tokens; reference: as many tokens as "
        "its prompt's reference answer (capped by --max-new-tokens), so requests finish apart",
    )


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout")


def add_prompt_flags(
    p: argparse.ArgumentParser,
    *,
    num_prompts: int = 4,
    max_prompt_tokens: int = 128,
    explicit: bool = True,
) -> None:
    """The prompt flags of commands that run a real model (run, trace capture, calibrate)."""
    p.add_argument(
        "--prompts",
        default="mt-bench",
        help="prompt set (mt-bench, gsm8k, sharegpt) or a prompt file (.jsonl with a 'prompt' "
        "field per line, or .txt with one prompt per line)",
    )
    if explicit:
        p.add_argument(
            "--prompt",
            action="append",
            dest="prompt_texts",
            metavar="TEXT",
            help="explicit prompt (repeatable)",
        )
    p.add_argument("--num-prompts", type=argt.count, default=num_prompts)
    p.add_argument("--max-new-tokens", type=argt.tokens, default=16)
    p.add_argument("--max-prompt-tokens", type=argt.tokens, default=max_prompt_tokens)


def prompt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_prompt_flags`, :func:`add_batch_size_flag` and
    :func:`add_output_lens_flag` (prompt_texts only where the command takes --prompt)."""
    out: dict[str, Any] = {"prompts": args.prompts}
    if hasattr(args, "prompt_texts"):
        out["prompt_texts"] = args.prompt_texts
    out.update(
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        batching=args.batching,
        output_lens=args.output_lens,
    )
    return out
