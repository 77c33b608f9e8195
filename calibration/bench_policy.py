"""A policy's search time: how long an ``async_search`` policy takes to turn an event
into prefetch orders (the simulator delays such orders by it).

The policy is bound at the model's dimensions, its expert map store filled with
``store_rows`` synthetic iterations (softmax gate rows and embeddings), and then it sees
iterations whose rows resemble stored ones (the case the store is built for). Per
row count in :data:`SEARCH_ROWS`, two figures, each the
:func:`calibration.stopwatch.robust_time` of the hook + ``decide_prefetch``: a layer
step's gate search (``on_gate``) and an iteration start's search
(``on_iteration_start``: fMoE's semantic search for the first layers). Both grow with
the iteration's token rows (a prefill's prompt tokens, a decode step's batch), not in a
line (one row takes a faster path), so the profile keeps them piecewise linear over
these counts (``policy_gate_search``, ``policy_start_search``; ``policy_search_s`` is
the one-row gate search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from calibration.stopwatch import Tick, _no_tick, robust_time
from specs.model_spec import ModelSpec


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


SEARCH_ROWS = (1, 2, 4, 16, 64, 256)
"""Token row counts the searches are timed at (the knots of their piecewise costs)."""


@dataclass
class SearchTimes:
    """Seconds (lower quartiles) of a gate search and of an iteration start's search, per
    token row count."""

    gate_s: dict[int, float]
    start_s: dict[int, float]


def measure_search_s(
    spec: ModelSpec,
    policy: str = "fmoe",
    store_rows: int = 256,
    iterations: int = 20,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> SearchTimes:
    """The gate and iteration-start search times of ``policy`` (module docstring); ticks
    once per measured iteration."""
    out = SearchTimes({}, {})
    for rows in SEARCH_ROWS:
        gate, start = _search_samples(spec, policy, store_rows, iterations, rows, tick, seed)
        out.gate_s[rows] = robust_time(gate)
        out.start_s[rows] = robust_time(start)
    return out


def _search_samples(
    spec: ModelSpec,
    policy: str,
    store_rows: int,
    iterations: int,
    rows: int,
    tick: Tick,
    seed: int,
) -> tuple[list[float], list[float]]:
    """(gate, iteration start) search samples over ``iterations`` of ``rows`` token rows."""
    from policies.base import GateOutput, IterationEnd, IterationStart, PolicyContext
    from policies.cache import ExpertCache
    from policies.placement import Placement
    from policies.registry import make_policy

    L, J, K, H = spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size
    rng = np.random.default_rng(seed)
    pol = make_policy(policy)
    cache = ExpertCache(capacity=spec.total_experts, expert_bytes=spec.expert_bytes)
    pol.bind(PolicyContext(spec, Placement(L, J), [cache]))
    base_logits = rng.normal(size=(store_rows, L, J)).astype(np.float32) * 2
    base_emb = rng.standard_normal((store_rows, H), np.float32)
    rids = tuple(f"r{b}" for b in range(rows))
    gate_samples: list[float] = []
    start_samples: list[float] = []
    for it in range(store_rows + iterations):
        pick = np.arange(it, it + rows) % store_rows
        if it < store_rows:  # fill the store through the policy's own hooks
            logits, emb = base_logits[pick], base_emb[pick]
        else:
            logits = base_logits[pick] + rng.normal(size=(rows, L, J)).astype(np.float32)
            emb = base_emb[pick] + rng.standard_normal((rows, H), np.float32) * 0.5
        probs = _softmax(logits)
        ids = np.argsort(-probs, axis=-1)[..., :K]
        w = np.take_along_axis(probs, ids, -1)
        t0 = time.perf_counter()
        pol.on_iteration_start(
            IterationStart(it, rids, np.zeros(rows, int), np.zeros(rows, bool), emb, 0.0)
        )
        pol.decide_prefetch()
        if it >= store_rows:
            start_samples.append(time.perf_counter() - t0)
        for layer in range(L):
            t0 = time.perf_counter()
            pol.on_gate(GateOutput(it, layer, ids[:, layer], w[:, layer], probs[:, layer]))
            pol.decide_prefetch()
            if it >= store_rows:
                gate_samples.append(time.perf_counter() - t0)
        pol.on_iteration_end(IterationEnd(it, rids, rids))
        if it >= store_rows:
            tick(1)
    return gate_samples, start_samples
