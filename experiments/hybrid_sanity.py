"""Sanity of the hybrid model against published hybrid setups nobody here measured.

    python -m experiments.hybrid_sanity --out DIR

For each published setup (HYBRID_FIGURES.md section 2, copied with sources into
docs/hybrid.md), the simulator runs the system's policy at batch 1 on a machine built
from the published bandwidths (host memory, link) and GPU figures, and its decode
tokens/s (1 / TPOT) is set beside the published figure. Nothing is fitted to those
tokens/s: every input is a published bandwidth or spec, or an assumption stated in the
row. Writes ``hybrid_sanity.csv`` and prints the table (error = simulated / published - 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

GiB = 2**30

# (name, system, model, weight format (and the published setup's, as written there),
#  machine (preset or overrides of one), policy, options, cache experts or None (policy
#  sizes it), published decode tok/s, source, notes)
FORMAT_OF = {"Q4_K_M": "q4_k_m", "BF16": "bf16", "fp16": "bf16"}  # fp16 and bf16: 2 bytes
SETUPS: list[dict[str, Any]] = [
    {
        "setup": "KTransformers V0.2, 1 socket Xeon Gold 6454S (8 x DDR5-4800) + RTX 4090D",
        "system": "ktransformers",
        "model": "deepseek-v3",
        "format": "q4_k_m",
        "published_format": "Q4_K_M",
        "hardware": "workstation-8ch-ddr5",
        "host": {},
        "policy": "ktransformers",
        "options": {},
        "published_tok_s": 8.73,
        "source": "kvcache-ai/ktransformers doc/en/DeepseekR1_V3_tutorial.md (V0.2, 1S)",
        "notes": "DS-V3 Q4_K_M; host 237.5 GB/s MLC-measured 8 x DDR5-4800 (ik_llama.cpp #370)",
    },
    {
        "setup": "KTransformers V0.2, 2 sockets (16 x DDR5-4800) + RTX 4090D",
        "system": "ktransformers",
        "model": "deepseek-v3",
        "format": "q4_k_m",
        "published_format": "Q4_K_M",
        "hardware": "workstation-8ch-ddr5",
        "host": {"memory_bandwidth_Bps": 2 * 237.5e9, "flops": 42e12, "cores": 64},
        "policy": "ktransformers",
        "options": {},
        "published_tok_s": 12.21,
        "source": "kvcache-ai/ktransformers doc/en/DeepseekR1_V3_tutorial.md (V0.2, 2S)",
        "notes": "two sockets' bandwidth added (NUMA not modelled)",
    },
    {
        "setup": "KTransformers V0.2.1, 2 sockets + RTX 4090, 1K context",
        "system": "ktransformers",
        "model": "deepseek-v3",
        "format": "q4_k_m",
        "published_format": "Q4_K_M",
        "hardware": "workstation-8ch-ddr5",
        "host": {"memory_bandwidth_Bps": 2 * 237.5e9, "flops": 42e12, "cores": 64},
        "policy": "ktransformers",
        "options": {},
        "published_tok_s": 13.5,
        "source": "kvcache-ai/ktransformers doc/en/DeepseekR1_V3_tutorial.md (V0.2.1)",
        "notes": "as the 2S row",
    },
    {
        "setup": "KTransformers 0.5.2, EPYC 9355 + RTX 5090, Qwen3-30B-A3B BF16 (AVX2)",
        "system": "ktransformers",
        "model": "qwen3-30b-a3b",
        "format": "bf16",
        "published_format": "BF16",
        "hardware": "rtx5090-ddr5",
        "host": {"memory_bandwidth_Bps": 614.4e9, "cores": 32, "flops": 2.0e12},
        "policy": "ktransformers",
        "options": {},
        "published_tok_s": 48.45,
        "source": "kvcache-ai/ktransformers issue #1914 (decode 44.4-52.5; midpoint)",
        "notes": "host 614.4 GB/s = 12 ch x DDR5-6400 x 8 B spec (no measured figure in the "
        "figures docs: an assumption); CPU FLOP/s an assumption",
    },
    {
        "setup": "llama.cpp --n-cpu-moe 36, RTX 2080 8 GB + 4-channel DDR4 (i9-10900X)",
        "system": "llama-cpp",
        "model": "qwen3-30b-a3b",
        "format": "q4_k_m",
        "published_format": "Q4_K_M",
        "hardware": "rtx3090-ddr4",
        "gpu": {"name": "RTX 2080", "memory_bytes": 8 * GiB, "memory_bandwidth_Bps": 448e9},
        "link": {"pinned_bandwidth_Bps": 12e9, "pageable_bandwidth_Bps": 6e9},
        "host": {"memory_bandwidth_Bps": 102e9, "cores": 10},
        "policy": "llama-cpp",
        "options": {"n_cpu_moe": 36, "uploads_per_step": 0},
        "cache_experts": 12 * 128,
        "published_tok_s": 36.7,
        "source": "AlexsJones/llmfit PR #755",
        "notes": "host 102 GB/s measured (llmfit #755); GPU 448 GB/s and PCIe 3 12 GB/s "
        "are spec/assumptions (HARDWARE_FIGURES.md 2080 Ti Gen3 7.1-13.1 GB/s)",
    },
    {
        "setup": "Fiddler v1, Mixtral-8x7B fp16, 24 GB GPU (Quadro RTX 6000)",
        "system": "fiddler",
        "model": "mixtral-8x7b",
        "format": "bf16",
        "published_format": "fp16",
        "hardware": "rtx3090-ddr4",
        "gpu": {"name": "Quadro RTX 6000", "memory_bandwidth_Bps": 672e9},
        "link": {"pinned_bandwidth_Bps": 12e9, "pageable_bandwidth_Bps": 6e9},
        "host": {},
        "policy": "fiddler",
        "options": {},
        "published_tok_s": 3.0,
        "source": "arXiv 2402.07033v1 abstract / efeslab/fiddler README ('>3 tok/s')",
        "notes": "published figure is a lower bound; host n/r there: the rtx3090-ddr4 "
        "preset's 2-channel DDR4 (50 GB/s) stands in; 672 GB/s GPU and PCIe 3 are spec",
    },
]


def _machine(row: dict[str, Any]) -> Any:
    from specs.presets import load_hardware

    hw = load_hardware(row["hardware"])
    upd: dict[str, Any] = {"name": f"sanity:{row['system']}"}
    if row.get("gpu"):
        upd["gpu"] = hw.gpu.model_copy(update=row["gpu"])
    if row.get("link"):
        upd["link"] = hw.link.model_copy(update=row["link"])
    assert hw.host is not None
    upd["host"] = hw.host.model_copy(update=row.get("host", {}))
    return hw.model_copy(update=upd)


def run_row(row: dict[str, Any], requests: int, output_len: float, seed: int) -> dict[str, Any]:
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_model
    from traces.synth import SynthConfig, generate

    spec = load_model(row["model"]).with_weight_format(row["format"])
    hw = _machine(row)
    common = {"world_seed": seed, "output_len_mean": output_len}
    train = generate(spec, SynthConfig(num_requests=requests, seed=seed + 1, **common))
    test = generate(spec, SynthConfig(num_requests=requests, seed=seed + 2, **common))
    cache: dict[str, Any] = {}
    if row.get("cache_experts"):
        cache["cache_experts"] = row["cache_experts"]
    else:  # what the GPU holds after the dense weights (the policy uses what it needs)
        free = hw.gpu.memory_bytes - spec.non_expert_bytes
        cache["cache_experts"] = max(spec.top_k, int(0.9 * free) // spec.expert_bytes)
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        policy=row["policy"],
        policy_options=row["options"],
        batch_size=1,
        arrivals="closed",
        seed=seed,
        **cache,
    )
    m = simulate(test, cfg, training=train).metrics
    sim_tok_s = 1.0 / m["tpot_mean_s"]
    err = sim_tok_s / row["published_tok_s"] - 1.0
    return {
        "setup": row["setup"],
        "system": row["system"],
        "model": f"{row['model']} ({row['format']})",
        "published_tok_s": row["published_tok_s"],
        "simulated_tok_s": sim_tok_s,
        "error": err,
        "within_30pct": abs(err) <= 0.30,
        "hit_rate": m["hit_rate"],
        "action_share_cpu": m["action_share_cpu"],
        "source": row["source"],
        "notes": row["notes"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--output-len", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = []
    for row in SETUPS:
        r = run_row(row, a.requests, a.output_len, a.seed)
        sys.stderr.write(f"{r['setup']}: {r['simulated_tok_s']:.3g} vs {r['published_tok_s']}\n")
        rows.append(r)
    df = pd.DataFrame(rows)
    from sim.sweep import save_results

    out = Path(a.out)
    save_results(df, out / "hybrid_sanity.csv", "csv")
    cols = ["setup", "published_tok_s", "simulated_tok_s", "error", "within_30pct"]
    with pd.option_context("display.width", 220, "display.max_colwidth", 80):
        print(df[cols].to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
