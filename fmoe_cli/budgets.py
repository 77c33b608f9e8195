"""Time budgets of commands that run a real model over an emulated link.

An emulated host link sleeps for what each copy would take, so ``--link-gbps 1e-9`` makes
a run that never ends in practice. Before starting, :func:`check_link_time` estimates
the time to copy every routed expert once over the emulated link (the least a run that
touches each expert moves) and refuses, naming the flag, the estimate and the limit,
when it exceeds ``--link-time-limit-s``.

Also the flags `fmoe run` and `fmoe serve` share (model, policy, cache budget, the real
executor's device, link, store, seed and threads) and the config fields they give.
"""

from __future__ import annotations

import argparse
from typing import Any

from fmoe_cli import args as argt
from fmoe_cli.common import parse_policy_opts
from specs.limits import require_memory, require_time

DEFAULT_LINK_TIME_LIMIT_S = 600.0


def add_link_time_flag(p: argparse.ArgumentParser) -> None:
    """``--link-time-limit-s``: the most an emulated link's one pass over the experts may take."""
    p.add_argument(
        "--link-time-limit-s",
        type=argt.number(0, 1e9, lo_open=True),
        default=DEFAULT_LINK_TIME_LIMIT_S,
        help="refuse an emulated link so slow that copying every expert once would take "
        f"longer than this (default {DEFAULT_LINK_TIME_LIMIT_S:g} s)",
    )


def _spec_of(model: str):  # -> ModelSpec | None
    """The ModelSpec of a preset or checkpoint (None when it cannot be read: the run
    itself then reports why)."""
    from specs.errors import InputError

    try:
        from realrun.models import resolve_model

        return resolve_model(model)[0]
    except InputError:
        return None


def check_link_time(
    model: str,
    gbps: float | None,
    latency_us: float | None,
    limit_s: float,
    source: str | None = None,
) -> None:
    """Raise InputError when copying every expert of ``model`` once over the emulated link
    (``gbps`` GB/s = 1e9 bytes/s, ``latency_us`` per copy) would take past ``limit_s``.
    ``source`` names where the link comes from (default: the --link-* flags)."""
    if gbps is None:
        return
    spec = _spec_of(model)
    if spec is None:
        return
    per_expert = spec.expert_bytes / (gbps * 1e9) + (latency_us or 0.0) * 1e-6
    seconds = spec.total_experts * per_expert
    flags = f"--link-gbps {gbps:g}" + (f" --link-latency-us {latency_us:g}" if latency_us else "")
    where = f"{source}: emulated link of {gbps:g} GB/s, {latency_us or 0:g} us" if source else flags
    require_time(
        f"{where} ({spec.total_experts} experts of {spec.expert_bytes} bytes, each copied once)",
        seconds,
        limit_s,
        "use a faster emulated link or raise --link-time-limit-s",
    )


def check_bench_memory(
    model: str, max_tokens: int, max_context: int, link_sizes: list[int] | None = None
) -> None:
    """Raise InputError when `calibrate bench`'s largest points would not fit in memory:
    a prefill of ``max_tokens`` (fp32 attention scores and probabilities per head,
    logits over the vocabulary), a decode after ``max_context`` tokens (fp32 KV), and
    the largest timed copy of ``--link-sizes`` (source and destination buffers)."""
    if link_sizes:
        require_memory(
            f"--link-sizes up to {max(link_sizes)} bytes",
            2.0 * max(link_sizes),
            "time smaller copies",
        )
    spec = _spec_of(model)
    if spec is None:
        return
    scores = 2 * 4 * spec.num_attention_heads * max_tokens * max_tokens
    logits = 4 * max_tokens * spec.vocab_size
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4 * max_context
    require_memory(
        f"--max-tokens {max_tokens} --max-context {max_context} on {spec.name}",
        scores + logits + kv,
        "lower --max-tokens or --max-context",
    )


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    """The real executor's flags shared by `fmoe run` and `fmoe serve`: device and device
    count, the emulated link and its time limit, the expert store, seed and threads."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--num-devices",
        type=argt.devices,
        help="devices holding expert slots (cuda: default all visible)",
    )
    p.add_argument(
        "--link-gbps",
        type=argt.gbps,
        help="emulate a host link of this many GB/s (10^9 bytes/s; labelled emulated)",
    )
    p.add_argument(
        "--link-latency-us", type=argt.latency_us, help="per-transfer latency of the emulated link"
    )
    add_link_time_flag(p)
    p.add_argument(
        "--store",
        choices=["auto", "ram", "file"],
        default="auto",
        help="where offloaded experts live",
    )
    p.add_argument(
        "--store-dir",
        type=argt.output_dir,
        help="directory of the file store's spill file (default: temp dir)",
    )
    p.add_argument(
        "--seed",
        type=argt.seed,
        default=0,
        help="torch seed of a tiny preset's random weights; policy seed",
    )
    p.add_argument(
        "--threads", type=argt.threads, help="torch threads (leave a core to the copy thread)"
    )


def add_model_policy_flags(p: argparse.ArgumentParser, cache_required: bool = False) -> None:
    """--model, --policy, --policy-opt, the expert cache (--cache-experts or --cache-gb;
    one of them required when ``cache_required``) and --reserve-gb, as `fmoe run` and
    `fmoe serve` take them."""
    p.add_argument(
        "--model",
        required=True,
        help="tiny preset name (random weights) or local checkpoint directory",
    )
    p.add_argument("--policy", required=True, help="policy name (see `fmoe policies`)")
    p.add_argument(
        "--policy-opt", action="append", metavar="KEY=VALUE", help="policy option (repeatable)"
    )
    budget = p.add_mutually_exclusive_group(required=cache_required)
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


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_model_policy_flags`, :func:`add_executor_flags` and
    --train-trace (keyword arguments of RunConfig and ServeConfig), after the checks that
    come before a model loads: an unknown policy name, an emulated link too slow for
    --link-time-limit-s (both InputError)."""
    from policies.registry import policy_class

    policy_class(args.policy)  # an unknown name fails before the model loads
    check_link_time(args.model, args.link_gbps, args.link_latency_us, args.link_time_limit_s)
    return {
        "model": args.model,
        "policy": args.policy,
        "policy_options": parse_policy_opts(args.policy_opt),
        "cache_experts": args.cache_experts,
        "cache_gb": args.cache_gb,
        "reserve_gb": args.reserve_gb,
        "device": args.device,
        "num_devices": args.num_devices,
        "link_gbps": args.link_gbps,
        "link_latency_us": args.link_latency_us,
        "store": args.store,
        "store_dir": args.store_dir,
        "seed": args.seed,
        "threads": args.threads,
        "train_trace": args.train_trace,
    }
