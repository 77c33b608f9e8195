"""Cost of continuous batching's packed attention against static batching, per decode step.

Continuous batching (``realrun/continuous.py``) packs the whole batch into one sequence
row with a [1, 1, q, kv] additive mask, so each decode step's attention reads every live
request's KV columns (the others' masked out) and the mask is rebuilt every step; static
batching (``realrun/generate.py``) keeps one KV row per request in a ``DynamicCache``.
This measures what that costs, on the unmodified model (``realrun.models.load``, eager
experts, every expert in RAM: no offloading, no policy), so only the attention, the
dense layers and the packing differ.

For every batch size B (``--batch-sizes``) and prompt length L (``--prompt-tokens``), B
requests with prompts of exactly L tokens (the shipped ``--prompts`` set, tokenized and
run together end to end, then cut into B consecutive L-token pieces: no padding in the
static batch) are served by ``realrun.serving.generate_all`` with ``--batch-size B``,
once with ``static`` and once with ``continuous`` batching, each generating ``--steps``
+ 2 tokens. Both admit all B requests at the first iteration and finish them together,
so each run is one prefill forward and ``--steps`` + 1 decode forwards of B rows. An
observer timestamps the start of every iteration; a decode step's time is the time from
one decode iteration's start to the next's (the forward, the greedy pick and the
batching's own work between forwards: building the packed mask, positions and inputs),
over the first ``--steps`` decode iterations. The prefill is timed the same way (first
to second iteration start).

Each of ``--repeats`` rounds runs every (B, L) cell static and continuous back to back,
static first in even rounds and continuous first in odd ones, so the machine's drift
reaches both; a round's ratio is continuous / static of the two runs' median step
times. Reported per cell: the median over rounds of each batching's median step time
(ms per step, and per token: / B), and the median and range of the per-round ratios.
One warm-up pair on the smallest cell runs first and is not reported. torch runs on
every core but one (``realrun.runner.torch_threads``'s CPU default), set explicitly.

    .venv/bin/python benchmarks/continuous_attention.py [--model tiny-mixtral-wide]
        [--batch-sizes 1,2,4,8] [--prompt-tokens 64,256] [--steps 8] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realrun.generate import IterationRows  # noqa: E402
from realrun.models import load  # noqa: E402
from realrun.prompting import Prompt, encode, prompt_texts  # noqa: E402
from realrun.serving import generate_all  # noqa: E402

BATCHINGS = ("static", "continuous")


def log(msg: str) -> None:
    """Progress on stderr (stdout is the table or the JSON document)."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def loadavg() -> str:
    """The machine's 1, 5 and 15 minute load averages (``/proc/loadavg``), or '?'."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every entry >= 1."""
    vals = [int(x) for x in text.split(",") if x.strip()]
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"want positive integers separated by commas: {text!r}")
    return vals


class IterationClock:
    """Observer that timestamps the start of every iteration (and the end of the last)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.last_end = 0.0

    def begin_iteration(self, rows: IterationRows) -> None:
        self.starts.append(time.perf_counter())

    def end_iteration(self, finished: tuple[str, ...]) -> None:
        self.last_end = time.perf_counter()

    def periods(self) -> list[float]:
        """Seconds from each iteration's start to the next's (the last: to its end)."""
        marks = [*self.starts, self.last_end]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def token_stream(tokenizer: Any, prompt_set: str, need: int) -> list[int]:
    """At least ``need`` token ids: the set's prompts tokenized one after another (the set
    repeated if it is too short)."""
    texts = prompt_texts(prompt_set, None, 10_000)
    ids = [t for p in encode(tokenizer, texts, 10**9) for t in p.ids]
    if not ids:
        raise ValueError(f"prompt set {prompt_set!r} tokenizes to nothing")
    return (ids * (need // len(ids) + 1))[:need]


def make_prompts(stream: Sequence[int], batch: int, tokens: int) -> list[Prompt]:
    """``batch`` requests of exactly ``tokens`` prompt tokens: consecutive pieces of ``stream``."""
    return [
        Prompt(f"r{i}", list(stream[i * tokens : (i + 1) * tokens]), None) for i in range(batch)
    ]


@dataclass
class Run:
    """One served batch: its prefill and decode step times (s) and every request's tokens."""

    prefill_s: float
    steps_s: list[float]
    tokens: list[list[int]]


def serve_once(model: nn.Module, prompts: list[Prompt], steps: int, batching: str) -> Run:
    """Serve ``prompts`` as one batch of ``len(prompts)`` under ``batching``, generating
    ``steps + 2`` tokens each; time the prefill and the first ``steps`` decode steps."""
    gc.collect()
    clock = IterationClock()
    gens = generate_all(model, prompts, steps + 2, len(prompts), batching, observer=clock)
    periods = clock.periods()
    if len(periods) != steps + 2:  # one prefill, steps + 1 decode iterations
        raise RuntimeError(f"{batching}: {len(periods)} iterations, expected {steps + 2}")
    return Run(periods[0], periods[1 : steps + 1], [g.output_ids for g in gens])


def median_ms(xs: Sequence[float]) -> float:
    return 1e3 * statistics.median(xs)


def measure(model: nn.Module, stream: Sequence[int], args: argparse.Namespace) -> list[dict]:
    """Every (B, L) cell, static and continuous back to back, ``args.repeats`` rounds."""
    cells = [(b, n) for n in args.prompt_tokens for b in args.batch_sizes]
    runs: dict[tuple[int, int], dict[str, list[Run]]] = {
        c: {k: [] for k in BATCHINGS} for c in cells
    }
    orders: dict[tuple[int, int], list[str]] = {c: [] for c in cells}
    warm = make_prompts(stream, min(args.batch_sizes), min(args.prompt_tokens))
    for batching in BATCHINGS:  # warm-up, not reported
        serve_once(model, warm, 2, batching)
    for rnd in range(args.repeats):
        order = BATCHINGS if rnd % 2 == 0 else BATCHINGS[::-1]
        for b, n in cells:
            prompts = make_prompts(stream, b, n)
            for batching in order:
                runs[b, n][batching].append(serve_once(model, prompts, args.steps, batching))
            orders[b, n].append(order[0])
            s, c = (runs[b, n][k][-1] for k in BATCHINGS)
            log(
                f"round {rnd + 1}/{args.repeats} B={b} L={n}: static {median_ms(s.steps_s):.1f} ms/step, "
                f"continuous {median_ms(c.steps_s):.1f} ms/step, "
                f"ratio {statistics.median(c.steps_s) / statistics.median(s.steps_s):.3f} "
                f"(load {loadavg()})"
            )
    return [summarize(b, n, runs[b, n], orders[b, n]) for b, n in cells]


def summarize(batch: int, tokens: int, runs: dict[str, list[Run]], first: list[str]) -> dict:
    """One cell's figures over the rounds."""
    step = {k: [median_ms(r.steps_s) for r in runs[k]] for k in BATCHINGS}
    prefill = {k: [1e3 * r.prefill_s for r in runs[k]] for k in BATCHINGS}
    ratios = [c / s for s, c in zip(step["static"], step["continuous"], strict=True)]
    pre_ratios = [c / s for s, c in zip(prefill["static"], prefill["continuous"], strict=True)]
    same = all(
        s.tokens == c.tokens for s, c in zip(runs["static"], runs["continuous"], strict=True)
    )
    out: dict[str, Any] = {"batch_size": batch, "prompt_tokens": tokens}
    for k in BATCHINGS:
        out[f"{k}_ms_per_step"] = statistics.median(step[k])
        out[f"{k}_ms_per_token"] = statistics.median(step[k]) / batch
        out[f"{k}_prefill_ms"] = statistics.median(prefill[k])
    out |= {
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "prefill_ratio": statistics.median(pre_ratios),
        "prefill_ratio_min": min(pre_ratios),
        "prefill_ratio_max": max(pre_ratios),
        "same_tokens": same,
        "rounds": [
            {
                "first": first[i],
                **{f"{k}_ms_per_step": step[k][i] for k in BATCHINGS},
                **{f"{k}_steps_ms": [1e3 * x for x in runs[k][i].steps_s] for k in BATCHINGS},
                **{f"{k}_prefill_ms": prefill[k][i] for k in BATCHINGS},
                "ratio": ratios[i],
            }
            for i in range(len(ratios))
        ],
    }
    return out


def table(rows: list[dict]) -> str:
    """The cells as a markdown table."""
    lines = [
        "| B | prompt tokens | static ms/step | continuous ms/step | ratio cont/static [range] "
        "| static ms/token | continuous ms/token | prefill ratio cont/static [range] | same tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch_size']} | {r['prompt_tokens']} | {r['static_ms_per_step']:.1f} "
            f"| {r['continuous_ms_per_step']:.1f} "
            f"| {r['ratio']:.3f} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}] "
            f"| {r['static_ms_per_token']:.1f} | {r['continuous_ms_per_token']:.1f} "
            f"| {r['prefill_ratio']:.3f} [{r['prefill_ratio_min']:.3f}-{r['prefill_ratio_max']:.3f}] "
            f"| {'yes' if r['same_tokens'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-mixtral-wide")
    ap.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int_list, default=[64, 256])
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (static and continuous each)")
    ap.add_argument("--prompts", default="mt-bench", help="prompt set the token ids come from")
    ap.add_argument("--threads", type=int, default=None, help="default: every core but one")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be >= 1")
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    load_before = loadavg()
    t0 = time.perf_counter()
    loaded = load(args.model)
    positions = getattr(loaded.model.config, "max_position_embeddings", None)
    if positions is not None and max(args.prompt_tokens) + args.steps + 2 > positions:
        ap.error(f"prompt tokens + steps + 2 exceed the model's {positions} positions")
    stream = token_stream(
        loaded.tokenizer, args.prompts, max(args.batch_sizes) * max(args.prompt_tokens)
    )
    log(f"{args.model} loaded in {time.perf_counter() - t0:.1f} s; torch threads {threads}")
    rows = measure(loaded.model, stream, args)
    result = {
        "model": args.model,
        "experts": "all resident, eager (unmodified model)",
        "attn_implementation": getattr(loaded.model.config, "_attn_implementation", None),
        "torch_threads": threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "prompts": args.prompts,
        "steps": args.steps,
        "repeats": args.repeats,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "cells": rows,
        "bench_wall_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"Decode step, continuous (packed row, [1,1,q,kv] mask) vs static (per-row KV), "
            f"{args.model}, all experts resident, {result['attn_implementation']} attention, "
            f"{threads} torch thread(s); median of {args.repeats} rounds of {args.steps} steps "
            f"(ratio: median [min-max] of per-round ratios)"
        )
        print(table(rows))
        print(
            f"load average before {load_before}, after {result['loadavg_after']}; "
            f"benchmark wall time {result['bench_wall_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
