"""Fixed simulated scenarios whose JSON must not change across refactors.

Every registered simulator policy x (1 GPU, 6 GPUs) x (Mixtral-8x7B, Qwen1.5-MoE) on a
small synthetic offline workload, printed as one JSON object keyed by scenario with the
wall-clock fields removed. Compare two runs with `diff` (byte-identical is the goal).

    python scripts/scenarios.py > before.json   # ... change ... then again > after.json
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

from fmoe_cli.main import main as fmoe_main

POLICIES = [
    "lru",
    "lfu",
    "deepspeed",
    "mixtral-offloading",
    "moe-infinity",
    "promoe",
    "fmoe",
    "oracle",
]
SETUPS = [("a100-80gb-pcie4", "24"), ("paper-6x3090", "24")]
MODELS = ["mixtral-8x7b", "qwen1.5-moe-a2.7b"]
WALL_KEYS = {"wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s"}


def run_one(model: str, hardware: str, cache_gb: str, policy: str) -> dict:
    """One `fmoe sim --json` run in this process, wall-clock fields dropped."""
    argv = ["sim", "--model", model, "--hardware", hardware, "--synth", "--synth-requests", "6"]
    argv += ["--policy", policy, "--cache-gb", cache_gb, "--offline", "--seed", "3", "--json"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fmoe_main(argv)
    if code not in (0, None):
        return {"exit": code}
    data = json.loads(out.getvalue())
    return {k: v for k, v in data.items() if k not in WALL_KEYS}


def main() -> None:
    results = {}
    for model in MODELS:
        for hardware, cache_gb in SETUPS:
            for policy in POLICIES:
                key = f"{model}/{hardware}/{cache_gb}/{policy}"
                print(key, file=sys.stderr)
                results[key] = run_one(model, hardware, cache_gb, policy)
    json.dump(results, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
