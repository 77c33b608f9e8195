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
  resident serves a prompt; the reference policy's decode step minus the same step's
  compute (zero-experts forward + expert calls, timed in the same round), per MoE
  layer, is what the executor adds (hooks, routing bookkeeping, cache calls); every
  other policy's difference to the reference, paired by step, is its own work on the
  compute thread (see :class:`Overhead`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from calibration.stopwatch import Tick, _no_tick, interleaved_times, robust_time, time_call
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
                model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            ids = _vocab_ids(model, batch, tokens, gen).to(device)
            return time_call(
                lambda: model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1),
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
        full = interleaved_times(full_t, repeats, tick)
        with without_layers(model):
            head_t = {s: _forward_timer(model, device, sync, *s, gen) for s in shapes + heads}
            head = interleaved_times(head_t, repeats, tick)
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


class ExpertTimer:
    """Times the library experts forward on a slot pool holding one layer's experts, the
    way the executor calls it; every token goes to the same top-K experts."""

    def __init__(
        self, om: OffloadedModel, device: torch.device, sync: Callable[[], None], seed: int = 0
    ) -> None:
        spec = om.loaded.spec
        self.mod = om.modules[0]
        self.K, self.J, self.H = spec.top_k, spec.num_experts, spec.hidden_size
        self.device, self.sync = device, sync
        self.pool = SlotPool(self.J, om.store.row_bytes, device)
        _fill_pool(om, self.pool, self.mod.moe_layer)
        self.views = self.pool.views(self.mod.layout)
        self.dtype = next(iter(self.views.values())).dtype
        self.gen = torch.Generator().manual_seed(seed)

    def point(self, n: int) -> Callable[[], float]:
        """A measurement of one expert's seconds on ``n`` tokens (the call / K)."""
        hidden = torch.randn(n, self.H, generator=self.gen).to(self.device, self.dtype)
        idx = torch.arange(self.K).repeat(n, 1).to(self.device)
        w = torch.full((n, self.K), 1.0 / self.K, dtype=self.dtype, device=self.device)
        mod, views, J, K = self.mod, self.views, self.J, self.K

        def run() -> float:
            with torch.no_grad():
                call = lambda: mod.call_on_view(views, J, hidden, idx, w)  # noqa: E731
                return time_call(call, self.sync) / K

        return run


def measure_experts(
    timer: ExpertTimer, token_counts: Sequence[int], repeats: int, tick: Tick = _no_tick
) -> list[Sample]:
    """One routed expert's time on ``n`` tokens, per ``n`` in ``token_counts``."""
    med = interleaved_times({n: timer.point(n) for n in token_counts}, repeats, tick)
    return [Sample(n, 0.0, s) for n, s in med.items()]


@dataclass(frozen=True)
class Overhead:
    """What the executor adds per MoE layer step, from sessions with every expert resident.

    ``base_s``: the reference policy's decode step minus the compute of the same step
    (the model's forward with zero experts plus K expert calls per layer, timed in the
    same round), per MoE layer. ``decode_extra_s``: each other policy's decode step minus
    the reference policy's on the same prompt (paired, so slow phases of a shared machine
    cancel), per MoE layer, the median over rounds. ``prefill_extra_s``: the same for the
    prefill, one value per round (a prefill has ``prefill_rows`` token rows).
    """

    base_policy: str
    base_s: float
    decode_extra_s: dict[str, float]
    prefill_extra_s: dict[str, list[float]]
    prefill_rows: int

    def per_policy(self) -> tuple[dict[str, float], dict[str, float]]:
        """(per layer step, per layer step and row) extra seconds per policy, >= 0, from a
        line through the decode (1 row) and the median prefill (``prefill_rows``) points.

        A per-row cost is kept only when the prefill's extra stands out of its rounds'
        spread (above the decode extra by more than two standard errors of the median):
        otherwise the slope is the noise of a whole prefill's time, which a long prompt
        would multiply (measured once: 0.48 ms per row for mixtral-offloading from four
        32-token prefills, whose real per-row cost is ~0), and it is 0."""
        fixed, per_row = {}, {}
        for p, d1 in self.decode_extra_s.items():
            samples = self.prefill_extra_s[p]
            rise = statistics.median(samples) - d1
            b = rise / max(self.prefill_rows - 1, 1)
            significant = rise > 2 * median_standard_error(samples)
            per_row[p] = max(0.0, b) if significant else 0.0
            fixed[p] = max(0.0, d1 - per_row[p])
        return fixed, per_row


def median_standard_error(samples: Sequence[float]) -> float:
    """Standard error of the median of ``samples``: 1.4826 x MAD (a robust sigma) x
    sqrt(pi / 2) / sqrt(n); infinite for fewer than 3 samples (no spread to judge by)."""
    n = len(samples)
    if n < 3:
        return math.inf
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    return 1.4826 * mad * math.sqrt(math.pi / 2 / n)


@contextmanager
def resident_session(
    om: OffloadedModel, devices: Sequence[torch.device], policy_name: str, seed: int = 0
) -> Iterator[Any]:
    """A RunSession of a fresh ``policy_name`` with every expert resident (no copy in the
    timings taken inside), closed on exit."""
    from policies.registry import make_policy
    from realrun.session import RunSession, SessionOptions

    policy = make_policy(policy_name)
    with RunSession(om, policy, SessionOptions(None, list(devices), None, seed=seed)) as s:
        if not policy.preload_all:
            spec = om.loaded.spec
            s.res.preload(
                [(lay, e) for lay in range(spec.num_moe_layers) for e in range(spec.num_experts)]
            )
        yield s


def measure_overhead(
    om: OffloadedModel,
    devices: Sequence[torch.device],
    policies: Sequence[str],
    experts: ExpertTimer,
    prompt_tokens: int,
    new_tokens: int,
    rounds: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> Overhead:
    """Executor overhead per MoE layer step (see :class:`Overhead`); ``policies[0]`` is the
    reference. Per round every policy serves the same random prompt (after an unmeasured
    one: a policy's first request pays its one-time setup, which a run amortises), then
    the zero-experts model decodes it and the expert call is timed, so all figures of a
    round share its machine state."""
    from realrun.generate import greedy_generate

    spec = om.loaded.spec
    L, K = spec.num_moe_layers, spec.top_k
    gen = torch.Generator().manual_seed(seed)
    vocab = om.loaded.model.get_input_embeddings().num_embeddings
    base = policies[0]
    one_token = experts.point(1)
    resid: list[float] = []
    dec: dict[str, list[float]] = {p: [] for p in policies[1:]}
    pre: dict[str, list[float]] = {p: [] for p in policies[1:]}
    for r in range(rounds + 1):  # round 0 warms up
        ids = torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist()
        runs = {}
        for p in policies:
            with resident_session(om, devices, p, seed) as s:
                s.generate(f"warm{r}", ids[::-1], 2)  # the policy's one-time setup
                runs[p] = s.generate(f"bench{r}", ids, new_tokens)
        with zero_experts(om):
            stub = greedy_generate(om.loaded.model, "stub", ids, new_tokens)
        one_token()
        expert_s = robust_time(one_token() for _ in range(8))
        tick(1)
        if r == 0:
            continue
        ref = runs[base]
        for step, dense_step in zip(ref.decode_s, stub.decode_s, strict=True):
            resid.append((step - dense_step - L * K * expert_s) / L)
        for p in policies[1:]:
            g = runs[p]
            dec[p] += [(a - b) / L for a, b in zip(g.decode_s, ref.decode_s, strict=True)]
            pre[p].append((g.ttft_s - ref.ttft_s) / L)
    return Overhead(
        base,
        float(statistics.median(resid)),
        {p: float(statistics.median(v)) for p, v in dec.items()},
        {p: [float(x) for x in v] for p, v in pre.items()},
        prompt_tokens,
    )


def estimate_memory_bandwidth(expert_bytes: int, expert_one_token_s: float) -> float:
    """Bytes/s the device streams weights at: one expert's bytes over its 1-token time."""
    return expert_bytes / max(expert_one_token_s, 1e-12)


def estimate_tflops(hidden: int, intermediate: int, per_token_s: float) -> float:
    """TFLOP/s of the expert FFN at large token counts (3 matmuls, 2 flops per MAC)."""
    if per_token_s <= 0:
        return 1.0
    return float(np.clip(6 * hidden * intermediate / per_token_s / 1e12, 1e-3, 1e4))
