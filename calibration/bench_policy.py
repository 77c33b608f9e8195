"""A policy's search time: how long an ``async_search`` policy takes to turn a gate event
into prefetch orders (the simulator delays such orders by ``policy_search_s``).

The policy is bound at the model's dimensions, its expert map store filled with
``store_rows`` synthetic iterations (softmax gate rows and embeddings), and then it sees
iterations whose rows resemble stored ones (the case the store is built for); the figure
is the :func:`calibration.stopwatch.robust_time` of ``on_gate`` + ``decide_prefetch``
over those layer steps.
"""

from __future__ import annotations

import time

import numpy as np

from calibration.model_spec import ModelSpec
from calibration.stopwatch import Tick, _no_tick, robust_time


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def measure_search_s(
    spec: ModelSpec,
    policy: str = "fmoe",
    store_rows: int = 256,
    iterations: int = 20,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> float:
    """Seconds (lower quartile) of one layer step's ``on_gate`` + ``decide_prefetch`` of ``policy``."""
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
    samples: list[float] = []
    for it in range(store_rows + iterations):
        pick = it % store_rows
        if it < store_rows:  # fill the store through the policy's own hooks
            logits, emb = base_logits[pick : pick + 1], base_emb[pick : pick + 1]
        else:
            logits = base_logits[pick : pick + 1] + rng.normal(size=(1, L, J)).astype(np.float32)
            emb = base_emb[pick : pick + 1] + rng.standard_normal((1, H), np.float32) * 0.5
        probs = _softmax(logits)
        ids = np.argsort(-probs, axis=-1)[..., :K]
        w = np.take_along_axis(probs, ids, -1)
        pol.on_iteration_start(
            IterationStart(it, ("r",), np.zeros(1, int), np.zeros(1, bool), emb, 0.0)
        )
        pol.decide_prefetch()
        for layer in range(L):
            t0 = time.perf_counter()
            pol.on_gate(GateOutput(it, layer, ids[:, layer], w[:, layer], probs[:, layer]))
            pol.decide_prefetch()
            if it >= store_rows:
                samples.append(time.perf_counter() - t0)
        pol.on_iteration_end(IterationEnd(it, ("r",), ("r",)))
        if it >= store_rows:
            tick(1)
    return robust_time(samples)
