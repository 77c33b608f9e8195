"""`fmoe run`: a real MoE model with offloaded experts, driven by a policy.

Metrics use the simulator's names (hit_rate, ttft_mean_s, tpot_mean_s, ...) plus
``tokens_sha256`` and the link figures; ``emulated_link`` is true whenever
``--link-gbps`` emulates a host link. ``--batch-size B`` runs the prompts B at a time as
static batches (closed loop: a batch starts when the previous one has finished), or with
``--batching continuous`` up to B at once, a waiting prompt joining at the next iteration
after one finishes. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
from typing import Any

from fmoe_cli import args as argt
from fmoe_cli.budgets import add_executor_flags, add_model_policy_flags, executor_options
from fmoe_cli.common import (
    add_batch_size_flag,
    add_json_flag,
    add_output_lens_flag,
    add_prompt_flags,
    print_json,
    print_table,
    prompt_options,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a real MoE model with offloaded experts under a policy")
    add_model_policy_flags(p)
    p.add_argument(
        "--cache-scope",
        choices=["global", "per-layer"],
        default="global",
        help="one slot pool per device, or an equal share per MoE layer",
    )
    p.add_argument(
        "--allow-lossy",
        action="store_true",
        help="let the policy take lossy miss actions (low-bit copy, skip); counted in results",
    )
    add_prompt_flags(p, num_prompts=4)
    add_batch_size_flag(p)
    add_output_lens_flag(p)
    add_executor_flags(p)
    p.add_argument(
        "--trace-out",
        type=argt.output_file,
        help="also write the run's routing trace (traces/ format)",
    )
    p.add_argument(
        "--train-trace",
        type=argt.input_file,
        help="training trace for policies that learn offline",
    )
    add_json_flag(p)
    p.set_defaults(func=_cmd_run)


_TABLE_KEYS = [
    "model",
    "policy",
    "batch_size",
    "batching",
    "output_lens",
    "cache_experts_total",
    "hit_rate",
    "ttft_mean_s",
    "tpot_mean_s",
    "e2e_mean_s",
    "stall_s",
    "bytes_h2d",
    "prefetch_accuracy",
    "emulated_link",
    "link_gbps",
    "tokens_sha256",
]


def _cmd_run(args: argparse.Namespace) -> int:
    from realrun.runner import RunConfig, run

    cfg = RunConfig(
        **executor_options(args),
        cache_scope=args.cache_scope,
        allow_lossy=args.allow_lossy,
        **prompt_options(args),
        trace_out=args.trace_out,
    )
    metrics: dict[str, Any] = run(cfg).metrics
    if args.json:
        print_json(metrics)
    else:
        print_table([{"metric": k, "value": metrics.get(k)} for k in _TABLE_KEYS])
        if metrics.get("emulated_link"):
            print("(host link emulated on the CPU)")
    return 0
