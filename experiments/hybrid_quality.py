"""Quality of the lossy miss actions on the real executor (tiny RANDOM-WEIGHT models, CPU).

    python -m experiments.hybrid_quality --out DIR [--models tiny-mixtral] [--new-tokens 8]

For each tiny architecture (random weights, seed 0: no trained model is run here, so no
claim about a real model's quality follows), the same prompts run (greedy, eager fp32)
under ``lru`` (exact) and under ``hobbit`` with its low-weight misses as low-bit copies
(int4 fake-quantized, ``action=lowbit``) or skipped (``action=skip``), at the same cache,
with hobbit's default threshold 1/(2K) and with threshold 1 (every miss lossy: the
bound on what the action can cost). Reported per lossy run: token agreement (share of
generated positions equal to the exact run's), the mean KL divergence of its next-token
distributions from the exact run's (over positions up to the first different token,
where both saw the same prefix), the share of demands served lossily, and the wall-time
speed-up against the exact run (CPU, tiny models, a shared machine: not a speed-up anyone
would see on a GPU; the simulator's study models that). Writes hybrid_quality.csv, whose
``weights`` column says "random".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import pandas as pd

ARCHS = ["tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"]
PROMPTS = ["Why is the sky blue?", "Write a haiku about rain.", "What is 12 times 7?"]


def _run(arch: str, policy: Any, cache: int, new: int, lossy: bool) -> tuple[list, dict, float]:
    from realrun.models import load
    from realrun.offload import offload_model
    from realrun.session import RunSession, SessionOptions

    loaded = load(arch, seed=0)
    prompts = [loaded.tokenizer.encode(p) for p in PROMPTS]
    om = offload_model(loaded)
    gens = []
    t0 = time.perf_counter()
    with RunSession(om, policy, SessionOptions(cache_experts=cache, allow_lossy=lossy)) as s:
        for i, ids in enumerate(prompts):
            gens.append(s.generate(f"r{i}", ids, new, keep_logits=True))
        m = s.metrics()
    wall = time.perf_counter() - t0
    om.close()
    return gens, m, wall


def _compare(ref: list, got: list) -> tuple[float, float]:
    import torch

    same = total = 0
    kls: list[float] = []
    for a, b in zip(ref, got, strict=True):
        diverged = False
        for ta, tb, la, lb in zip(a.output_ids, b.output_ids, a.logits, b.logits, strict=False):
            total += 1
            same += int(ta == tb)
            if not diverged:
                p = torch.log_softmax(la.double(), -1)
                q = torch.log_softmax(lb.double(), -1)
                kls.append(float((p.exp() * (p - q)).sum()))
            diverged = diverged or ta != tb
    return same / max(total, 1), sum(kls) / max(len(kls), 1)


def main(argv: list[str] | None = None) -> int:
    from policies.registry import make_policy
    from realrun.models import load
    from sim.sweep import save_results

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--models", help=f"comma-separated subset of {', '.join(ARCHS)}")
    a = p.parse_args(argv)
    archs = a.models.split(",") if a.models else ARCHS
    bad = [m for m in archs if m not in ARCHS]
    if bad:
        p.error(f"unknown model: {', '.join(bad)} (one of {', '.join(ARCHS)})")
    if a.new_tokens < 1:
        p.error("--new-tokens must be at least 1")
    print("tiny models with RANDOM weights (seed 0): no quality claim about trained models")
    rows = []
    for arch in archs:
        spec = load(arch, seed=0).spec
        cache = max(spec.top_k, spec.total_experts // 4)
        ref, _, ref_wall = _run(arch, make_policy("lru"), cache, a.new_tokens, False)
        for threshold in (None, 1.0):  # hobbit's default; every miss lossy
            for action in ("lowbit", "skip"):
                opts: dict[str, Any] = {"action": action}
                if threshold is not None:
                    opts["threshold"] = threshold
                got, m, wall = _run(arch, make_policy("hobbit", **opts), cache, a.new_tokens, True)
                agree, kl = _compare(ref, got)
                lossy = m["actions_lowbit"] + m["actions_skip"]
                rows.append(
                    {
                        "model": arch,
                        "weights": "random",
                        "action": action,
                        "threshold": "1/(2K)" if threshold is None else threshold,
                        "cache_experts": cache,
                        "lossy_share_of_demands": lossy / max(m["demands"], 1),
                        "token_agreement": agree,
                        "kl_mean": kl,
                        "exact": m["exact"],
                        "wall_speedup_vs_exact": ref_wall / wall,
                    }
                )
                print(rows[-1])
    df = pd.DataFrame(rows)
    save_results(df, Path(a.out) / "hybrid_quality.csv", "csv")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
