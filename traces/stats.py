"""Statistics of a workload's routing: popularity, reuse distance, cross-layer affinity.

All functions are vectorized over token rows. Definitions:

- popularity [L, J]: share of a layer's expert selections that go to each expert (rows
  sum to 1); ``top_expert_share`` [L] is each row's maximum.
- reuse distance: for every use of (layer, expert) by a token of a request, the number
  of token rows since that request last used the same (layer, expert); first uses have
  none. ``reuse_rate`` [L]: share of non-first tokens sharing at least one expert with
  the previous token at that layer.
- cross-layer affinity [L-1, J, J]: P(expert j chosen at layer l+1 | expert i chosen at
  layer l), over the K x K (i, j) pairs of each token. ``affinity_top1`` [L-1]: the
  chance that the most likely successor of a chosen expert is chosen at the next layer
  (how predictable the next layer is from this one); ``affinity_mi`` [L-1]: mutual
  information in bits between the experts of consecutive layers (0 = independent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from specs.jsonio import save_png
from traces.types import Workload


def _flat_ids(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, L, K] int64, request index of each row [N])."""
    if not w.requests:
        L, K = w.spec.num_moe_layers, w.spec.top_k
        return np.zeros((0, L, K), dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids = np.concatenate([r.routing.topk_ids for r in w.requests]).astype(np.int64)
    counts = [r.routing.num_tokens for r in w.requests]
    return ids, np.repeat(np.arange(len(counts)), counts)


def popularity(w: Workload) -> np.ndarray:
    """[L, J] share of each layer's selections per expert (zeros for an empty workload)."""
    ids, _ = _flat_ids(w)
    L, J = w.spec.num_moe_layers, w.spec.num_experts
    out = np.zeros((L, J))
    for layer in range(L):
        out[layer] = np.bincount(ids[:, layer].ravel(), minlength=J)
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def top_expert_share(w: Workload) -> np.ndarray:
    """[L] share of selections taken by each layer's most popular expert."""
    return popularity(w).max(axis=1)


def reuse_distances(w: Workload) -> np.ndarray:
    """Reuse distance (in token rows, >= 1) of every repeated (request, layer, expert) use."""
    ids, req = _flat_ids(w)
    N, L, K = ids.shape
    if N == 0:
        return np.zeros(0, dtype=np.int64)
    t = np.broadcast_to(np.arange(N)[:, None, None], ids.shape).ravel()
    layer = np.broadcast_to(np.arange(L)[None, :, None], ids.shape).ravel()
    r = np.broadcast_to(req[:, None, None], ids.shape).ravel()
    e = ids.ravel()
    order = np.lexsort((t, e, layer, r))
    t, layer, r, e = t[order], layer[order], r[order], e[order]
    same = (r[1:] == r[:-1]) & (layer[1:] == layer[:-1]) & (e[1:] == e[:-1])
    return (t[1:] - t[:-1])[same]


def reuse_rate(w: Workload) -> np.ndarray:
    """[L] share of non-first tokens sharing an expert with the previous token, per layer."""
    ids, req = _flat_ids(w)
    L = w.spec.num_moe_layers
    if len(ids) < 2:
        return np.zeros(L)
    shared = (ids[1:, :, :, None] == ids[:-1, :, None, :]).any(axis=(2, 3))  # [N-1, L]
    keep = req[1:] == req[:-1]
    return shared[keep].mean(axis=0) if keep.any() else np.zeros(L)


def first_choice_repeat_rate(w: Workload) -> np.ndarray:
    """[L] share of non-first tokens whose first-choice expert (the largest top-K weight)
    is the previous token's first choice, per layer: the Mixtral paper's Table 5 "First
    choice" figure (chance 1/J), as :func:`reuse_rate` is its "First or second choice"."""
    L = w.spec.num_moe_layers
    rows = [r.routing for r in w.requests if r.routing.num_tokens > 1]
    if not rows:
        return np.zeros(L)
    same = []
    for r in rows:
        ids = r.topk_ids.astype(np.int64)
        top = np.take_along_axis(ids, r.topk_weights.argmax(axis=2)[..., None], axis=2)[..., 0]
        same.append(top[1:] == top[:-1])  # [T-1, L]
    return np.concatenate(same).mean(axis=0)


def cross_layer_affinity(w: Workload) -> np.ndarray:
    """[L-1, J, J] P(j at l+1 | i at l); rows of experts never chosen are zero."""
    ids, _ = _flat_ids(w)
    L, J, K = w.spec.num_moe_layers, w.spec.num_experts, w.spec.top_k
    out = np.zeros((max(L - 1, 0), J, J))
    for layer in range(L - 1):
        a = np.repeat(ids[:, layer], K, axis=1).ravel()
        b = np.tile(ids[:, layer + 1], (1, K)).ravel()
        out[layer] = np.bincount(a * J + b, minlength=J * J).reshape(J, J)
    total = out.sum(axis=2, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def affinity_top1(w: Workload) -> np.ndarray:
    """[L-1] P(the most likely successor of a chosen expert is chosen at the next layer)."""
    aff = cross_layer_affinity(w)
    pop = popularity(w)
    if len(aff) == 0:
        return np.zeros(0)
    # weight each source expert by how often it is chosen
    return np.einsum("lj,lj->l", pop[:-1], aff.max(axis=2))


def affinity_mi(w: Workload) -> np.ndarray:
    """[L-1] mutual information (bits) between an expert chosen at l and one chosen at l+1.

    Over the K x K pairs of each token; 0 when the next layer's choice is independent of
    this layer's.
    """
    aff, pop = cross_layer_affinity(w), popularity(w)
    out = np.zeros(len(aff))
    for layer in range(len(aff)):
        joint = pop[layer][:, None] * aff[layer]
        indep = pop[layer][:, None] * joint.sum(axis=0)[None, :]
        nz = joint > 0
        out[layer] = float((joint[nz] * np.log2(joint[nz] / indep[nz])).sum())
    return out


def summary(w: Workload) -> dict[str, Any]:
    """Figures for `fmoe trace stats --json`."""
    pop = popularity(w)
    dist = reuse_distances(w)
    aff_top1 = affinity_top1(w)
    return {
        "model": w.spec.name,
        "requests": len(w.requests),
        "tokens": w.num_tokens,
        "popularity": pop.round(6).tolist(),
        "top_expert_share": top_expert_share(w).round(6).tolist(),
        "top_expert_share_mean": float(pop.max(axis=1).mean()) if len(pop) else 0.0,
        "reuse_rate": reuse_rate(w).round(6).tolist(),
        "reuse_distance_mean": float(dist.mean()) if len(dist) else None,
        "reuse_distance_median": float(np.median(dist)) if len(dist) else None,
        "reuse_distance_p90": float(np.percentile(dist, 90)) if len(dist) else None,
        "affinity_top1": aff_top1.round(6).tolist(),
        "affinity_top1_mean": float(aff_top1.mean()) if len(aff_top1) else None,
        "affinity_mi_bits": affinity_mi(w).round(6).tolist(),
    }


def plot_heatmaps(w: Workload, path: str | Path) -> None:
    """Write a PNG: expert popularity per layer, and layer-averaged cross-layer affinity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pop = popularity(w)
    aff = cross_layer_affinity(w)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.22 * len(pop) + 1.5)))
    im = axes[0].imshow(pop, aspect="auto", cmap="viridis")
    axes[0].set(
        title="expert popularity (share of selections)", xlabel="expert", ylabel="MoE layer"
    )
    fig.colorbar(im, ax=axes[0])
    if len(aff):
        im = axes[1].imshow(aff[0], aspect="auto", cmap="magma", vmin=0)
        axes[1].set(
            title="cross-layer affinity P(j at layer 1 | i at layer 0)",
            xlabel="expert j at layer 1",
            ylabel="expert i at layer 0",
        )
        fig.colorbar(im, ax=axes[1])
    else:
        axes[1].set_axis_off()
    fig.suptitle(f"{w.spec.name}: {len(w.requests)} requests, {w.num_tokens} tokens")
    fig.tight_layout()
    save_png(fig, path, tight=False)  # a unique temp name: runs never collide
