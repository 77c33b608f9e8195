"""``simulate(workload, config)``: one simulation run, its metrics and per-request records."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import simpy

from policies.base import Policy, PolicyContext
from policies.cache_scope import make_caches
from policies.placement import Placement
from policies.registry import make_policy
from sim.batching import schedule_batcher
from sim.bounds import no_bounds, run_bounds
from sim.config import OFFLINE_TRAIN_FRACTION, SimConfig
from sim.engine import Engine
from sim.events import EventLog
from sim.executor_view import SimExecutorView
from sim.links import Links
from sim.memory import cache_capacities
from sim.metrics import cache_metrics, latency_metrics, request_frame
from sim.timing import Timing
from specs.errors import InputError
from specs.model_spec import ModelSpec
from traces.types import Workload


@dataclass
class SimResult:
    """What a run produced: flat ``metrics`` (JSON-able), ``requests`` (one row per
    request: id, arrival_s, start_s, prompt_len, output_len, ttft_s, tpot_s, e2e_s, hits,
    demands) and, when ``record_events`` was set, the transfer/compute ``events``."""

    metrics: dict[str, Any]
    requests: pd.DataFrame
    events: EventLog | None = None


def _routing_dims(spec: ModelSpec) -> tuple[int, int, int]:
    return spec.num_moe_layers, spec.num_experts, spec.top_k


def check_workload_model(workload: Workload, spec: ModelSpec, where: str = "trace") -> None:
    """InputError when a workload was recorded for a different model than ``spec``."""
    w = workload.spec
    if w.name != spec.name or _routing_dims(w) != _routing_dims(spec):
        L, J, K = _routing_dims(w)
        L2, J2, K2 = _routing_dims(spec)
        raise InputError(
            f"{where} is for model {w.name!r} ({L} MoE layers x {J} experts, top-{K}) "
            f"but the model is {spec.name!r} ({L2} x {J2}, top-{K2})"
        )


def _preload_keys(placement: Placement, device: int, capacity: int) -> list[tuple[int, int]]:
    """The device's experts in layer order, as many as fit (warm start)."""
    keys = [
        (lay, e)
        for lay in range(placement.num_layers)
        for e in range(placement.num_experts)
        if placement.device_of((lay, e)) == device
    ]
    return keys[:capacity]


def _split(
    workload: Workload, config: SimConfig, training: Workload | None
) -> tuple[Workload, Workload | None]:
    training = training if training is not None else config.training
    fraction = config.train_fraction
    if fraction is None and config.offline:
        fraction = OFFLINE_TRAIN_FRACTION
    if training is None and fraction is not None:
        training, workload = workload.split(fraction, config.seed)
    if not workload.requests:
        raise InputError("the workload to simulate has no requests (after the train/test split)")
    return workload, training


def build_policy(config: SimConfig) -> Policy:
    return make_policy(config.policy, **config.policy_options)


def simulate(
    workload: Workload,
    config: SimConfig,
    training: Workload | None = None,
    *,
    policy: Policy | None = None,
) -> SimResult:
    """Run ``workload`` under ``config`` and return its metrics.

    ``policy``: an unbound policy instance to use instead of building ``config.policy``
    (tests and tools that wrap a policy); it must not have been bound before.

    Contract: the workload (and training workload) must be for ``config.model`` (same
    name and routing dimensions) or InputError is raised; so is a cache budget that is
    below top-K, does not fit the GPUs, or cannot hold every expert for a policy that
    keeps them all resident. Deterministic: the same inputs give the same metrics except
    the wall-clock keys (``sim.metrics.WALL_CLOCK_KEYS``).
    """
    wall0 = time.perf_counter()
    spec, hw = config.model, config.hardware
    check_workload_model(workload, spec)
    workload, training = _split(workload, config, training)
    if training is not None:
        check_workload_model(training, spec, "training trace")
    workload.validate()
    policy = policy if policy is not None else build_policy(config)
    placement = Placement(spec.num_moe_layers, spec.num_experts, hw.num_gpus)
    caps = cache_capacities(config, placement, preload_all=policy.preload_all)
    caches = make_caches(
        caps, spec.expert_bytes, config.cache_scope, spec.num_moe_layers, spec.top_k
    )
    initial = None
    if policy.preload_all or config.warm_start:
        initial = [_preload_keys(placement, d, cache.capacity) for d, cache in enumerate(caches)]
        for cache, keys in zip(caches, initial, strict=True):
            cache.preload(keys)

    env = simpy.Environment()
    timing = Timing(hw, spec, config.pinned)
    log = EventLog() if config.record_events else None
    links = Links(
        env,
        caches,
        placement.device_of,
        spec.num_moe_layers,
        bandwidth_Bps=timing.bandwidth_Bps,
        latency_s=timing.latency_s,
        concurrency=hw.link.concurrency,
        chunk_bytes=config.chunk_bytes,
        host_cap_Bps=hw.host_bandwidth_cap_Bps,
        scores=policy.eviction_scores,
        log=log,
    )
    # the policy sees the links and the layer time (deadline-aware prefetch) from bind on
    view = SimExecutorView(links, timing, spec, context=_mean_context(workload))
    ctx = PolicyContext(spec, placement, caches, config.prefetch_distance, config.seed)
    ctx.executor = view
    ctx.allow_lossy = config.allow_lossy
    policy.bind(ctx)
    if policy.reads_future:
        policy.bind_future(workload)
    if training is not None:
        policy.fit(training)
    scheduled = config.arrivals == "schedule"
    closed = config.arrivals in ("closed", "schedule") or (
        config.arrivals == "auto" and training is not None
    )
    # experts a policy made resident in bind/fit (hot placement, llama.cpp's GPU layers)
    placed_before_run = sum(len(c.entries) for c in caches) - sum(map(len, initial or []))
    engine = Engine(env, config, workload, policy, caches, links, placement, timing, closed, log)
    if scheduled:  # a served trace's own admissions (sim.batching.ScheduleBatcher)
        engine.batcher = schedule_batcher(workload, lambda: engine.iterations)
    run0 = time.perf_counter()
    env.run(until=env.process(engine.run()))
    run_s = time.perf_counter() - run0
    actions = engine.action_metrics()

    frame = request_frame(engine.states)
    end = engine.end_s
    metrics: dict[str, Any] = {
        "policy": policy.name,
        "model": spec.name,
        "hardware": hw.name,
        "hardware_kind": hw.kind,
        "emulated": hw.link.emulated,
        "num_gpus": hw.num_gpus,
        "requests": len(workload.requests),
        "iterations": engine.iterations,
        "layer_steps": engine.layer_steps,
        "offline": training is not None,
        "arrivals": "schedule" if scheduled else "closed" if closed else "trace",
        "batch_size": config.batch_size,
        "batching": config.batching,
        **latency_metrics(frame),
        **cache_metrics(caches, engine.layer_steps * spec.num_shared_experts),
        "stall_s": engine.stall_s,
        "makespan_s": end,
        "link_busy_s": [lk.busy_until(end) for lk in links.links],
        "bytes_transferred": sum(lk.bytes_moved for lk in links.links),
        "prefetch_orders": sum(lk.stats["orders"] for lk in links.links),
        "prefetch_orders_stale": sum(lk.stats["stale"] for lk in links.links),
        "prefetch_orders_dropped": sum(lk.stats["dropped_full"] for lk in links.links),
        "preemptions": sum(lk.stats["preemptions"] for lk in links.links),
        **actions,
        "policy_metadata": policy.metadata(),
        "run_wall_s": run_s,
        "layer_steps_per_s": engine.layer_steps / run_s if run_s > 0 else None,
        # policy-independent: from the workload, the schedule and the caches' sizes
        **(
            _no_bounds(why)
            if (why := _why_no_bounds(actions, placed_before_run))
            else run_bounds(workload, config, caps, closed, initial)
        ),
    }
    metrics["wall_s"] = time.perf_counter() - wall0
    return SimResult(metrics, frame, log)


_NOT_FETCHED = ("actions_cpu", "actions_lowbit", "actions_skip")


def _why_no_bounds(actions: dict, placed_before_run: int) -> str:
    """Why the bounds do not apply to this run ('' when they do). They count the copies of
    a run that starts from the config's cache state and fetches every miss; a miss served
    on the CPU, from a low-bit copy or skipped moves no expert, and experts a policy
    places before the run (hot placement) arrive without a copy."""
    reasons = []
    other = sum(int(actions.get(k) or 0) for k in _NOT_FETCHED)
    if other:
        reasons.append(f"{other} misses were not fetched (CPU, low-bit or skip)")
    if placed_before_run:
        reasons.append(f"the policy placed {placed_before_run} experts before the run")
    if not reasons:
        return ""
    return "; ".join(reasons) + (
        ": the bounds assume a run from the config's cache state that fetches every miss"
    )


def _no_bounds(why: str) -> dict:
    """The bound keys of a run they do not apply to (not computed)."""
    return {**no_bounds(why), "bound_wall_s": 0.0}


def _mean_context(workload: Workload) -> float:
    """Mean KV length over a request's decode steps: its prompt plus half its output."""
    reqs = workload.requests
    if not reqs:
        return 0.0
    return sum(r.prompt_len + r.output_len / 2 for r in reqs) / len(reqs)
