"""`fmoe calibrate bench`: measure this machine for one model and write a calibrated profile.

Steps (each a module of its own): the host->device link (:mod:`calibration.bench_link`),
expert FFN, dense/attention and head time and the real executor's per-layer overhead
per policy (:mod:`calibration.bench_compute`), an async policy's search time
(:mod:`calibration.bench_policy`), how much longer compute takes while the link copies
(:mod:`calibration.bench_interference`). The fits (:mod:`calibration.fit`,
:mod:`calibration.piecewise`) become a :class:`HardwareProfile` of kind ``calibrated``
whose ``compute.fit_errors`` holds each fit's mean absolute percentage error.

Sits on top of realrun (it times the real executor's own objects); realrun and sim never
import it. :func:`prepare_bench` checks every input before any weight is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from calibration.bench_link import median_spread
from calibration.bench_meta import gpu_spec, notes, provenance
from calibration.fit import Fit, _mape, fit_linear, fit_link
from calibration.piecewise import choose_knots, fit_piecewise, fit_piecewise_dense, isotonic
from calibration.stopwatch import device_sync, load_average
from specs.errors import InputError
from specs.hardware import ComputeModel, HardwareProfile, LinearCost, LinkSpec
from specs.model_spec import ModelSpec

DEFAULT_POLICIES = ["lru", "lfu", "mixtral-offloading", "fmoe"]
SEARCH_STEPS = 20  # timed iterations of the async policy's search


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
    repeats: int = 7
    max_tokens: int = 128
    max_context: int = 256
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    overhead_rounds: int = 4
    interference_rounds: int = 7
    overhead_prompt_tokens: int = 32
    overhead_new_tokens: int = 16
    search_store_rows: int = 256
    chunk_bytes: int = 1 << 20
    store: str = "auto"
    seed: int = 0
    name: str | None = None
    link_sizes: list[int] | None = None  # bytes; default: one expert row down by halves
    expert_shapes: list[str] = field(default_factory=list)  # model presets (bench_shapes)
    shape_tokens: list[int] | None = None  # default bench_shapes.SHAPE_TOKENS
    shape_dtype: str = "bf16"


@dataclass
class PreparedBench:
    cfg: BenchConfig
    spec: ModelSpec
    devices: list[torch.device]
    link: Any  # realrun.copy_engine.LinkEmulation | None
    threads: int


@dataclass
class BenchResult:
    """The calibrated profile and the raw figures it was fitted to."""

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
            "policy_overhead_per_row_s": c.policy_overhead_per_row_s,
            "policy_search_s": c.policy_search_s,
            "policy_start_search_1_row_s": c.start_search_s(1),
            "copy_interference": c.copy_interference,
            "torch_threads": c.torch_threads,
            "link_spread_median": median_spread(self.measurements.get("link", [])),
            "expert_shapes_1_token_s": {
                s["model"]: s["seconds"]
                for s in self.measurements.get("expert_shapes", [])
                if s["tokens"] == 1
            },
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
        ("--interference-rounds", cfg.interference_rounds, 1),
    ):
        if v < lo:
            raise InputError(f"{what} must be >= {lo}, got {v}")
    if cfg.store not in ("auto", "ram", "file"):
        raise InputError(f"unknown --store {cfg.store!r} (known: auto, ram, file)")
    if not cfg.policies:
        raise InputError("--policies needs at least one policy")
    if cfg.link_sizes is not None and (not cfg.link_sizes or min(cfg.link_sizes) < 1):
        raise InputError(f"--link-sizes must be positive byte counts, got {cfg.link_sizes}")
    if cfg.expert_shapes:
        from calibration.bench_shapes import SHAPE_TOKENS, check_shapes

        check_shapes(cfg.expert_shapes, cfg.shape_dtype, cfg.shape_tokens or SHAPE_TOKENS)
    for p in cfg.policies:
        refuse_future_readers(policy_class(p))
    threads = torch_threads(RunConfig(model=cfg.model, device=cfg.device, threads=cfg.threads))
    return PreparedBench(cfg, spec, devices, link, threads)


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> BenchResult:
    """prepare + measure + fit (see the module docstring)."""
    return execute_bench(prepare_bench(cfg), progress)


def execute_bench(prep: PreparedBench, progress: Progress | None = None) -> BenchResult:
    """Measure and fit; torch runs on ``prep.threads`` threads throughout (as the real run)."""
    from realrun.runner import threads_set

    with threads_set(prep.threads):
        return _execute(prep, progress if progress is not None else NullProgress())


@dataclass
class _Raw:
    """Everything measured, before fitting."""

    link: list[Any]
    host_cap_Bps: float | None
    expert: list[Any]
    dense: list[Any]
    head: list[Any]
    overhead: Any  # bench_compute.Overhead
    search_policy: str
    search: Any  # bench_policy.SearchTimes
    interference: Any  # bench_interference.Interference
    load_average: list[float | None]
    shapes: list[Any] = field(default_factory=list)  # bench_shapes.ShapeSample


def _execute(prep: PreparedBench, bar: Progress) -> BenchResult:
    raw = _measure(prep, bar)
    return BenchResult(_build_profile(prep, raw), _measurements(raw))


def _measure(prep: PreparedBench, bar: Progress) -> _Raw:
    from calibration import bench_compute as bc
    from calibration import bench_link as bl
    from calibration.bench_interference import measure_interference
    from calibration.bench_policy import SEARCH_ROWS, measure_search_s
    from calibration.bench_shapes import SHAPE_TOKENS, measure_shapes
    from realrun.models import load
    from realrun.offload import offload_model

    cfg, spec, dev0 = prep.cfg, prep.spec, prep.devices[0]
    tick: Callable[[int], Any] = bar.update
    load_start = load_average()
    bar.write(f"building {spec.name} and offloading its experts")
    loaded = load(cfg.model, seed=cfg.seed)
    with torch.no_grad():  # one-time kernel setup, as the real run does before offloading
        loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    om = offload_model(loaded, store=cfg.store, dense_device=dev0)
    sync = device_sync(dev0)
    try:
        sizes = bl.link_sizes(cfg.link_sizes, om.store.row_bytes, dev0.type == "cuda")
        shape_tokens = list(cfg.shape_tokens or SHAPE_TOKENS)
        tokens, contexts = bc.dense_points(cfg.max_tokens, cfg.max_context)
        head_batches = [1, 2, 4, 8]
        n_dev = len(prep.devices)
        n_link = len(sizes) * cfg.repeats * (2 * n_dev + 1 if dev0.type == "cuda" else 1)
        n_link += n_dev * cfg.repeats if dev0.type == "cuda" and n_dev > 1 else 0
        n_dense = (2 * (len(tokens) + len(contexts)) + len(head_batches)) * cfg.repeats
        n_expert = len(tokens) * cfg.repeats
        n_rounds = cfg.overhead_rounds + 1 + cfg.interference_rounds
        n_search = SEARCH_STEPS * len(SEARCH_ROWS)
        n_shapes = len(cfg.expert_shapes) * len(shape_tokens)
        bar.reset(total=n_link + n_dense + n_expert + n_rounds + n_search + n_shapes)

        link_samples, cap = _measure_link(prep, om, sizes, tick)
        experts = bc.ExpertTimer(om, dev0, sync, cfg.seed)
        expert_samples = bc.measure_experts(experts, tokens, cfg.repeats, tick)
        dense_samples, head_samples = bc.measure_dense_and_head(
            om, sync, tokens, contexts, head_batches, cfg.repeats, tick, cfg.seed
        )
        order = sorted(cfg.policies, key=lambda p: p != "lru")  # lru is the reference
        overhead = bc.measure_overhead(
            om,
            prep.devices,
            order,
            experts,
            cfg.overhead_prompt_tokens,
            cfg.overhead_new_tokens,
            cfg.overhead_rounds,
            tick,
            cfg.seed,
        )
        del experts  # its slot pool
        interference = measure_interference(
            om, dev0, prep.link, cfg.chunk_bytes, cfg.interference_rounds, tick=tick
        )
        search_policy = _search_policy(cfg.policies)
        search = measure_search_s(
            spec, search_policy, cfg.search_store_rows, SEARCH_STEPS, tick, cfg.seed
        )
        shapes = measure_shapes(
            cfg.expert_shapes, dev0, cfg.shape_dtype, shape_tokens, cfg.repeats, tick, cfg.seed
        )
    finally:
        om.close()
    return _Raw(
        link_samples,
        cap,
        expert_samples,
        dense_samples,
        head_samples,
        overhead,
        search_policy,
        search,
        interference,
        [load_start, load_average()],
        shapes,
    )


def _build_profile(prep: PreparedBench, raw: _Raw) -> HardwareProfile:
    """The fits of ``raw`` as a calibrated profile."""
    cfg, spec = prep.cfg, prep.spec
    expert_fit, dense_fit = fit_compute(raw.expert, raw.dense)
    head_fit = fit_linear([s.tokens for s in raw.head], [s.seconds for s in raw.head])
    dev0 = [s for s in raw.link if s.device == 0]
    engine = [s for s in dev0 if s.path == "engine"]  # the executor's path, when measured
    pinned = engine or [s for s in dev0 if s.pinned]
    pageable = [s for s in dev0 if not s.pinned and s.path == "raw"] or pinned
    link_fit = fit_link([s.nbytes for s in pinned], [s.seconds for s in pinned])
    page_fit = fit_link([s.nbytes for s in pageable], [s.seconds for s in pageable])
    policy_fixed, policy_per_row = raw.overhead.per_policy()
    compute = ComputeModel(
        fitted_for_model=spec.name,
        expert=expert_fit.cost,
        dense=dense_fit.cost,
        head=head_fit.cost,
        policy_search_s=raw.search.gate_s[1],
        policy_gate_search=_by_rows(raw.search.gate_s),
        policy_start_search=_by_rows(raw.search.start_s),
        fit_errors={
            "expert": expert_fit.mape,
            "dense": dense_fit.mape,
            "head": head_fit.mape,
            "link": link_fit.mape,
            "link_pageable": page_fit.mape,
        },
        # policies not measured get layer_overhead_s alone
        layer_overhead_s=max(0.0, raw.overhead.base_s),
        policy_overhead_s=policy_fixed,
        policy_overhead_per_row_s=policy_per_row,
        experts_wait_for_loads=True,  # the real executor runs a layer in one fused call
        copy_interference=min(max(raw.interference.factor(), 0.5), 5.0),
        torch_threads=prep.threads,
    )
    link = prep.link
    return HardwareProfile(
        name=cfg.name or f"calibrated-{cfg.device}-{spec.name}",
        kind="calibrated",
        device=cfg.device,  # type: ignore[arg-type]
        num_gpus=len(prep.devices),
        gpu=gpu_spec(prep.devices[0], spec, expert_fit.cost),
        link=LinkSpec(
            pinned_bandwidth_Bps=link_fit.bandwidth_Bps,
            pageable_bandwidth_Bps=page_fit.bandwidth_Bps,
            latency_s=link_fit.latency_s,
            concurrency=1,
            emulated=link is not None,
            emulated_gbps=link.gbps if link is not None else None,
            emulated_latency_us=link.latency_us if link is not None else None,
        ),
        host_bandwidth_cap_Bps=raw.host_cap_Bps,
        compute=compute,
        sources=[provenance(prep, raw.load_average)],
        notes=notes(prep),
    )


def _measurements(raw: _Raw) -> dict[str, Any]:
    return {
        "link": [asdict(s) for s in raw.link],
        "expert": [asdict(s) for s in raw.expert],
        "dense": [asdict(s) for s in raw.dense],
        "head": [asdict(s) for s in raw.head],
        "overhead": asdict(raw.overhead),
        "search_policy": raw.search_policy,
        "gate_search_s": {str(k): v for k, v in raw.search.gate_s.items()},
        "start_search_s": {str(k): v for k, v in raw.search.start_s.items()},
        "interference": {**asdict(raw.interference), "factor": raw.interference.factor()},
        "load_average": raw.load_average,
        "expert_shapes": [asdict(s) for s in raw.shapes],
    }


def _by_rows(seconds: dict[int, float]) -> LinearCost:
    """A search's time vs token rows, piecewise linear through the measured counts."""
    return fit_piecewise(list(seconds), list(seconds.values()), knots=list(seconds)).cost


def fit_compute(expert: list[Any], dense: list[Any]) -> tuple[Fit, Fit]:
    """Piecewise fits of the expert and dense samples (``bench_compute.Sample``).

    Each series (experts by tokens; prefill by tokens; decode by context) is made
    nondecreasing first (:func:`calibration.piecewise.isotonic`); the reported error is
    against the raw figures."""
    e = sorted(expert, key=lambda s: s.tokens)
    ex, ey = np.array([s.tokens for s in e], float), np.array([s.seconds for s in e])
    efit = fit_piecewise(ex, isotonic(ey))
    efit = Fit(efit.cost, _mape(np.array([efit.cost(x) for x in ex]), ey))
    pre = sorted((s for s in dense if s.context == (s.tokens + 1) / 2), key=lambda s: s.tokens)
    dec = sorted((s for s in dense if s not in pre), key=lambda s: s.context)
    rows = pre + dec
    t = np.array([s.tokens for s in rows], float)
    c = np.array([s.context for s in rows], float)
    raw = np.array([s.seconds for s in rows])
    smooth = np.concatenate([isotonic(raw[: len(pre)]), isotonic(raw[len(pre) :])])
    dfit = fit_piecewise_dense(t, c, smooth, knots=choose_knots([s.tokens for s in pre]))
    pred = np.array([dfit.cost(a, b) for a, b in zip(t, c, strict=True)])
    return efit, Fit(dfit.cost, _mape(pred, raw))


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
    rows = sorted({min(n, om.store.row_bytes) for n in sizes})  # the engine copies expert rows
    samples += bl.measure_cpu_link(
        om.store, None, rows, cfg.repeats, cfg.chunk_bytes, tick, device=prep.devices[0]
    )
    if len(prep.devices) < 2:
        return samples, None
    single = []
    for d in range(len(prep.devices)):
        mine = [s for s in samples if s.pinned and s.device == d]
        single.append(fit_link([s.nbytes for s in mine], [s.seconds for s in mine]).bandwidth_Bps)
    together = bl.measure_cuda_all_links(prep.devices, max(sizes), cfg.repeats, tick)
    return samples, bl.host_cap(single, together)
