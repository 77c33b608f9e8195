"""Trace load speed: a 1M-token x 32-layer x top-2 trace through `load_workload`.

Builds the trace (Mixtral-8x7B dimensions, about 6,000 requests of ~165 token rows),
saves it with `save_workload`, then times `load_workload` (which validates every row and
builds the Request objects) side by side with a plain `np.load` of the same two arrays
from an .npz file (no validation, no requests), and prints seconds and their ratio.
The issue's target: load under 2 s.

    python benchmarks/trace_load.py [--tokens 1000000] [--layers 32] [--with-probs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specs.presets import load_model  # noqa: E402
from traces.io import load_workload, save_workload  # noqa: E402
from traces.types import Request, Routing, Workload  # noqa: E402


def build(tokens: int, layers: int, with_probs: bool, seed: int = 0) -> Workload:
    """Random top-2 routing over 8 experts, split into requests of 37 + 127 tokens on average."""
    spec = load_model("mixtral-8x7b")
    spec = spec.model_copy(update={"num_layers": layers})
    J, K = spec.num_experts, spec.top_k
    rng = np.random.default_rng(seed)
    first = rng.integers(0, J, size=(tokens, layers), dtype=np.int16)
    second = (first + 1 + rng.integers(0, J - 1, size=(tokens, layers), dtype=np.int16)) % J
    ids = np.stack([first, second], axis=-1).astype(np.int16)
    w = rng.random((tokens, layers, K), dtype=np.float32)
    w /= w.sum(-1, keepdims=True)
    probs = None
    if with_probs:
        logits = rng.normal(size=(tokens, layers, J)).astype(np.float32)
        np.put_along_axis(logits, ids.astype(np.int64), 10.0, axis=-1)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    reqs, start, i = [], 0, 0
    while start < tokens:
        p, o = int(rng.integers(10, 65)), int(rng.integers(60, 195))
        n = min(p + o - 1, tokens - start)
        p = min(p, n)
        o = n - p + 1
        sl = slice(start, start + n)
        reqs.append(
            Request(
                request_id=f"r{i}",
                arrival_s=0.0,
                prompt_len=p,
                output_len=o,
                routing=Routing(ids[sl], w[sl], gate_probs=None if probs is None else probs[sl]),
            )
        )
        start += n
        i += 1
    return Workload(spec, reqs, {"source": "benchmarks/trace_load.py"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--with-probs", action="store_true", help="also store full gate rows (J=8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    w = build(args.tokens, args.layers, args.with_probs)
    print(
        f"built {len(w.requests)} requests, {w.num_tokens} token rows in {time.perf_counter() - t0:.2f} s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.trace.safetensors"
        t0 = time.perf_counter()
        save_workload(w, path)
        print(
            f"save_workload: {time.perf_counter() - t0:.2f} s, {path.stat().st_size / 1e6:.0f} MB"
        )
        npz = Path(tmp) / "plain.npz"
        ids = np.concatenate([r.routing.topk_ids for r in w.requests])
        wts = np.concatenate([r.routing.topk_weights for r in w.requests])
        np.savez(npz, topk_ids=ids, topk_weights=wts)
        del ids, wts

        best_load, best_np = float("inf"), float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loaded = load_workload(path)
            best_load = min(best_load, time.perf_counter() - t0)
            assert loaded.num_tokens == w.num_tokens
            del loaded
            t0 = time.perf_counter()
            with np.load(npz) as z:
                _ = (z["topk_ids"], z["topk_weights"])
            best_np = min(best_np, time.perf_counter() - t0)
    print(f"load_workload (validated, {len(w.requests)} Request objects): {best_load:.3f} s")
    print(f"np.load of the same two arrays (no checks, no requests):   {best_np:.3f} s")
    print(f"ratio load_workload / np.load: {best_load / best_np:.2f}")
    print(f"target < 2 s: {'met' if best_load < 2.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
