"""`fmoe calibrate bench`: measure this machine for one model and write a calibrated profile.

Steps (each a module of its own): the host->device link (:mod:`calibration.bench_link`),
expert FFN, dense/attention and head time and the real executor's per-layer overhead
per policy (:mod:`calibration.bench_compute`), an async policy's search time
(:mod:`calibration.bench_policy`). The fits (:mod:`calibration.fit`,
:mod:`calibration.piecewise`) become a :class:`HardwareProfile` of kind ``calibrated``
whose ``compute.fit_errors`` holds each fit's mean absolute percentage error.

Sits on top of realrun (it times the real executor's own objects); realrun and sim never
import it. :func:`prepare_bench` checks every input before any weight is built.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from calibration.errors import InputError
from calibration.fit import fit_linear, fit_link
from calibration.hardware import ComputeModel, GPUSpec, HardwareProfile, LinkSpec
from calibration.model_spec import ModelSpec
from calibration.piecewise import fit_piecewise, fit_piecewise_dense
from calibration.stopwatch import device_sync

DEFAULT_POLICIES = ["lru", "lfu", "mixtral-offloading", "fmoe"]


class Progress(Protocol):
    """What the bench reports progress to (a tqdm bar fits): total, steps, messages."""

    def reset(self, total: int | None = None) -> None: ...

    def update(self, n: int = 1) -> Any: ...

    def write(self, s: str) -> None: ...


class NullProgress:
    """Progress that shows nothing."""

    def reset(self, total: int | None = None) -> None:
        """Nothing to reset."""

    def update(self, n: int = 1) -> None:
        """Nothing to count."""

    def write(self, s: str) -> None:
        """Nothing to print."""


@dataclass
class BenchConfig:
    """Every knob of a bench run (CLI flags map one to one)."""

    model: str = "tiny-mixtral-wide"
    device: str = "cpu"
    num_devices: int | None = None
    link_gbps: float | None = None
    link_latency_us: float | None = None
    threads: int | None = None
    repeats: int = 5
    max_tokens: int = 128
    max_context: int = 256
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    overhead_rounds: int = 3
    overhead_prompt_tokens: int = 32
    overhead_new_tokens: int = 8
    search_store_rows: int = 256
    chunk_bytes: int = 1 << 20
    store: str = "auto"
    seed: int = 0
    name: str | None = None


@dataclass
class PreparedBench:
    cfg: BenchConfig
    spec: ModelSpec
    devices: list[torch.device]
    link: Any  # realrun.copy_engine.LinkEmulation | None
    threads: int


@dataclass
class BenchResult:
    """The calibrated profile and the raw medians it was fitted to."""

    profile: HardwareProfile
    measurements: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """JSON-able: the profile's fits with their errors, and the measurements."""
        c = self.profile.compute
        return {
            "profile": self.profile.name,
            "device": self.profile.device,
            "model": c.fitted_for_model,
            "link_bandwidth_Bps": self.profile.link.pinned_bandwidth_Bps,
            "link_latency_s": self.profile.link.latency_s,
            "emulated": self.profile.link.emulated,
            "host_bandwidth_cap_Bps": self.profile.host_bandwidth_cap_Bps,
            "expert_1_token_s": c.expert(1) if c.expert else None,
            "dense_decode_s": c.dense(1, 64) if c.dense else None,
            "head_s": c.head(1) if c.head else None,
            "layer_overhead_s": c.layer_overhead_s,
            "policy_overhead_s": c.policy_overhead_s,
            "policy_search_s": c.policy_search_s,
            "torch_threads": c.torch_threads,
            "fit_errors": c.fit_errors,
            "measurements": self.measurements,
        }


def prepare_bench(cfg: BenchConfig) -> PreparedBench:
    """Check every input before any work; InputError names the first problem."""
    from policies.registry import policy_class
    from realrun.models import resolve_model
    from realrun.placement import resolve_devices
    from realrun.runner import RunConfig, make_link, torch_threads
    from realrun.session import refuse_future_readers

    spec, _, _ = resolve_model(cfg.model)
    devices = resolve_devices(cfg.device, cfg.num_devices)
    if cfg.device == "cuda" and cfg.link_gbps is not None:
        raise InputError(
            "--link-gbps emulates a link on the CPU; a CUDA bench measures the real one"
        )
    link = make_link(cfg.link_gbps, cfg.link_latency_us)
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError(f"--threads must be >= 1, got {cfg.threads}")
    for what, v, lo in (
        ("--repeats", cfg.repeats, 1),
        ("--max-tokens", cfg.max_tokens, 2),
        ("--max-context", cfg.max_context, 2),
        ("--overhead-rounds", cfg.overhead_rounds, 1),
    ):
        if v < lo:
            raise InputError(f"{what} must be >= {lo}, got {v}")
    if cfg.store not in ("auto", "ram", "file"):
        raise InputError(f"unknown --store {cfg.store!r} (known: auto, ram, file)")
    if not cfg.policies:
        raise InputError("--policies needs at least one policy")
    for p in cfg.policies:
        refuse_future_readers(policy_class(p))
    threads = torch_threads(RunConfig(model=cfg.model, device=cfg.device, threads=cfg.threads))
    return PreparedBench(cfg, spec, devices, link, threads)


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """prepare + measure + fit (see the module docstring)."""
    return execute_bench(prepare_bench(cfg), progress)


def execute_bench(prep: PreparedBench, progress: Progress | None = None) -> BenchResult:
    """Measure and fit; torch runs on ``prep.threads`` threads throughout (as the real run)."""
    before = torch.get_num_threads()
    torch.set_num_threads(prep.threads)
    try:
        return _execute(prep, progress if progress is not None else NullProgress())
    finally:
        torch.set_num_threads(before)


def _execute(prep: PreparedBench, bar: Progress) -> BenchResult:
    from calibration import bench_compute as bc
    from calibration import bench_link as bl
    from calibration.bench_policy import measure_search_s
    from realrun.models import load
    from realrun.offload import offload_model

    cfg, spec, dev0 = prep.cfg, prep.spec, prep.devices[0]
    tick: Callable[[int], Any] = bar.update
    bar.write(f"building {spec.name} and offloading its experts")
    loaded = load(cfg.model, seed=cfg.seed)
    with torch.no_grad():  # one-time kernel setup, as the real run does before offloading
        loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    om = offload_model(loaded, store=cfg.store, dense_device=dev0)
    sync = device_sync(dev0)
    try:
        sizes = bl.copy_sizes(om.store.row_bytes)
        tokens, contexts = bc.dense_points(cfg.max_tokens, cfg.max_context)
        head_batches = [1, 2, 4, 8]
        expert_tokens = tokens
        n_link = len(sizes) * cfg.repeats * (2 * len(prep.devices) if dev0.type == "cuda" else 1)
        n_dense = (2 * (len(tokens) + len(contexts)) + len(head_batches)) * cfg.repeats
        n_expert = len(expert_tokens) * cfg.repeats
        n_over = len(cfg.policies) * cfg.overhead_rounds
        bar.reset(total=n_link + n_dense + n_expert + n_over + 20)

        link_samples, cap = _measure_link(prep, om, sizes, tick)
        expert_samples = bc.measure_experts(
            om, dev0, sync, expert_tokens, cfg.repeats, tick, cfg.seed
        )
        dense_samples, head_samples = bc.measure_dense_and_head(
            om, sync, tokens, contexts, head_batches, cfg.repeats, tick, cfg.seed
        )
        expert_fit = fit_piecewise([s.tokens for s in expert_samples],
                                   [s.seconds for s in expert_samples])  # fmt: skip
        dense_fit = fit_piecewise_dense(
            [s.tokens for s in dense_samples],
            [s.context for s in dense_samples],
            [s.seconds for s in dense_samples],
            knots=tokens,
        )
        head_fit = fit_linear([s.tokens for s in head_samples], [s.seconds for s in head_samples])

        def predict(context: float) -> float:
            return bc.predicted_decode_s(
                head_fit.cost, dense_fit.cost, expert_fit.cost, spec.num_layers,
                spec.num_moe_layers, spec.top_k, context,
            )  # fmt: skip

        resid = bc.measure_overhead(
            om, prep.devices, cfg.policies, predict, cfg.overhead_prompt_tokens,
            cfg.overhead_new_tokens, cfg.overhead_rounds, tick, cfg.seed,
        )  # fmt: skip
        search_policy = _search_policy(cfg.policies)
        search_s = measure_search_s(spec, search_policy, cfg.search_store_rows, 20, tick, cfg.seed)
    finally:
        om.close()

    pinned = [s for s in link_samples if s.pinned and s.device == 0]
    pageable = [s for s in link_samples if not s.pinned and s.device == 0] or pinned
    link_fit = fit_link([s.nbytes for s in pinned], [s.seconds for s in pinned])
    page_fit = fit_link([s.nbytes for s in pageable], [s.seconds for s in pageable])
    base = "lru" if "lru" in resid else min(resid, key=resid.__getitem__)
    layer_overhead = max(0.0, resid[base])
    compute = ComputeModel(
        fitted_for_model=spec.name,
        expert=expert_fit.cost,
        dense=dense_fit.cost,
        head=head_fit.cost,
        policy_search_s=search_s,
        fit_errors={
            "expert": expert_fit.mape,
            "dense": dense_fit.mape,
            "head": head_fit.mape,
            "link": link_fit.mape,
            "link_pageable": page_fit.mape,
        },
        layer_overhead_s=layer_overhead,
        policy_overhead_s={p: max(0.0, r - layer_overhead) for p, r in resid.items() if p != base},
        torch_threads=prep.threads,
    )
    link = prep.link
    profile = HardwareProfile(
        name=cfg.name or f"calibrated-{cfg.device}-{spec.name}",
        kind="calibrated",
        device=cfg.device,  # type: ignore[arg-type]
        num_gpus=len(prep.devices),
        gpu=_gpu_spec(dev0, spec, expert_fit.cost),
        link=LinkSpec(
            pinned_bandwidth_Bps=link_fit.bandwidth_Bps,
            pageable_bandwidth_Bps=page_fit.bandwidth_Bps,
            latency_s=link_fit.latency_s,
            concurrency=1,
            emulated=link is not None,
            emulated_gbps=link.gbps if link is not None else None,
            emulated_latency_us=link.latency_us if link is not None else None,
        ),
        host_bandwidth_cap_Bps=cap,
        compute=compute,
        sources=[_provenance(prep)],
        notes=_notes(prep),
    )
    measurements = {
        "link": [asdict(s) for s in link_samples],
        "expert": [asdict(s) for s in expert_samples],
        "dense": [asdict(s) for s in dense_samples],
        "head": [asdict(s) for s in head_samples],
        "overhead_residual_s": resid,
        "search_policy": search_policy,
    }
    return BenchResult(profile, measurements)


def _search_policy(policies: list[str]) -> str:
    from policies.registry import policy_class

    for p in policies:
        if policy_class(p).async_search:
            return p
    return "fmoe"


def _measure_link(prep: PreparedBench, om: Any, sizes: list[int], tick: Callable[[int], Any]):
    from calibration import bench_link as bl

    cfg = prep.cfg
    if prep.devices[0].type != "cuda":
        return bl.measure_cpu_link(
            om.store, prep.link, sizes, cfg.repeats, cfg.chunk_bytes, tick
        ), None
    samples = bl.measure_cuda_links(prep.devices, sizes, cfg.repeats, tick)
    if len(prep.devices) < 2:
        return samples, None
    single = []
    for d in range(len(prep.devices)):
        mine = [s for s in samples if s.pinned and s.device == d]
        single.append(fit_link([s.nbytes for s in mine], [s.seconds for s in mine]).bandwidth_Bps)
    together = bl.measure_cuda_all_links(prep.devices, max(sizes), cfg.repeats, tick)
    return samples, bl.host_cap(single, together)


def _gpu_spec(dev: torch.device, spec: ModelSpec, expert: Any) -> GPUSpec:
    from calibration.bench_compute import estimate_memory_bandwidth, estimate_tflops

    bw = estimate_memory_bandwidth(spec.expert_bytes, expert(1))
    tflops = estimate_tflops(spec.hidden_size, spec.expert_intermediate_size, expert.per_token_s)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return GPUSpec(name=props.name, memory_bytes=int(props.total_memory),
                       memory_bandwidth_Bps=bw, tflops=tflops)  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPUSpec(name=f"host CPU ({_cpu_name()}) as the device", memory_bytes=int(mem),
                   memory_bandwidth_Bps=bw, tflops=tflops)  # fmt: skip


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _provenance(prep: PreparedBench) -> str:
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"measured by `fmoe calibrate bench` on {platform.node()} at {now}: model "
        f"{prep.spec.name}, device {prep.cfg.device} x{len(prep.devices)}, torch "
        f"{torch.__version__}, {prep.threads} torch threads, {prep.cfg.repeats} repeats (medians)"
    )


def _notes(prep: PreparedBench) -> str:
    link = prep.link
    if prep.cfg.device == "cpu":
        what = (
            f"an emulated link of {link.gbps:g} GB/s and {link.latency_us:g} us per transfer "
            "(CPU emulation, not PCIe)"
            if link is not None
            else "plain memory copies (no link emulation)"
        )
        return (
            f"Calibrated on the CPU: the 'device' is the host CPU and the link is {what}. "
            "Figures hold for this machine, this model and this executor only."
        )
    return "Calibrated on CUDA GPUs: pinned/pageable H2D copies timed with CUDA events."
