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
from fmoe_cli.budgets import add_executor_flags, check_link_time
from fmoe_cli.common import (
    add_batch_size_flag,
    add_json_flag,
    add_output_lens_flag,
    add_prompt_flags,
    parse_policy_opts,
    print_json,
    print_table,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a real MoE model with offloaded experts under a policy")
    p.add_argument(
        "--model",
        required=True,
        help="tiny preset name (random weights) or local checkpoint directory",
    )
    p.add_argument("--policy", required=True, help="policy name (see `fmoe policies`)")
    p.add_argument(
        "--policy-opt", action="append", metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--cache-experts", type=argt.count, help="expert cache in experts, total over devices"
    )
    budget.add_argument(
        "--cache-gb",
        type=argt.gib_or_auto,
        help="expert cache in GiB (2^30 bytes, as fmoe sim), total over devices; 'auto' "
        "(cuda): what the GPUs' free memory holds once the dense weights are on, less --reserve-gb",
    )
    p.add_argument(
        "--reserve-gb",
        type=argt.gib_or_zero,
        default=2.0,
        help="with --cache-gb auto: GiB per GPU kept for the KV cache and activations (default 2)",
    )
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
    from policies.registry import policy_class
    from realrun.runner import RunConfig, run

    policy_class(args.policy)  # an unknown name fails before the model loads
    check_link_time(args.model, args.link_gbps, args.link_latency_us, args.link_time_limit_s)
    cfg = RunConfig(
        model=args.model,
        policy=args.policy,
        policy_options=parse_policy_opts(args.policy_opt),
        cache_experts=args.cache_experts,
        cache_gb=args.cache_gb,
        cache_scope=args.cache_scope,
        allow_lossy=args.allow_lossy,
        reserve_gb=args.reserve_gb,
        prompts=args.prompts,
        prompt_texts=args.prompt_texts,
        num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_size=args.batch_size,
        batching=args.batching,
        output_lens=args.output_lens,
        device=args.device,
        num_devices=args.num_devices,
        link_gbps=args.link_gbps,
        link_latency_us=args.link_latency_us,
        store=args.store,
        store_dir=args.store_dir,
        seed=args.seed,
        trace_out=args.trace_out,
        train_trace=args.train_trace,
        threads=args.threads,
    )
    metrics: dict[str, Any] = run(cfg).metrics
    if args.json:
        print_json(metrics)
    else:
        print_table([{"metric": k, "value": metrics.get(k)} for k in _TABLE_KEYS])
        if metrics.get("emulated_link"):
            print("(host link emulated on the CPU)")
    return 0
