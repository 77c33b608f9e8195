"""The synthetic sampler and the sparse row encoder as they were before the numba kernels
(main at 2f92c5b, traces/synth_sampling.py and traces/v2_format.py), frozen here so the
tests can show the fast versions draw and store exactly the same arrays.
"""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((z - z.max(axis=-1, keepdims=True)) / np.float32(temperature))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def sample_routing(
    sk, spec, rng, base_logits, reuse, noise, temperature, normalize_topk,
    lookahead_noise, with_probs, with_lookahead,
):  # fmt: skip
    N, L, J, K = sk.num_tokens, spec.num_moe_layers, spec.num_experts, spec.top_k
    ids = np.empty((N, L, K), dtype=np.int16)
    weights = np.empty((N, L, K), dtype=np.float32)
    probs_all = np.empty((N, L, J), dtype=np.float32) if with_probs else None
    logits_all = np.empty((N, L, J), dtype=np.float32) if with_lookahead else None
    arange = np.arange(N)
    copy_draw = rng.random(N)
    prev = None
    for layer in range(L):
        z = np.asarray(base_logits(layer, prev), dtype=np.float32)
        if noise > 0:
            u = np.maximum(rng.random((N, J), dtype=np.float32), np.float32(1e-12))
            z = z - np.float32(noise) * np.log(-np.log(u))
        copy = (copy_draw < reuse[layer]) & ~sk.first
        src = np.maximum.accumulate(np.where(copy, 0, arange))
        z = z[src].astype(np.float32)
        p = softmax(z, temperature).astype(np.float32)
        top = np.argpartition(-p, K - 1, axis=-1)[:, :K] if K < J else np.tile(np.arange(J), (N, 1))
        order = np.argsort(-np.take_along_axis(p, top, -1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, -1)
        w = np.take_along_axis(p, top, axis=-1)
        if normalize_topk:
            w = w / w.sum(axis=-1, keepdims=True)
        ids[:, layer], weights[:, layer] = top, w
        if probs_all is not None:
            probs_all[:, layer] = p
        if logits_all is not None:
            logits_all[:, layer] = z
        prev = top
    look = None
    if logits_all is not None:
        look = np.zeros((N, L, J), dtype=np.float32)
        if L > 1:
            noise_rows = rng.standard_normal((N, L - 1, J), dtype=np.float32)
            nxt = logits_all[:, 1:] + np.float32(lookahead_noise) * noise_rows
            look[:, :-1] = softmax(nxt, temperature)
    return ids, weights, probs_all, look


def base_logits(pop, topic_logits, kind_logits, trans, topic, kind):
    """The knob-driven generator's base logits (traces.synth._token_range's ``base``)."""

    def base(layer, prev):
        z = pop[layer] + topic_logits[topic, layer] + kind_logits[kind, layer]
        if prev is not None:
            z = z + trans[layer][prev.astype(np.int64)].mean(axis=1)
        return z

    return base


def encode_probs(rows: np.ndarray, top_n: int, ids_dt: np.dtype) -> dict[str, np.ndarray]:
    f16 = np.dtype("<f2")
    if top_n == 0:
        return {"": np.ascontiguousarray(rows, dtype=f16)}
    p = np.asarray(rows, dtype=np.float32)
    top = np.argpartition(-p, top_n - 1, axis=-1)[..., :top_n]
    vals = np.take_along_axis(p, top, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    top = np.take_along_axis(top, order, -1)
    vals = np.take_along_axis(vals, order, -1)
    rest = np.maximum(p.sum(axis=-1) - vals.sum(axis=-1), 0.0)
    return {
        ".ids": np.ascontiguousarray(top, dtype=ids_dt),
        ".probs": np.ascontiguousarray(vals, dtype=f16),
        ".rest": np.ascontiguousarray(rest, dtype=f16),
    }
