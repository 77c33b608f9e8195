"""The calibrated profile's description of the machine: the GPU entry, provenance, notes.

Split from :mod:`calibration.bench` (which measures and fits); ``prep`` is its
``PreparedBench`` (typed loosely here to keep the import one way).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
from typing import Any

import torch

from specs.hardware import GPUSpec
from specs.model_spec import ModelSpec


def gpu_spec(dev: torch.device, spec: ModelSpec, expert: Any) -> GPUSpec:
    """The profile's GPU entry: the device's name and memory (CUDA) or the host's (CPU),
    with the memory bandwidth and TFLOP/s the expert fit ``expert`` implies."""
    from calibration.bench_compute import estimate_memory_bandwidth, estimate_tflops

    bw = estimate_memory_bandwidth(spec.expert_bytes, expert(1))
    tflops = estimate_tflops(spec.hidden_size, spec.expert_intermediate_size, expert.per_token_s)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return GPUSpec(
            name=props.name,
            memory_bytes=int(props.total_memory),
            memory_bandwidth_Bps=bw,
            tflops=tflops,
        )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return GPUSpec(
        name=f"host CPU ({cpu_name()}) as the device",
        memory_bytes=int(mem),
        memory_bandwidth_Bps=bw,
        tflops=tflops,
    )


def cpu_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``; else the platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def provenance(prep: Any, loads: list[float | None]) -> str:
    """The profile's source line: what measured it, where, when, how, under what load."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"measured by `fmoe calibrate bench` on {platform.node()} at {now}: model "
        f"{prep.spec.name}, device {prep.cfg.device} x{len(prep.devices)}, torch "
        f"{torch.__version__}, {prep.threads} torch threads, {prep.cfg.repeats} repeats (lower quartiles), load average "
        f"{loads[0]} at the start and {loads[1]} at the end"
    )


def notes(prep: Any) -> str:
    """The profile's notes: what the device and the link were (emulated or real)."""
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
    return (
        "Calibrated on CUDA GPUs: pinned/pageable H2D copies timed with CUDA events (raw); "
        "the link's pinned figures are fitted to expert rows copied through the executor's "
        f"copy engine ({prep.cfg.chunk_bytes} B chunks, one event wait per chunk)."
    )
