"""Greedy generation of a static batch of prompts, with per-iteration timing.

One code path serves every batch size (batch size 1 is a batch of one). The prompts are
left-padded to a common length; one prefill forward runs the whole batch (its time is
every request's TTFT, waits for expert loads included, measured from the batch start:
the simulator's closed-loop static batching), then one forward per further token (each
a TPOT sample of every request still in the batch). A row stops after
``max_new_tokens`` tokens or when it produces ``eos_token_id``; finished rows leave the
batch (``DynamicCache.batch_select_indices``), so later forwards run only live rows.

Padding. Pad positions get attention mask 0 and position id 0 (what transformers'
``generate`` computes: ``cumsum(mask) - 1``, pad positions filled with 0); a real token's
position id is its index in its own prompt, so a padded row sees the same positions as
it would alone. The attention mask and position ids are passed only when some live row
is padded: an unpadded batch (every batch of one) runs exactly as an unpadded call.

Pad rows route to no expert. While a padded batch runs, a forward pre-hook on every
experts module (``experts``; for an offloaded model these are the offloaded modules)
replaces the pad rows' expert ids with ``num_experts``, the index the library's experts
forward skips: their expert output is zero, nothing is loaded or computed for them, and
observers are told which rows are real (:class:`IterationRows`). The unmodified model
run through this function does the same, which is what makes the offloaded model's
logits equal it bit for bit: CPU matmul results depend on the number of rows in the
call, so an expert must see the same token rows in both runs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from realrun.prompting import Prompt


@dataclass(frozen=True)
class IterationRows:
    """The real token rows of one forward pass, in the model's row order (batch row, then
    token). ``request_ids[r]`` and ``positions[r]`` name real row r's request and its token
    index in that request's routing (prompt tokens, then one per decode step);
    ``prefill[r]`` tells prefill rows from decode rows. ``real`` [B * S] (bool, on the
    model's device) marks which rows of the flattened forward are real; None when all are.
    ``batch`` lists the requests in the forward, in batch-row order."""

    request_ids: tuple[str, ...]
    positions: np.ndarray
    prefill: np.ndarray
    real: torch.Tensor | None
    batch: tuple[str, ...]

    def select(self, rows: torch.Tensor) -> torch.Tensor:
        """The real rows of ``rows`` [B * S, ...] (``rows`` itself when all are real)."""
        return rows if self.real is None else rows[self.real.to(rows.device)]


class IterationObserver(Protocol):
    """Told about each forward pass, around the model call."""

    def begin_iteration(self, rows: IterationRows) -> None: ...

    def end_iteration(self, finished: tuple[str, ...]) -> None:
        """The forward is done; ``finished`` are the requests that produced their last token."""


@dataclass
class Generation:
    """One request's tokens and timings (seconds)."""

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    ttft_s: float
    decode_s: list[float] = field(default_factory=list)
    logits: list[torch.Tensor] | None = None  # last-position logits of every forward, when kept
    batch_size: int = 1  # requests in the forward it joined (its prefill)

    @property
    def tpot_s(self) -> float:
        """Mean decode step; NaN for a single-token output."""
        return float(np.mean(self.decode_s)) if self.decode_s else math.nan

    @property
    def e2e_s(self) -> float:
        return self.ttft_s + float(np.sum(self.decode_s))


@contextmanager
def pad_rows_route_nowhere(experts: Sequence[nn.Module], state: dict[str, torch.Tensor | None]):
    """While inside, each experts module's ``top_k_index`` rows where ``state['real']`` is
    False become ``num_experts`` (skipped by the library forward). Hooks run first
    (``prepend``), so routing taps see the masked ids too."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict):
        real = state["real"]
        if real is None:
            return None
        args, kwargs = list(args), dict(kwargs)
        positional = len(args) >= 2  # (hidden_states, top_k_index, top_k_weights)
        idx = args[1] if positional else kwargs["top_k_index"]
        masked = idx.masked_fill(~real.to(idx.device)[:, None], int(mod.num_experts))
        if positional:
            args[1] = masked
        else:
            kwargs["top_k_index"] = masked
        return tuple(args), kwargs

    handles: list[RemovableHandle] = [
        m.register_forward_pre_hook(hook, with_kwargs=True, prepend=True) for m in experts
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


NewTokens = int | Sequence[int]
"""Tokens to generate: one limit for every prompt, or one per prompt (a trace's output lengths)."""


def token_limits(prompts: Sequence[Prompt], max_new_tokens: NewTokens) -> list[int]:
    """Per-prompt limits; ValueError unless every limit is >= 1 (one per prompt when a
    sequence) and there are prompts, none empty."""
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * len(prompts)
    else:
        limits = [int(n) for n in max_new_tokens]
        if len(limits) != len(prompts):
            raise ValueError("max_new_tokens needs one entry per prompt")
    if any(n < 1 for n in limits):
        raise ValueError("max_new_tokens must be >= 1")
    if not prompts or any(len(p.ids) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt, none of them empty")
    return limits


def new_generations(prompts: Sequence[Prompt], keep_logits: bool) -> list[Generation]:
    """Empty results, one per prompt (``batch_size`` is set when each joins a batch)."""
    return [
        Generation(
            p.request_id, list(p.ids), [], 0.0, [], [] if keep_logits else None, len(prompts)
        )
        for p in prompts
    ]


def run_iteration(
    observer: IterationObserver | None,
    rows: IterationRows,
    forward: Callable[[], torch.Tensor],
    gens: Sequence[Generation],
    limits: Sequence[int],
    eos_token_id: int | None,
) -> list[bool]:
    """One timed forward: ``forward()`` returns next-token logits [len(gens), V], row r
    for request ``gens[r]``. Each request gets its greedy token (and logits, when kept)
    and the forward's time (its TTFT if it had no token yet, else a decode step); the
    observer hears ``begin_iteration`` before and ``end_iteration`` after the forward.
    Returns per request whether it is done (its ``limits[r]`` tokens reached, or EOS)."""
    t0 = time.perf_counter()
    if observer is not None:
        observer.begin_iteration(rows)
    logits = forward()
    nxt = logits.argmax(dim=-1).tolist()
    done = [
        len(g.output_ids) + 1 >= n or (eos_token_id is not None and t == eos_token_id)
        for g, t, n in zip(gens, nxt, limits, strict=True)
    ]
    if observer is not None:
        observer.end_iteration(tuple(g.request_id for g, d in zip(gens, done, strict=True) if d))
    dt = time.perf_counter() - t0
    for r, (g, t) in enumerate(zip(gens, nxt, strict=True)):
        if g.output_ids:
            g.decode_s.append(dt)
        else:
            g.ttft_s = dt
        g.output_ids.append(t)
        if g.logits is not None:
            g.logits.append(logits[r].detach().cpu().clone())
    return done


def greedy_generate(
    model: nn.Module,
    request_id: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    observer: IterationObserver | None = None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
) -> Generation:
    """One prompt: :func:`generate_batch` with a batch of one (no padding, so no experts
    modules are needed)."""
    return generate_batch(
        model,
        [Prompt(request_id, list(prompt_ids))],
        max_new_tokens,
        observer=observer,
        keep_logits=keep_logits,
        eos_token_id=eos_token_id,
    )[0]


def generate_batch(
    model: nn.Module,
    prompts: Sequence[Prompt],
    max_new_tokens: NewTokens,
    *,
    experts: Sequence[nn.Module] = (),
    observer: IterationObserver | None = None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> list[Generation]:
    """Generate greedily for every prompt as one static batch; results in prompt order.

    ``max_new_tokens >= 1`` (one for all or one per prompt, :func:`token_limits`);
    prompts must be non-empty; the model runs on its first
    parameter's device. ``experts`` are the model's experts modules (in any order): a
    batch whose prompts differ in length needs them, to route pad rows to no expert
    (ValueError without them). ``pad_token_id`` fills pad positions (masked out; its
    value only reaches the embedding and the pad rows' own, discarded, outputs).
    """
    from transformers import DynamicCache

    limits = token_limits(prompts, max_new_tokens)
    lens = [len(p.ids) for p in prompts]
    S = max(lens)
    padded = any(n < S for n in lens)
    if padded and not experts:
        raise ValueError("a batch of prompts of different lengths needs the experts modules")
    device = next(model.parameters()).device
    B = len(prompts)
    tokens = torch.tensor(
        [[pad_token_id] * (S - n) + list(p.ids) for p, n in zip(prompts, lens, strict=True)],
        dtype=torch.long,
        device=device,
    )
    mask = torch.tensor([[0] * (S - n) + [1] * n for n in lens], dtype=torch.long, device=device)
    gens = new_generations(prompts, keep_logits)
    live = list(range(B))  # batch row -> prompt index
    cache = DynamicCache(config=model.config)
    state: dict[str, torch.Tensor | None] = {"real": None}
    with torch.no_grad(), pad_rows_route_nowhere(experts, state):
        for i in range(max(limits)):
            q = tokens.shape[1]
            real = mask[:, -q:].reshape(-1).bool() if padded else None  # this forward's rows
            state["real"] = None if real is None or bool(real.all()) else real
            rows = _rows(prompts, live, lens, i, state["real"])
            kwargs: dict[str, torch.Tensor] = {}
            if padded:  # unpadded batches run exactly as an unpadded call (no mask, no ids)
                pos = mask.cumsum(-1) - 1
                kwargs = {
                    "attention_mask": mask,
                    "position_ids": pos.masked_fill(mask == 0, 0)[:, -q:],
                }

            forward = functools.partial(
                _last_logits, model, input_ids=tokens, cache=cache, **kwargs
            )
            done = run_iteration(
                observer,
                rows,
                forward,
                [gens[j] for j in live],
                [limits[j] for j in live],
                eos_token_id,
            )
            nxt = [gens[j].output_ids[-1] for j in live]
            keep = [r for r, d in enumerate(done) if not d]
            if not keep:
                break
            if len(keep) < len(live):  # finished rows leave the batch
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(sel)
                mask = mask[sel]
                live = [live[r] for r in keep]
                nxt = [nxt[r] for r in keep]
                padded = padded and bool((mask == 0).any())
            tokens = torch.tensor([[t] for t in nxt], dtype=torch.long, device=device)
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=mask.dtype, device=device)], 1)
    return gens


def _last_logits(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """Next-token logits [B, V] of a static batch's forward."""
    return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]


def _rows(
    prompts: Sequence[Prompt],
    live: list[int],
    lens: list[int],
    step: int,
    real: torch.Tensor | None,
) -> IterationRows:
    """The real rows of step ``step`` (0: prefill of every prompt; else one token per row)."""
    batch = tuple(prompts[j].request_id for j in live)
    if step == 0:
        ids = tuple(rid for j, rid in zip(live, batch, strict=True) for _ in range(lens[j]))
        pos = np.concatenate([np.arange(lens[j]) for j in live])
    else:
        ids = batch
        pos = np.array([lens[j] + step - 1 for j in live])
    return IterationRows(ids, pos, np.full(len(ids), step == 0), real, batch)
