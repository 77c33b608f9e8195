"""`fmoe run` as a function: validate everything, build, offload, run prompts, report.

Prompts run in a closed loop under ``RunConfig.batching`` (realrun.serving): ``static``
batches of ``batch_size`` in prompt order, or ``continuous`` batching up to
``batch_size`` running requests (the simulator's batchers of the same names).

:func:`prepare` checks every input that can be checked without weights (model, policy
and its options, budget, devices, link, prompts) so bad input fails at once;
:func:`execute` does the work. :func:`run` is both.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from policies.base import Policy
from realrun.copy_engine import LinkEmulation
from realrun.generate import Generation
from realrun.output_lens import check_output_lens, new_token_limits
from realrun.placement import (
    AUTO,
    GB,
    auto_budget_experts,
    budget_experts,
    check_auto_budget,
    cuda_free_bytes,
    resolve_devices,
    split_over_devices,
)
from realrun.prompting import Prompt, PromptText, check_lengths, encode, prompt_texts
from realrun.serving import check_batching
from realrun.session import RunSession, SessionOptions, refuse_future_readers
from specs.errors import InputError
from specs.model_spec import ModelSpec

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    sys.stderr.write(msg + "\n")


@dataclass
class RunConfig:
    """Every knob of a real run (CLI flags map one to one)."""

    model: str
    policy: str = "lru"
    policy_options: dict[str, Any] = field(default_factory=dict)
    cache_experts: int | None = None
    cache_gb: float | str | None = None  # or "auto" (CUDA: from free memory, less reserve_gb)
    cache_scope: str = "global"  # or "per-layer" (each MoE layer an equal share of slots)
    allow_lossy: bool = False  # lossy miss actions (low-bit, skip) allowed
    reserve_gb: float = 2.0
    prompts: str | None = "mt-bench"
    prompt_texts: list[str] | None = None
    num_prompts: int = 4
    max_new_tokens: int = 16
    max_prompt_tokens: int = 128
    batch_size: int = 1  # prompts per static batch, or running at once (continuous)
    batching: str = "static"  # or "continuous" (realrun.serving)
    output_lens: str = "fixed"  # or "reference" (realrun.output_lens)
    device: str = "cpu"
    num_devices: int | None = None
    link_gbps: float | None = None
    link_latency_us: float | None = None
    store: str = "auto"
    store_dir: str | None = None
    seed: int = 0
    chunk_bytes: int = 1 << 20
    trace_out: str | None = None
    train_trace: str | None = None
    threads: int | None = None  # torch intra-op threads (None: all cores but one on the CPU)
    warmup: bool = True  # one unmeasured forward of the unmodified model before offloading


@dataclass
class PreparedRun:
    cfg: RunConfig
    spec: ModelSpec
    policy: Policy
    plan: ServingPlan
    prompts: list[PromptText]
    max_prompt_tokens: int

    @property
    def devices(self) -> list[torch.device]:
        return self.plan.devices


def make_link(gbps: float | None, latency_us: float | None) -> LinkEmulation | None:
    """The emulated link of ``--link-gbps``/``--link-latency-us`` (None: no emulation)."""
    if gbps is None:
        if latency_us:
            raise InputError("--link-latency-us needs --link-gbps (the emulated link's bandwidth)")
        return None
    return LinkEmulation(gbps, latency_us or 0.0)


@dataclass
class ServingPlan:
    """Checked cache budget, devices and link of a real run (``fmoe run`` and the API)."""

    budget: int  # experts in total (every expert until sized, with cache_gb='auto')
    auto: bool  # cache_gb='auto': size with :meth:`sized` once the dense weights are on
    reserve_gb: float
    devices: list[torch.device]
    link: LinkEmulation | None

    def sized(self, spec: ModelSpec, slot_bytes: int | None = None) -> int:
        """The budget in experts; for 'auto', from the devices' free memory now, a slot
        taking ``slot_bytes`` (the store's row; default the spec's expert bytes)."""
        if not self.auto:
            return self.budget
        reserve = int(self.reserve_gb * GB)
        return auto_budget_experts(spec, self.devices, reserve, cuda_free_bytes, slot_bytes)


def plan_serving(
    spec: ModelSpec,
    policy: Policy,
    *,
    cache_experts: int | None,
    cache_gb: float | str | None,
    reserve_gb: float,
    device: str,
    num_devices: int | None,
    store: str,
    link_gbps: float | None,
    link_latency_us: float | None,
) -> ServingPlan:
    """Check the budget against the model and policy, the devices, store and link;
    InputError names the first problem."""
    auto = cache_gb == AUTO
    if auto:  # sized later, once the dense weights are on the device
        check_auto_budget(device, cache_experts, reserve_gb)
        budget = spec.total_experts
    else:
        budget = budget_experts(spec, cache_experts, cache_gb)  # type: ignore[arg-type]
    if policy.preload_all and budget < spec.total_experts:
        raise InputError(
            f"policy {policy.name!r} keeps every expert resident: it needs {spec.total_experts} "
            f"experts ({spec.experts_total_bytes} bytes), the budget is {budget}"
        )
    devices = resolve_devices(device, num_devices)
    if budget < len(devices):
        raise InputError(
            f"a cache of {budget} experts leaves some of {len(devices)} devices with no slot"
        )
    if store not in ("auto", "ram", "file"):
        raise InputError(f"unknown store {store!r} (--store; known: auto, ram, file)")
    link = make_link(link_gbps, link_latency_us)
    return ServingPlan(budget, auto, reserve_gb, devices, link)


def resolve_and_plan(cfg: Any) -> tuple[ModelSpec, Any, Policy, ServingPlan]:
    """The model (spec, transformers config), the policy and the serving plan of a run or
    a server: ``cfg`` has the fields ``model``, ``policy``, ``policy_options``,
    ``cache_experts``, ``cache_gb``, ``reserve_gb``, ``device``, ``num_devices``,
    ``store``, ``link_gbps`` and ``link_latency_us`` (RunConfig, ServeConfig). InputError
    names the first problem, before any weights load."""
    from policies.registry import make_policy, policy_class
    from realrun.models import resolve_model

    spec, hf_config, _ = resolve_model(cfg.model)
    refuse_future_readers(policy_class(cfg.policy))
    policy = make_policy(cfg.policy, **cfg.policy_options)
    if getattr(policy, "lossy", False) and not getattr(cfg, "allow_lossy", False):
        # before loading the model (fmoe serve has no opt-in: it serves exact policies)
        how = (
            "pass --allow-lossy (allow_lossy=True) to opt in"
            if hasattr(cfg, "allow_lossy")
            else "fmoe serve serves exact policies only (fmoe run --allow-lossy runs it)"
        )
        raise InputError(
            f"policy {policy.name!r} takes lossy miss actions (low-bit copies or skipped "
            f"experts); {how}"
        )
    plan = plan_serving(
        spec,
        policy,
        cache_experts=cfg.cache_experts,
        cache_gb=cfg.cache_gb,
        reserve_gb=cfg.reserve_gb,
        device=cfg.device,
        num_devices=cfg.num_devices,
        store=cfg.store,
        link_gbps=cfg.link_gbps,
        link_latency_us=cfg.link_latency_us,
    )
    return spec, hf_config, policy, plan


def prepare(cfg: RunConfig) -> PreparedRun:
    """Check every input before any work; InputError names the first problem."""
    spec, hf_config, policy, plan = resolve_and_plan(cfg)
    if cfg.cache_scope == "per-layer" and not plan.auto:  # refuse before loading the model
        from policies.cache_scope import make_caches

        caps = split_over_devices(spec, plan.budget, len(plan.devices))[1]
        make_caches(caps, spec.expert_bytes, "per-layer", spec.num_moe_layers, spec.top_k)
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_batching(cfg.batching)
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads must be >= 1, got {cfg.threads}")
    max_prompt = check_lengths(hf_config, cfg.max_prompt_tokens, cfg.max_new_tokens)
    prompts = prompt_texts(cfg.prompts, cfg.prompt_texts, cfg.num_prompts)
    check_output_lens(cfg.output_lens, prompts, explicit=bool(cfg.prompt_texts))
    return PreparedRun(cfg, spec, policy, plan, prompts, max_prompt)


@dataclass
class RunResult:
    metrics: dict[str, Any]
    workload: Any | None = None  # traces.types.Workload when recorded


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss would include a forking
    parent's peak on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def torch_threads(cfg: RunConfig) -> int:
    """Intra-op threads for the run: ``cfg.threads``, else on the CPU every core but one
    (the copy thread needs one; an oversubscribed OpenMP pool is many times slower)."""
    if cfg.threads is not None:
        return cfg.threads
    if cfg.device == "cpu":
        return max(1, (os.cpu_count() or 2) - 1)
    return torch.get_num_threads()


@contextlib.contextmanager
def threads_set(n: int) -> Iterator[None]:
    """torch's intra-op threads at ``n`` inside the block, back to what they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(prep: PreparedRun, progress: Progress = _stderr) -> RunResult:
    """Build and offload the model, run every prompt, return metrics (and the trace if asked)."""
    with threads_set(torch_threads(prep.cfg)):
        return _execute(prep, progress)


def _execute(prep: PreparedRun, progress: Progress) -> RunResult:
    from realrun.models import load
    from realrun.offload import offload_model

    cfg = prep.cfg
    t0 = time.perf_counter()
    if cfg.train_trace:
        from traces.io import load_workload

        prep.policy.fit(load_workload(cfg.train_trace, prep.spec))
    elif prep.policy.needs_training:
        progress(
            f"note: policy {cfg.policy!r} learns from a training trace (--train-trace); running without one"
        )
    loaded = load(cfg.model, seed=cfg.seed)
    if cfg.warmup:  # one-time kernel setup should not count as the first request's TTFT
        with torch.no_grad():
            loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    progress(
        f"loaded {prep.spec.name} ({loaded.source}) in {time.perf_counter() - t0:.1f} s; offloading experts"
    )
    om = offload_model(
        loaded, store=cfg.store, store_dir=cfg.store_dir, dense_device=prep.devices[0]
    )
    prompts = encode(loaded.tokenizer, prep.prompts, prep.max_prompt_tokens)
    limits = new_token_limits(loaded.tokenizer, prep.prompts, cfg.output_lens, cfg.max_new_tokens)
    opts = SessionOptions(
        prep.plan.sized(prep.spec, om.store.row_bytes),  # 'auto': dense weights are on now
        prep.devices,
        prep.plan.link,
        cfg.chunk_bytes,
        record=bool(cfg.trace_out),
        seed=cfg.seed,
        cache_scope=cfg.cache_scope,
        allow_lossy=cfg.allow_lossy,
    )
    try:
        with RunSession(om, prep.policy, opts) as session:
            done = [0]

            def report(p: Prompt, g: Generation) -> None:
                done[0] += 1
                progress(
                    f"[{done[0]}/{len(prompts)}] {p.request_id}: {len(p.ids)} prompt tokens, ttft {g.ttft_s:.3f} s, tpot {g.tpot_s:.4f} s"
                )

            session.serve(prompts, limits, cfg.batch_size, cfg.batching, on_done=report)
            metrics = session.metrics()
            requests = session.recorder.requests if session.recorder else None
    finally:
        om.close()
    metrics.update(
        executor="realrun",
        model=prep.spec.name,
        policy=cfg.policy,
        policy_metadata=prep.policy.metadata(),
        device=cfg.device,
        expert_store=om.store.kind,
        tokenizer=getattr(loaded.tokenizer, "name", "unknown"),
        prompts=cfg.prompts if not cfg.prompt_texts else "explicit",
        num_prompts=len(prompts),
        batch_size=cfg.batch_size,
        batching=cfg.batching,
        max_new_tokens=cfg.max_new_tokens,
        output_lens=cfg.output_lens,
        new_token_limits=limits,  # per request, in prompt order
        seed=cfg.seed,
        torch_threads=torch.get_num_threads(),
        model_bytes=prep.spec.model_bytes,
        peak_rss_bytes=peak_rss_bytes(),
    )
    workload = None
    if requests is not None:
        from realrun.capture import make_workload, write_workload

        workload = make_workload(
            prep.spec,
            requests,
            cfg.seed,
            source="realrun.run",
            extra={"policy": cfg.policy, "output_lens": cfg.output_lens, **metrics_link(metrics)},
        )
        write_workload(workload, cfg.trace_out)
        progress(f"wrote trace {cfg.trace_out}")
    return RunResult(metrics, workload)


def metrics_link(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("emulated_link", "link_gbps", "link_latency_us")}


def run(cfg: RunConfig, progress: Progress = _stderr) -> RunResult:
    """prepare + execute."""
    return execute(prepare(cfg), progress)
