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
from fmoe_cli.budgets import add_executor_flags, add_model_policy_flags, executor_options


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
    add_model_policy_flags(p, cache_required=True)
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
    from realrun.serve.server import ServeConfig, serve

    cfg = ServeConfig(
        **executor_options(args),
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        capture=args.capture,
        grace_s=args.grace_s,
    )
    return serve(cfg)
