"""`fmoe serve`: an OpenAI-compatible HTTP server over the real executor.

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (``stream``
as server-sent events), GET /health, GET /metrics (Prometheus). Requests join the
running batch at iteration boundaries (continuous batching, up to ``--max-batch``);
past ``--max-queue`` waiting requests the server answers 429 with Retry-After. With
``--capture FILE`` the routing of every served request is written, on SIGINT or
SIGTERM, as a trace that `fmoe sim --arrivals schedule` replays. See docs/serving.md.
"""

from __future__ import annotations

import argparse

from fmoe_cli import args as argt
from fmoe_cli.budgets import add_executor_flags, check_link_time
from fmoe_cli.common import parse_policy_opts


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {v}")
    return v


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (offloaded experts)"
    )
    p.add_argument(
        "--model",
        required=True,
        help="tiny preset name (random weights) or local checkpoint directory",
    )
    p.add_argument("--policy", required=True, help="policy name (see `fmoe policies`)")
    p.add_argument(
        "--policy-opt", action="append", metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--cache-experts", type=argt.count, help="expert cache in experts, total over devices"
    )
    budget.add_argument(
        "--cache-gb",
        type=argt.gib_or_auto,
        help="expert cache in GiB (2^30 bytes, as fmoe sim), total over devices; 'auto' (cuda): what the "
        "GPUs' free memory holds once the dense weights are on, less --reserve-gb",
    )
    p.add_argument(
        "--reserve-gb",
        type=argt.gib_or_zero,
        default=2.0,
        help="with --cache-gb auto: GiB per GPU kept for the KV cache and activations (default 2)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=_port,
        default=8000,
        metavar="PORT",
        help="TCP port (default 8000; 0: any free one)",
    )
    p.add_argument(
        "--max-batch", type=argt.batch, default=8, help="requests running at once (default 8)"
    )
    p.add_argument(
        "--max-queue",
        type=argt.integer(0, argt.MAX_COUNT),
        default=64,
        metavar="N",
        help="requests waiting beyond the batch before 429 (default 64)",
    )
    p.add_argument(
        "--capture",
        type=argt.output_file,
        metavar="PATH",
        help="record every served request's routing; written as a trace on SIGINT/SIGTERM",
    )
    p.add_argument(
        "--grace-s",
        type=argt.number(0, 86400),
        default=5.0,
        help="on SIGINT/SIGTERM, seconds running requests may take to finish (default 5)",
    )
    add_executor_flags(p)
    p.add_argument(
        "--train-trace",
        type=argt.input_file,
        help="training trace for policies that learn offline",
    )
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    from policies.registry import policy_class
    from realrun.serve.server import ServeConfig, serve

    policy_class(args.policy)  # an unknown name fails before the model loads
    check_link_time(args.model, args.link_gbps, args.link_latency_us, args.link_time_limit_s)
    cfg = ServeConfig(
        model=args.model,
        policy=args.policy,
        policy_options=parse_policy_opts(args.policy_opt),
        cache_experts=args.cache_experts,
        cache_gb=args.cache_gb,
        reserve_gb=args.reserve_gb,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        capture=args.capture,
        grace_s=args.grace_s,
        device=args.device,
        num_devices=args.num_devices,
        link_gbps=args.link_gbps,
        link_latency_us=args.link_latency_us,
        store=args.store,
        store_dir=args.store_dir,
        seed=args.seed,
        threads=args.threads,
        train_trace=args.train_trace,
    )
    return serve(cfg)
