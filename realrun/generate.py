"""Greedy generation, one prompt at a time, with per-iteration timing.

One prefill forward over the prompt (its time is the TTFT, waits for expert loads
included), then one forward per further token (each a TPOT sample). The loop generates
exactly ``max_new_tokens`` tokens unless ``eos_token_id`` is given and produced, so runs
of the unmodified and the offloaded model are comparable token by token.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn


class IterationObserver(Protocol):
    """Told about each forward pass, around the model call."""

    def begin_iteration(self, positions: np.ndarray, prefill: bool) -> None: ...

    def end_iteration(self, last: bool) -> None: ...


@dataclass
class Generation:
    """One request's tokens and timings (seconds)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    ttft_s: float
    decode_s: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # last-position logits of every forward, when kept

    @property
    def tpot_s(self) -> float:
        """Mean decode step; NaN for a single-token output."""
        return float(np.mean(self.decode_s)) if self.decode_s else math.nan

    @property
    def e2e_s(self) -> float:
        return self.ttft_s + float(np.sum(self.decode_s))


def greedy_generate(
    model: nn.Module,
    request_id: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    observer: IterationObserver | None = None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
) -> Generation:
    """Generate greedily; ``max_new_tokens >= 1``; the model runs on its first parameter's device."""
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    p = len(prompt_ids)
    cache = DynamicCache(config=model.config)
    out_ids: list[int] = []
    logits_kept: list[torch.Tensor] | None = [] if keep_logits else None
    decode_s: list[float] = []
    ttft = 0.0
    tokens = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            positions = np.arange(p) if i == 0 else np.array([p + i - 1])
            t0 = time.perf_counter()
            if observer is not None:
                observer.begin_iteration(positions, i == 0)
            logits = model(
                input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1
            ).logits[:, -1]
            nxt = int(logits.argmax(dim=-1).item())
            stop = last or (eos_token_id is not None and nxt == eos_token_id)
            if observer is not None:
                observer.end_iteration(stop)
            dt = time.perf_counter() - t0
            if i == 0:
                ttft = dt
            else:
                decode_s.append(dt)
            out_ids.append(nxt)
            if logits_kept is not None:
                logits_kept.append(logits[0].detach().cpu().clone())
            if stop:
                break
            tokens = torch.tensor([[nxt]], dtype=torch.long, device=device)
    return Generation(request_id, list(prompt_ids), out_ids, ttft, decode_s, logits_kept)
