"""Compute microbenchmarks on the real executor's model: experts, dense layers, head, overhead.

Everything is timed on an :class:`realrun.offload.OffloadedModel`, the object the real
executor runs, so the figures include what the executor adds (experts read from slot
views, the model's own attention and router code):

- expert FFN: the library experts forward on a slot pool (as the executor calls it), all
  ``n`` tokens routed to the same top-K experts; one expert's time is the call / K;
- dense and head: the model's forward with every offloaded experts module answering
  zeros (attention, norms, router and the executor's embedding path stay), once with all
  decoder layers and once with none; the head is the layer-less forward, one decoder
  layer's dense part is (full - head) / layers. Prefill points run ``t`` prompt tokens
  (mean context (t + 1) / 2, as the simulator counts it); decode points one token after
  ``c - 1`` cached ones (context ``c``);
- executor overhead: a :class:`realrun.session.RunSession` per policy with every expert
  resident decodes a prompt; each step's time minus the fitted head, dense and expert
  costs, per MoE layer, is what the executor (hooks, routing bookkeeping, cache calls,
  the policy's own work on the compute thread) adds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from calibration.hardware import LinearCost
from calibration.stopwatch import Tick, _no_tick, interleaved_medians, time_call
from realrun.offload import OffloadedModel
from realrun.residency import SlotPool


@dataclass(frozen=True)
class Sample:
    """One measured point: ``tokens`` rows with mean KV ``context`` took ``seconds``."""

    tokens: int
    context: float
    seconds: float


class _ZeroExperts:
    """A LayerRunner whose experts contribute nothing and cost (almost) nothing."""

    def run_layer(self, mod, hidden, top_k_index, top_k_weights) -> torch.Tensor:
        return torch.zeros_like(hidden)


@contextmanager
def zero_experts(om: OffloadedModel) -> Iterator[None]:
    """Attach :class:`_ZeroExperts` to every offloaded experts module for the block."""
    if any(m.runner is not None for m in om.modules):
        raise RuntimeError("a session is attached to this model; close it first")
    stub = _ZeroExperts()
    for m in om.modules:
        m.runner = stub
    try:
        yield
    finally:
        for m in om.modules:
            m.runner = None


def _decoder_owner(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


@contextmanager
def without_layers(model: nn.Module) -> Iterator[None]:
    """The model with no decoder layers (embedding, final norm, LM head and the
    framework's per-forward work only)."""
    owner = _decoder_owner(model)
    layers = owner.layers
    owner.layers = nn.ModuleList()
    try:
        yield
    finally:
        owner.layers = layers


def _vocab_ids(model: nn.Module, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, (rows, cols), generator=gen)


def _forward_timer(
    model: nn.Module,
    device: torch.device,
    sync: Callable[[], None],
    tokens: int,
    past: int,
    batch: int,
    gen: torch.Generator,
) -> Callable[[], float]:
    """A measurement of one forward of ``batch`` x ``tokens`` new tokens after ``past``
    cached ones (the cache is built, unmeasured, before each run)."""
    from transformers import DynamicCache

    def run() -> float:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            if past:
                ids = _vocab_ids(model, batch, past, gen).to(device)
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids = _vocab_ids(model, batch, tokens, gen).to(device)
            return time_call(
                lambda: model(
                    input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1
                ),
                sync,
            )

    return run


TOKEN_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
CONTEXT_GRID = (8, 32, 64, 128, 256, 512, 1024, 2048)


def dense_points(max_tokens: int, max_context: int) -> tuple[list[int], list[int]]:
    """Prefill token counts (1 .. max_tokens, log-spaced) and decode contexts to measure."""
    tokens = {t for t in TOKEN_GRID if t <= max_tokens} | {max_tokens}
    contexts = {c for c in CONTEXT_GRID if c <= max_context} | {max_context}
    return sorted(tokens), sorted(contexts)


def measure_dense_and_head(
    om: OffloadedModel,
    sync: Callable[[], None],
    prefill_tokens: Sequence[int],
    decode_contexts: Sequence[int],
    head_batches: Sequence[int],
    repeats: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> tuple[list[Sample], list[Sample]]:
    """(dense per decoder layer, head) samples; see the module docstring."""
    model, device = om.loaded.model, om.dense_device
    gen = torch.Generator().manual_seed(seed)
    layers = len(_decoder_owner(model).layers)
    # (tokens, past, batch) per point: prefill t tokens; decode 1 token after c - 1
    shapes = [(t, 0, 1) for t in prefill_tokens] + [(1, c - 1, 1) for c in decode_contexts]
    heads = [(1, 0, b) for b in head_batches]
    with zero_experts(om):
        full_t = {s: _forward_timer(model, device, sync, *s, gen) for s in shapes}
        full = interleaved_medians(full_t, repeats, tick)
        with without_layers(model):
            head_t = {s: _forward_timer(model, device, sync, *s, gen) for s in shapes + heads}
            head = interleaved_medians(head_t, repeats, tick)
    dense = []
    for s in shapes:
        t, past, _ = s
        context = (t + 1) / 2 if past == 0 else past + 1
        dense.append(Sample(t, context, max(full[s] - head[s], 1e-9) / layers))
    head_samples = [Sample(b, 0.0, head[(1, 0, b)]) for b in head_batches]
    return dense, head_samples


def _fill_pool(om: OffloadedModel, pool: SlotPool, layer: int) -> None:
    store = om.store
    n = store.layouts[layer].row_bytes
    for slot in range(pool.capacity):
        row = pool.rows[slot, :n]
        if pool.device.type == "cpu":
            store.read_into(layer, slot, 0, n, row)
        else:
            src = store.host_row(layer, slot)
            row.copy_(src if src is not None else store.read_row(layer, slot))


def measure_experts(
    om: OffloadedModel,
    device: torch.device,
    sync: Callable[[], None],
    token_counts: Sequence[int],
    repeats: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> list[Sample]:
    """One routed expert's time on ``n`` tokens, per ``n`` in ``token_counts``."""
    spec = om.loaded.spec
    mod = om.modules[0]
    K, J, H = spec.top_k, spec.num_experts, spec.hidden_size
    pool = SlotPool(J, om.store.row_bytes, device)
    _fill_pool(om, pool, mod.moe_layer)
    views = pool.views(mod.layout)
    dtype = next(iter(views.values())).dtype
    gen = torch.Generator().manual_seed(seed)

    def point(n: int) -> Callable[[], float]:
        hidden = torch.randn(n, H, generator=gen).to(device=device, dtype=dtype)
        idx = torch.arange(K).repeat(n, 1).to(device)
        w = torch.full((n, K), 1.0 / K, dtype=dtype, device=device)

        def run() -> float:
            with torch.no_grad():
                return time_call(lambda: mod.call_on_view(views, J, hidden, idx, w), sync) / K

        return run

    med = interleaved_medians({n: point(n) for n in token_counts}, repeats, tick)
    return [Sample(n, 0.0, s) for n, s in med.items()]


def predicted_decode_s(
    head: LinearCost,
    dense: LinearCost,
    expert: LinearCost,
    layers: int,
    moe_layers: int,
    top_k: int,
    context: float,
) -> float:
    """The simulator's decode step of one request without overhead or transfers."""
    return head(1) + layers * dense(1, context) + moe_layers * top_k * expert(1)


def measure_overhead(
    om: OffloadedModel,
    devices: Sequence[torch.device],
    policies: Sequence[str],
    predict: Callable[[float], float],
    prompt_tokens: int,
    new_tokens: int,
    rounds: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> dict[str, float]:
    """Per MoE layer step: median over decode steps of (measured - ``predict(context)``) /
    MoE layers, per policy, every expert resident (no copies). Policies take turns, one
    prompt each per round, so slow phases of a shared machine hit all of them alike."""
    from policies.registry import make_policy
    from realrun.session import RunSession, SessionOptions

    spec = om.loaded.spec
    gen = torch.Generator().manual_seed(seed)
    vocab = om.loaded.model.get_input_embeddings().num_embeddings
    every = [(lay, e) for lay in range(spec.num_moe_layers) for e in range(spec.num_experts)]
    resid: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(rounds + 1):  # round 0 warms up
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
        for p in policies:
            policy = make_policy(p)
            opts = SessionOptions(None, list(devices), None, seed=seed)
            with RunSession(om, policy, opts) as s:
                if not policy.preload_all:  # every expert resident: no copy in the timings
                    s.res.preload(every)
                g = s.generate(f"bench{r}", ids, new_tokens)
            if r == 0:
                continue
            for i, step in enumerate(g.decode_s):
                ctx = prompt_tokens + i + 1
                resid[p].append((step - predict(ctx)) / spec.num_moe_layers)
            tick(1)
    return {p: float(statistics.median(v)) for p, v in resid.items()}


def estimate_memory_bandwidth(expert_bytes: int, expert_one_token_s: float) -> float:
    """Bytes/s the device streams weights at: one expert's bytes over its 1-token time."""
    return expert_bytes / max(expert_one_token_s, 1e-12)


def estimate_tflops(hidden: int, intermediate: int, per_token_s: float) -> float:
    """TFLOP/s of the expert FFN at large token counts (3 matmuls, 2 flops per MAC)."""
    if per_token_s <= 0:
        return 1.0
    return float(np.clip(6 * hidden * intermediate / per_token_s / 1e12, 1e-3, 1e4))
