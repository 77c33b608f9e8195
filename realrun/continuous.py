"""Continuous (iteration-level) batching of greedy generation: packed rows, no padding.

At every iteration boundary waiting prompts are admitted first come, first served until
``batch_size`` requests run (the simulator's ``ContinuousBatcher``); a joining request's
prompt tokens run in the same forward as the running requests' decode tokens.

Packing. The whole batch is ONE sequence row (batch dim 1): a forward's input is the
concatenation of every live request's new tokens (all prompt tokens of a joining
request, one token per decoding request, in admission order), with explicit
``position_ids`` (each token's index in its own request) and a custom 4D additive mask
[1, 1, q, kv] that lets a token attend only to its own request's earlier tokens and itself
(transformers' mask builders return a 4D mask as-is, ``masking_utils``). One
``DynamicCache`` without a config (plain full-length layers: a sliding-window layer would
drop other requests' columns) holds the KV of every token processed; a model's sliding
window, if it has one, is applied by the mask. When requests finish, each layer's keys and
values are cut to the live requests' columns. The logits taken are each request's last new
token's (``logits_to_keep`` as indices).

So the experts see real tokens only: policies, caches, the recorder and captured traces
get exactly the rows the simulator's iterations have (``IterationRows.real`` is None).
Against one-at-a-time generation the logits differ by float rounding only (matmul shapes
and the masked softmax's width differ); against the same function on another model
instance (an offloaded one with eager experts) they are equal bit for bit.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from realrun.generate import (
    Generation,
    IterationObserver,
    IterationRows,
    NewTokens,
    new_generations,
    run_iteration,
    token_limits,
)
from realrun.prompting import Prompt

Admit = Callable[[Sequence[Prompt]], None]
"""Told which prompts join, just before the iteration they join starts."""


@dataclass
class _Live:
    index: int  # the request's key (generate_continuous: its index in the prompts)
    seen: int  # tokens of this request already in the KV cache
    next_ids: list[int]  # this request's input tokens of the next forward


class PackedKV:
    """Which request and position each KV cache column holds, and the per-forward mask."""

    def __init__(self, config, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()  # no config: full-length layers (see the module docstring)
        self.req = torch.empty(0, dtype=torch.long, device=device)
        self.pos = torch.empty(0, dtype=torch.long, device=device)
        self.dtype = dtype
        self.windows = _windows(config)

    def mask(
        self, q_req: torch.Tensor, q_pos: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive masks [1, 1, q, kv] for new tokens (``q_req``, ``q_pos``): a token sees
        its own request's tokens at positions <= its own (within the window, if any)."""
        kv_req = torch.cat([self.req, q_req])
        kv_pos = torch.cat([self.pos, q_pos])
        same = (kv_req[None, :] == q_req[:, None]) & (kv_pos[None, :] <= q_pos[:, None])
        out: dict[str, torch.Tensor] = {}
        for kind, window in self.windows.items():
            ok = same if window is None else same & (q_pos[:, None] - kv_pos[None, :] < window)
            add = torch.zeros(ok.shape, dtype=self.dtype, device=ok.device)
            out[kind] = add.masked_fill(~ok, torch.finfo(self.dtype).min)[None, None]
        return out[next(iter(out))] if len(out) == 1 else out

    def append(self, q_req: torch.Tensor, q_pos: torch.Tensor) -> None:
        """The forward's tokens are now in the cache (after it ran)."""
        self.req = torch.cat([self.req, q_req])
        self.pos = torch.cat([self.pos, q_pos])

    def keep(self, requests: Sequence[int]) -> None:
        """Cut every layer's keys and values to the columns of ``requests``."""
        cols = torch.isin(self.req, torch.tensor(list(requests), device=self.req.device))
        idx = cols.nonzero().reshape(-1)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, idx.to(layer.keys.device))
                layer.values = layer.values.index_select(-2, idx.to(layer.values.device))
        self.req, self.pos = self.req[idx], self.pos[idx]

    def length(self) -> int:
        """Columns in the cache (every layer holds this many)."""
        return int(self.req.numel())


def _windows(config) -> dict[str, int | None]:
    """Attention kinds the model asks masks for, with their sliding windows (None: full).

    Models with ``layer_types`` mixing full and sliding layers take a dict of masks by
    kind; every other model takes one mask (windowed when ``sliding_window`` is set, as
    Mixtral and PhiMoE choose their mask builder)."""
    sw = getattr(config, "sliding_window", None)
    kinds = sorted(set(getattr(config, "layer_types", None) or []))
    if len(kinds) > 1:
        return {k: (sw if k == "sliding_attention" else None) for k in kinds}
    if kinds:
        return {kinds[0]: sw if kinds[0] == "sliding_attention" else None}
    return {"full_attention": sw}


class PackedBatch:
    """The running requests of one packed KV cache, stepped one forward at a time.

    :func:`generate_continuous` and the HTTP server's engine (realrun.serve) drive it the
    same way: :meth:`join` requests (their prompt runs in the next forward), :meth:`step`
    to get the forward's rows and the forward itself, run it, :meth:`advance` with each
    live request's next token, then :meth:`leave` with the finished ones. Requests are
    named by an int ``key`` chosen by the caller (unique among live ones)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.kv = PackedKV(model.config, next(model.parameters()).dtype, self.device)
        self.live: list[_Live] = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def join(self, key: int, ids: Sequence[int]) -> None:
        """Request ``key`` (prompt ``ids``, non-empty) runs its prompt in the next forward."""
        self.live.append(_Live(key, 0, list(ids)))

    def step(self, request_ids: Sequence[str]) -> tuple[IterationRows, Callable[[], torch.Tensor]]:
        """The next forward's rows (``request_ids[i]`` names live request i) and the forward:
        a call returning next-token logits [live requests, V], row i for live request i."""
        rows, q_req, q_pos, last = _packed_rows(request_ids, self.live, self.device)
        tokens = torch.tensor(
            [[t for lv in self.live for t in lv.next_ids]], dtype=torch.long, device=self.device
        )
        mask = self.kv.mask(q_req, q_pos)
        self._pending = (q_req, q_pos)
        forward = functools.partial(
            _packed_logits,
            self.model,
            input_ids=tokens,
            attention_mask=mask,
            position_ids=q_pos[None, :],
            cache=self.kv.cache,
            logits_to_keep=last,
        )
        return rows, forward

    def advance(self, next_tokens: Sequence[int]) -> None:
        """The forward of the last :meth:`step` ran; live request i's next input is
        ``next_tokens[i]``."""
        assert self._pending is not None, "advance() needs a step() whose forward ran"
        self.kv.append(*self._pending)
        self._pending = None
        for lv, t in zip(self.live, next_tokens, strict=True):
            lv.seen += len(lv.next_ids)
            lv.next_ids = [int(t)]

    def leave(self, keys: Collection[int]) -> None:
        """Requests ``keys`` leave the batch; the KV cache keeps only the others' columns."""
        if not keys:
            return
        self.live = [lv for lv in self.live if lv.index not in keys]
        self.kv.keep([lv.index for lv in self.live])


def generate_continuous(
    model: nn.Module,
    prompts: Sequence[Prompt],
    max_new_tokens: NewTokens,
    batch_size: int,
    *,
    observer: IterationObserver | None = None,
    on_admit: Admit | None = None,
    keep_logits: bool = False,
    eos_token_id: int | None = None,
    kv: list[PackedKV] | None = None,
) -> list[Generation]:
    """Generate greedily for every prompt with continuous batching up to ``batch_size``
    running requests; results in prompt order.

    ``max_new_tokens >= 1``, one for all or one per prompt (:func:`token_limits`);
    ``batch_size >= 1``; prompts non-empty. A request's
    ``ttft_s`` is its joining forward's time (measured from that iteration's start: a
    closed loop where every request waits from t = 0 and counts from its admission), its
    ``decode_s`` one entry per later forward it ran in; ``batch_size`` of a Generation is
    the number of requests in the forward it joined. ``on_admit`` hears each iteration's
    joining prompts before the iteration starts (outside its timing). ``kv``, when given a
    list, receives the run's :class:`PackedKV` (tests inspect the cache through it).
    """
    limits = token_limits(prompts, max_new_tokens)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    gens = new_generations(prompts, keep_logits)
    batch = PackedBatch(model)
    if kv is not None:
        kv.append(batch.kv)
    waiting = deque(range(len(prompts)))
    with torch.no_grad():
        while waiting or batch.live:
            joined = []
            while waiting and len(batch.live) < batch_size:
                j = waiting.popleft()
                batch.join(j, prompts[j].ids)
                joined.append(prompts[j])
            if joined and on_admit is not None:
                on_admit(joined)
            live = batch.live
            for lv in live:
                if lv.seen == 0:
                    gens[lv.index].batch_size = len(live)
            rows, forward = batch.step([prompts[lv.index].request_id for lv in live])
            done = run_iteration(
                observer,
                rows,
                forward,
                [gens[lv.index] for lv in live],
                [limits[lv.index] for lv in live],
                eos_token_id,
            )
            batch.advance([gens[lv.index].output_ids[-1] for lv in live])
            batch.leave({lv.index for lv, d in zip(live, done, strict=True) if d})
    return gens


def _packed_logits(model: nn.Module, **inputs: object) -> torch.Tensor:
    """Next-token logits [requests, V] of a packed forward (``logits_to_keep``: each
    request's last new token)."""
    return model(**inputs, use_cache=True).logits[0]


def _packed_rows(
    request_ids: Sequence[str], live: list[_Live], device: torch.device
) -> tuple[IterationRows, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward's rows (admission order, each request's new tokens), their request
    keys and positions as tensors, and the index of each request's last new token."""
    ids: list[str] = []
    pos, pre, req = [], [], []
    for rid, lv in zip(request_ids, live, strict=True):
        n = len(lv.next_ids)
        ids.extend([rid] * n)
        pos.append(np.arange(lv.seen, lv.seen + n))
        pre.append(np.full(n, lv.seen == 0))
        req.append(np.full(n, lv.index))
    positions = np.concatenate(pos)
    rows = IterationRows(
        tuple(ids),
        positions,
        np.concatenate(pre),
        None,
        tuple(request_ids),
    )
    ends = np.cumsum([len(lv.next_ids) for lv in live]) - 1

    def long(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return rows, long(np.concatenate(req)), long(positions), long(ends)
