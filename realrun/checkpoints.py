"""Random-weight checkpoints with a real model's expert shapes and only a few layers.

A real MoE checkpoint is tens of GB and needs a download; the GPU check (scripts/
gpu_check.sh) needs a model whose *experts* have real sizes (so copies, expert FFNs and
the cache behave as on the real model) but that builds in seconds without a network. This
module writes a local checkpoint directory (``config.json`` + safetensors) from a model
preset's real dimensions: the family's transformers config class, the preset's hidden
size, expert intermediate size, experts, top-K and attention shape, with ``layers``
decoder layers (all MoE) and a ``vocab`` that may be smaller than the real one (the
embedding and head are not what an offloading study measures; the report says so).
Weights are random (the library's own initialisation under a fixed seed), built on
``device`` (a GPU builds them in milliseconds) in ``dtype``.

The directory loads like any checkpoint (``fmoe run --model DIR``, ``fmoe calibrate
bench --model DIR``); no tokenizer is written, so prompts use the byte tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from specs.errors import InputError
from specs.model_spec import ModelSpec

DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Family:
    """How a preset's dimensions become a transformers config of its family."""

    config_class: str
    kwargs: Callable[[ModelSpec], dict[str, Any]]


def _attention(s: ModelSpec) -> dict[str, Any]:
    return {
        "hidden_size": s.hidden_size,
        "num_attention_heads": s.num_attention_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
    }


FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "MixtralConfig",
        lambda s: {
            **_attention(s),
            "intermediate_size": s.expert_intermediate_size,
            "num_local_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
        },
    ),
    "qwen3_moe": Family(
        "Qwen3MoeConfig",
        lambda s: {
            **_attention(s),
            "moe_intermediate_size": s.expert_intermediate_size,
            "intermediate_size": s.expert_intermediate_size * s.top_k,  # unused: no dense MLP
            "num_experts": s.num_experts,
            "num_experts_per_tok": s.top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
}
"""Families with a builder (their presets: mixtral-8x7b, qwen3-30b-a3b)."""


def config_like(spec: ModelSpec, layers: int, vocab: int | None = None, **overrides: Any) -> Any:
    """The transformers config of ``spec``'s family with its dimensions, ``layers`` MoE
    decoder layers and ``vocab`` tokens (default the spec's); ``overrides`` replace any
    config field (a tiny stand-in for a dry run). InputError for a family without a
    builder or fewer than one layer."""
    import transformers

    fam = FAMILIES.get(spec.family)
    if fam is None:
        raise InputError(
            f"model {spec.name}: no random-checkpoint builder for family {spec.family!r} "
            f"(known: {', '.join(sorted(FAMILIES))})"
        )
    if layers < 1:
        raise InputError(f"--layers must be >= 1, got {layers}")
    kwargs = {
        **fam.kwargs(spec),
        "num_hidden_layers": layers,
        "vocab_size": vocab or spec.vocab_size,
        "max_position_embeddings": 4096,
        **overrides,
    }
    return getattr(transformers, fam.config_class)(**kwargs)


def write_random_checkpoint(
    like: str,
    out: str | Path,
    layers: int = 2,
    vocab: int | None = None,
    dtype: str = "bf16",
    device: str = "cpu",
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint shaped like preset ``like`` into ``out`` (created;
    must not hold a checkpoint already) and return its path. See the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM

    from specs.presets import load_model

    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: known {', '.join(DTYPES)}")
    spec = load_model(like)
    config = config_like(spec, layers, vocab, **overrides)
    path = Path(out)
    if (path / "config.json").exists():
        raise InputError(f"{path}: holds a checkpoint already")
    path.mkdir(parents=True, exist_ok=True)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.manual_seed_all(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dt)
    model.save_pretrained(path)
    del model
    return path
