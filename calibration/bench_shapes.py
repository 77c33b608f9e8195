"""Expert FFN time against tokens for real expert shapes (``--expert-shapes``).

The bench's own expert figures (:mod:`calibration.bench_compute`) come from the model it
runs, which on a development machine has toy dimensions. This step times the expert FFN
of real models' shapes on the device, with random weights of the shape and dtype: for a
model preset (hidden H, expert intermediate I, top-K), K experts each get all ``n``
tokens, each expert computing what transformers' eager experts forward computes per
expert: ``gate, up = (x @ W_gu.T).chunk(2)``; ``h = silu(gate) * up``; ``y = h @ W_d.T``
(W_gu [2I, H], W_d [H, I]). One expert's time is the call's over K, as in the bench's
own expert timer, so K distinct weight sets are read per call (no expert's weights sit
in the cache for the next). Timed with CUDA events on a GPU, ``perf_counter`` around a
synchronised call on the CPU.

Each point reports the lower quartile (the bench's robust figure), the median and the
spread (interquartile range over the median) of its repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from calibration.stopwatch import Tick, _no_tick
from specs.errors import InputError

SHAPE_PRESETS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
"""Real expert shapes the GPU check times: 4096x14336 (top-2), 2048x768 (top-8), 7168x2048 (top-8)."""
SHAPE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ShapeSample:
    """One routed expert of ``model``'s shape on ``tokens`` tokens: seconds (lower quartile,
    median) over ``repeats`` timings and their spread ((q75 - q25) / median)."""

    model: str
    hidden: int
    intermediate: int
    top_k: int
    dtype: str
    tokens: int
    seconds: float
    median_s: float
    spread: float
    repeats: int


def check_shapes(names: Sequence[str], dtype: str, tokens: Sequence[int]) -> None:
    """InputError unless every name is a model preset, the dtype known and tokens >= 1."""
    from specs.presets import model_preset_names

    known = model_preset_names()
    for n in names:
        if n not in known:
            raise InputError(
                f"--expert-shapes: unknown model preset {n!r} (e.g. {', '.join(SHAPE_PRESETS)})"
            )
    if dtype not in TORCH_DTYPES:
        raise InputError(f"--shape-dtype {dtype!r}: known {', '.join(TORCH_DTYPES)}")
    if any(t < 1 for t in tokens):
        raise InputError(f"--shape-tokens must all be >= 1, got {list(tokens)}")


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds one call of ``fn`` takes on ``device`` (CUDA events; else a synced clock)."""
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def expert_ffn(x: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor) -> torch.Tensor:
    """One expert's FFN as the eager experts forward computes it (see the module doc)."""
    gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_d)


def measure_shape(
    model: str,
    device: torch.device,
    dtype: str,
    tokens: Sequence[int],
    repeats: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> list[ShapeSample]:
    """Per token count, one routed expert's seconds for ``model``'s expert shape."""
    from specs.presets import load_model

    spec = load_model(model)
    H, inter, K = spec.hidden_size, spec.expert_intermediate_size, spec.top_k
    dt = TORCH_DTYPES[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = H**-0.5
    w_gu = [
        torch.randn(2 * inter, H, generator=gen, device=device, dtype=dt) * scale for _ in range(K)
    ]
    w_d = [torch.randn(H, inter, generator=gen, device=device, dtype=dt) * scale for _ in range(K)]
    timer = _timer(device)
    out: list[ShapeSample] = []
    with torch.no_grad():
        for n in tokens:
            x = torch.randn(n, H, generator=gen, device=device, dtype=dt)

            def call(x: torch.Tensor = x) -> None:
                for a, b in zip(w_gu, w_d, strict=True):
                    expert_ffn(x, a, b)

            timer(call)  # warm-up: kernel selection, allocator
            ts = np.array([timer(call) / K for _ in range(repeats)])
            q25, med, q75 = (float(v) for v in np.quantile(ts, [0.25, 0.5, 0.75]))
            spread = (q75 - q25) / med if med > 0 else 0.0
            out.append(ShapeSample(model, H, inter, K, dtype, n, q25, med, spread, repeats))
            tick(1)
    return out


def measure_shapes(
    models: Sequence[str],
    device: torch.device,
    dtype: str,
    tokens: Sequence[int],
    repeats: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> list[ShapeSample]:
    """:func:`measure_shape` for every model, one after another (weights freed between)."""
    out: list[ShapeSample] = []
    for m in models:
        out += measure_shape(m, device, dtype, tokens, repeats, tick, seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
