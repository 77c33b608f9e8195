"""fMoE search cost and store memory at the paper's model dimensions, on this CPU.

For Mixtral-8x7B (L=32, J=8, h=4096) and Qwen1.5-MoE-A2.7B (L=24, J=60, h=2048) and
store capacities C = 1K and 32K, fills a full store with random softmax maps and
embeddings, then plays iterations of B token rows through the ``fmoe`` policy's hooks
(the same calls an executor makes, each followed by decide_prefetch) and reports medians:

- ``semantic_ms``: on_iteration_start (step 1, once per iteration);
- ``trajectory_ms``: on_gate (step 2 + selection and orders, once per layer step);
- ``per_layer_step_ms``: (semantic + L x trajectory) / L, the search cost per layer step;
- ``insert_ms``: on_iteration_end (step 6, RDY replacement into the full store);
- ``store_MB``: bytes of the preallocated store arrays / 1e6 (maps and embeddings apart).

Goals of the issue: per layer step under 0.2 ms at C=1K and under 5 ms at C=32K; store
memory at 32K: the paper reports under 200 MB.

BLAS runs single-threaded (OPENBLAS_NUM_THREADS=1 unless set): the search is one searcher
thread beside inference, and on a busy 2-core machine a multi-threaded matvec of a 1K
store was measured 20x slower than a single-threaded one.

    python benchmarks/fmoe_search.py [--capacities 1000 32000] [--rows 1] [--embed-dim 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads BLAS

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policies.base import GateOutput, IterationEnd, IterationStart, PolicyContext  # noqa: E402
from policies.cache import ExpertCache  # noqa: E402
from policies.fmoe import FmoePolicy  # noqa: E402
from policies.placement import Placement  # noqa: E402
from specs.presets import load_model  # noqa: E402

MODELS = ["mixtral-8x7b", "qwen1.5-moe-a2.7b"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def measure(
    model: str,
    capacity: int,
    rows: int,
    iterations: int,
    embed_dim: int | None,
    match: str = "near",
    seed: int = 0,
) -> dict:
    """Fill a store of ``capacity`` rows and time the policy hooks over ``iterations`` iterations.

    ``match="near"``: each iteration's rows are noisy copies of stored rows (a similar
    past iteration exists, as the store is meant for); ``"random"``: unrelated rows (weak
    matches, so the delta threshold fetches many experts: the order-heavy worst case).
    """
    spec = load_model(model)
    L, J, K, H = spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size
    rng = np.random.default_rng(seed)
    pol = FmoePolicy(store_capacity=capacity, embed_dim=embed_dim)
    cache = ExpertCache(capacity=spec.total_experts, expert_bytes=spec.expert_bytes)
    pol.bind(PolicyContext(spec, Placement(L, J), [cache]))
    store = pol.store
    chunk = 4096
    keep = (iterations + 1) * rows  # stored rows the "near" queries copy
    base_logits, base_emb = None, None
    for start in range(0, capacity, chunk):
        n = min(chunk, capacity - start)
        logits = rng.normal(size=(n, L, J)).astype(np.float32) * 2
        emb = rng.standard_normal((n, H), np.float32)
        if base_logits is None:
            base_logits, base_emb = logits[:keep].copy(), emb[:keep].copy()
        store.add_batch(_softmax(logits), emb)
    sem, traj, ins, orders = [], [], [], []
    for it in range(iterations + 1):  # iteration 0 warms up
        if match == "near":
            pick = (np.arange(rows) + it * rows) % len(base_logits)
            logits = base_logits[pick] + rng.normal(size=(rows, L, J)).astype(np.float32) * 0.3
            emb = base_emb[pick] + rng.standard_normal((rows, H), np.float32) * 0.5
        else:
            logits = rng.normal(size=(rows, L, J)).astype(np.float32) * 2
            emb = rng.standard_normal((rows, H), np.float32)
        probs = _softmax(logits)
        ids = np.argsort(-probs, axis=-1)[..., :K]
        w = np.take_along_axis(probs, ids, -1)
        rids = tuple(f"r{b}" for b in range(rows))
        n_orders = 0
        t0 = time.perf_counter()
        pol.on_iteration_start(
            IterationStart(it, rids, np.zeros(rows, int), np.zeros(rows, bool), emb)
        )
        n_orders += len(pol.decide_prefetch().enqueue)
        t1 = time.perf_counter()
        gates = []
        for layer in range(L):
            g0 = time.perf_counter()
            pol.on_gate(GateOutput(it, layer, ids[:, layer], w[:, layer], probs[:, layer]))
            n_orders += len(pol.decide_prefetch().enqueue)
            gates.append(time.perf_counter() - g0)
        t2 = time.perf_counter()
        pol.on_iteration_end(IterationEnd(it, rids))
        t3 = time.perf_counter()
        if it:
            sem.append(t1 - t0)
            traj.extend(gates)
            ins.append(t3 - t2)
            orders.append(n_orders)
    sem_ms, traj_ms, ins_ms = (1e3 * float(np.median(x)) for x in (sem, traj, ins))
    maps_bytes = store.maps.nbytes + store.cumsq.nbytes
    return {
        "model": model,
        "layers": L,
        "experts": J,
        "hidden": H,
        "capacity": capacity,
        "rows": rows,
        "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "match": match,
        "embed_width": store.embed_width,
        "orders_per_iteration": float(np.mean(orders)),
        "semantic_ms": round(sem_ms, 4),
        "trajectory_ms": round(traj_ms, 4),
        "per_layer_step_ms": round((sem_ms + L * traj_ms) / L, 4),
        "insert_ms": round(ins_ms, 4),
        "store_MB": round(store.nbytes / 1e6, 1),
        "maps_MB": round(maps_bytes / 1e6, 1),
        "embeddings_MB": round((store.nbytes - maps_bytes) / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--capacities", nargs="+", type=int, default=[1000, 32000])
    ap.add_argument("--rows", nargs="+", type=int, default=[1], help="token rows per iteration (B)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument(
        "--embed-dim",
        type=int,
        default=None,
        help="also measure with embeddings projected to this width",
    )
    ap.add_argument(
        "--match",
        nargs="+",
        choices=["near", "random"],
        default=["near"],
        help="near: queries resemble stored rows; random: unrelated (worst case for orders)",
    )
    ap.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = ap.parse_args()
    results = []
    for model in args.models:
        for cap in args.capacities:
            for rows in args.rows:
                for edim in [None] + ([args.embed_dim] if args.embed_dim else []):
                    for match in args.match:
                        iters = args.iterations if cap <= 4096 else max(5, args.iterations // 4)
                        r = measure(model, cap, rows, iters, edim, match)
                        results.append(r)
                        print(
                            f"done {model} C={cap} B={rows} E={r['embed_width']} {match}",
                            file=sys.stderr,
                        )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    cols = ["model", "capacity", "rows", "match", "embed_width", "orders_per_iteration", "semantic_ms", "trajectory_ms", "per_layer_step_ms",
            "insert_ms", "store_MB", "maps_MB", "embeddings_MB"]  # fmt: skip
    print("  ".join(cols))
    for r in results:
        print("  ".join(str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
