"""`fmoe calibrate validate`, its inputs: the config (one field per CLI flag), the prepared
validation and :func:`prepare_validation`, which checks the profile (device, model,
schema) and every other input before any weight is built (InputError names the first
problem). The run is :mod:`calibration.validate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec

DEFAULT_POLICIES = ["lru", "mixtral-offloading", "fmoe"]
CAPTURE_POLICY = "lru"


@dataclass
class ValidateConfig:
    """Every knob of a validation (CLI flags map one to one)."""

    profile: str
    model: str | None = None
    device: str | None = None
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    cache_experts: list[int] | None = None
    prompts: str = "mt-bench"
    num_prompts: int = 4
    max_new_tokens: int = 16
    max_prompt_tokens: int = 64
    batch_size: int = 1
    batching: str = "static"  # or "continuous", on both sides
    output_lens: str = "fixed"  # or "reference" (realrun.output_lens)
    repeats: int = 1  # real runs per policy x cache cell (calibration.repeats)
    chunk_bytes: int = 1 << 20
    store: str = "auto"
    seed: int = 0
    out: str | None = None


@dataclass
class PreparedValidation:
    cfg: ValidateConfig
    profile: HardwareProfile
    model_ref: str
    spec: ModelSpec
    caches: list[int]
    devices: list[torch.device]
    link: Any  # realrun.copy_engine.LinkEmulation | None
    prompts: list[Any]  # realrun.prompting.PromptText
    max_prompt_tokens: int
    threads: int
    limits: list[int] = field(default_factory=list)  # per request; set once tokenized


def load_profile(ref: str) -> HardwareProfile:
    """A profile from a JSON path or a preset name (missing field, bad JSON, unknown
    schema version: InputError naming the file)."""
    from specs.presets import load_hardware

    return load_hardware(ref)


def check_profile(profile: HardwareProfile, ref: str, model: str, device: str) -> None:
    """InputError when ``profile`` was measured on another device or fitted for another model."""
    if profile.device != device:
        raise InputError(f"{ref}: profile measured on {profile.device}, not {device}")
    fitted = profile.compute.fitted_for_model
    if fitted is not None and fitted != model:
        raise InputError(f"{ref}: profile fitted for {fitted}, not {model}")


def default_cache_sizes(spec: ModelSpec) -> list[int]:
    """A quarter, half and three quarters of all experts (at least top-K, distinct)."""
    total = spec.total_experts
    sizes = {max(spec.top_k, round(total * f)) for f in (0.25, 0.5, 0.75)}
    return sorted(s for s in sizes if s < total) or [total]


def _link_of(profile: HardwareProfile) -> Any:
    from realrun.copy_engine import LinkEmulation

    lk = profile.link
    if profile.device != "cpu" or not lk.emulated:
        return None
    gbps = lk.emulated_gbps or lk.pinned_bandwidth_Bps / 1e9
    lat = lk.emulated_latency_us if lk.emulated_gbps is not None else lk.latency_s * 1e6
    return LinkEmulation(gbps, lat or 0.0)


def prepare_validation(cfg: ValidateConfig) -> PreparedValidation:
    """Check every input before any work; InputError names the first problem."""
    from policies.registry import policy_class
    from realrun.models import resolve_model
    from realrun.output_lens import check_output_lens
    from realrun.placement import budget_experts, resolve_devices
    from realrun.prompting import check_lengths, prompt_texts
    from realrun.runner import RunConfig, torch_threads
    from realrun.serving import check_batching
    from realrun.session import refuse_future_readers

    profile = load_profile(cfg.profile)
    device = cfg.device or profile.device
    model = cfg.model or profile.compute.fitted_for_model
    if model is None:
        raise InputError(
            f"{cfg.profile}: profile is not fitted for any model; give --model "
            "(or calibrate one with `fmoe calibrate bench`)"
        )
    spec, hf_config, _ = resolve_model(model)
    check_profile(profile, cfg.profile, spec.name, device)
    if not cfg.policies:
        raise InputError("--policies needs at least one policy")
    caches = list(cfg.cache_experts) if cfg.cache_experts else default_cache_sizes(spec)
    caches = [budget_experts(spec, c) for c in caches]
    for p in cfg.policies:
        cls = policy_class(p)
        refuse_future_readers(cls)
        small = [c for c in caches if c < spec.total_experts]
        if cls.preload_all and small:
            raise InputError(
                f"policy {p!r} keeps every expert resident: it needs a cache of "
                f"{spec.total_experts} experts, got {small[0]}"
            )
    devices = resolve_devices(device, profile.num_gpus)
    if min(caches) < len(devices):
        raise InputError(
            f"a cache of {min(caches)} experts leaves some of {len(devices)} devices with no slot"
        )
    if cfg.store not in ("auto", "ram", "file"):
        raise InputError(f"unknown --store {cfg.store!r} (known: auto, ram, file)")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {cfg.repeats}")
    check_batching(cfg.batching)
    max_prompt = check_lengths(hf_config, cfg.max_prompt_tokens, cfg.max_new_tokens)
    prompts = prompt_texts(cfg.prompts, None, cfg.num_prompts)
    check_output_lens(cfg.output_lens, prompts, explicit=False)
    threads = profile.compute.torch_threads or torch_threads(RunConfig(model=model, device=device))
    if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise InputError(f"--out {cfg.out}: exists and is not a directory")
    return PreparedValidation(
        cfg, profile, model, spec, caches, devices, _link_of(profile), prompts, max_prompt, threads
    )
