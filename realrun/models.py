"""Loading transformers MoE models and finding their MoE blocks.

A model reference is either a tiny preset with an ``hf_recipe`` (random weights from a
transformers config class, built under a fixed torch seed; no hub download) or a local
checkpoint directory (``config.json`` + weights). Everything that can be checked from
the config alone (unknown model, not an MoE model) is checked before any weight is
built or read.

Per-architecture knowledge is limited to :data:`ARCHS`: where the router sits and how
its logits become a probability row. The experts math itself is never rewritten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specs.errors import InputError
from specs.model_spec import ModelSpec
from specs.presets import load_model, model_preset_names


def softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Softmax routers (Mixtral, Qwen-MoE, OLMoE, PhiMoE): probabilities over experts."""
    return torch.softmax(logits.float(), dim=-1)


def sigmoid_rows(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid routers (DeepSeek-V3): per-expert sigmoid scores, normalised to sum to 1.

    The experts the model actually runs come from its group-limited selection (recorded
    separately); this row is the score distribution policies read.
    """
    s = torch.sigmoid(logits.float())
    return s / s.sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class ArchAdapter:
    """Where an architecture's router is and how its logits become a probability row."""

    router_attr: str = "gate"
    probs: Callable[[torch.Tensor], torch.Tensor] = softmax_rows


ARCHS: dict[str, ArchAdapter] = {
    "mixtral": ArchAdapter(),
    "qwen2_moe": ArchAdapter(),
    "qwen3_moe": ArchAdapter(),
    "olmoe": ArchAdapter(),
    "phimoe": ArchAdapter(router_attr="router"),
    "deepseek_v3": ArchAdapter(probs=sigmoid_rows),
    "glm4_moe": ArchAdapter(probs=sigmoid_rows),  # sigmoid scores, as DeepSeek-V3
    # gpt_oss: routing capture and the expert stores are tested; offloaded execution is
    # not yet exact-tested: GptOssExperts one-hots ids over num_experts classes, so the
    # "not on this device" slot index (num_slots) raises; it needs a spare slot
    "gpt_oss": ArchAdapter(router_attr="router"),
}
"""Architectures with tests. Others are tried with the defaults (router ``gate``, softmax)."""


def adapter_for(family: str) -> ArchAdapter:
    return ARCHS.get(family, ArchAdapter())


@dataclass
class MoEBlock:
    """One MoE layer of a loaded model: its decoder index and its router and experts modules."""

    moe_layer: int
    decoder_layer: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


@dataclass
class LoadedModel:
    """A model ready to run: the module (eval mode), its spec, blocks and tokenizer."""

    model: nn.Module
    spec: ModelSpec
    blocks: list[MoEBlock]
    tokenizer: Any  # None for a model passed in (from_module)
    source: str  # 'preset', 'checkpoint' or 'module' (built by the caller)
    adapter: ArchAdapter


def _config_for_preset(spec: ModelSpec) -> Any:
    import transformers

    recipe = spec.hf_recipe
    assert recipe is not None
    cls = getattr(transformers, recipe.config_class, None)
    if cls is None:
        raise InputError(
            f"model {spec.name}: transformers has no config class {recipe.config_class!r}"
        )
    return cls(**recipe.kwargs)


def resolve_model(ref: str) -> tuple[ModelSpec, Any, str]:
    """(spec, transformers config, source) for a preset name or a checkpoint directory.

    Only configs are read. Raises InputError for an unknown model, a preset without a
    runnable recipe, or a checkpoint that is not an MoE model.
    """
    path = Path(ref)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{ref}: a checkpoint directory needs a config.json")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"{ref}/config.json: cannot be read as a transformers config ({exc})"
            ) from None
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
            getattr(config, "dtype", None), "fp32"
        )
        try:
            spec = ModelSpec.from_transformers_config(config, name=path.name, dtype=dtype)
        except KeyError as exc:
            raise InputError(
                f"{ref}/config.json: missing field {exc} needed for an MoE model"
            ) from None
        return spec, config, "checkpoint"
    if ref in model_preset_names():
        spec = load_model(ref)
        if spec.hf_recipe is None:
            raise InputError(
                f"model preset {ref!r} has real dimensions but no local weights; "
                "pass a tiny preset or a local checkpoint directory"
            )
        return spec, _config_for_preset(spec), "preset"
    tiny = [n for n in model_preset_names() if load_model(n).hf_recipe is not None]
    raise InputError(
        f"unknown model {ref!r}: not a local checkpoint directory nor a preset (runnable: {', '.join(tiny)})"
    )


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(f"{type(model).__name__}: cannot find the decoder layers (model.layers)")
    return layers


def find_moe_blocks(model: nn.Module, spec: ModelSpec, adapter: ArchAdapter) -> list[MoEBlock]:
    """The MoE blocks in decoder order; InputError when they disagree with ``spec``."""
    blocks: list[MoEBlock] = []
    for i, layer in enumerate(_decoder_layers(model)):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts = getattr(mlp, "experts", None) if mlp is not None else None
        if experts is None or not hasattr(experts, "num_experts"):
            continue
        router = getattr(mlp, adapter.router_attr, None)
        if router is None:
            raise InputError(
                f"decoder layer {i}: MoE block {type(mlp).__name__} has no router {adapter.router_attr!r}"
            )
        blocks.append(MoEBlock(len(blocks), i, mlp, router, experts))
    if [b.decoder_layer for b in blocks] != spec.moe_layer_ids:
        raise InputError(
            f"model {spec.name}: MoE blocks at decoder layers {[b.decoder_layer for b in blocks]}, "
            f"spec expects {spec.moe_layer_ids}"
        )
    return blocks


def load(ref: str, seed: int = 0, experts_implementation: str = "eager") -> LoadedModel:
    """Build or load the model named by ``ref`` in eval mode (weights on the CPU).

    Tiny presets get random weights under ``torch.manual_seed(seed)``, so the same seed
    gives the same model. ``experts_implementation='eager'`` is what makes offloaded
    outputs bitwise identical to the unmodified model.
    """
    from transformers import AutoModelForCausalLM

    spec, config, source = resolve_model(ref)
    if source == "preset":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(ref, dtype="auto")
    model.eval()
    model.set_experts_implementation(experts_implementation)
    adapter = adapter_for(spec.family)
    blocks = find_moe_blocks(model, spec, adapter)
    from realrun.tokenizer import tokenizer_for

    return LoadedModel(model, spec, blocks, tokenizer_for(ref, spec, source), source, adapter)


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def spec_of_module(model: nn.Module, name: str | None = None) -> ModelSpec:
    """The spec of a transformers MoE model already built (from its config and dtype).

    Raises InputError when it is not a transformers model or not an MoE model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise InputError(f"{type(model).__name__}: not a transformers model (no config)")
    param = next(model.parameters(), None)
    dtype = _DTYPE_NAMES.get(param.dtype, "fp32") if param is not None else "fp32"
    try:
        return ModelSpec.from_transformers_config(config, name=name, dtype=dtype)
    except KeyError as exc:
        raise InputError(
            f"{type(model).__name__}: config misses field {exc} needed for an MoE model"
        ) from None


def from_module(model: nn.Module, name: str | None = None) -> LoadedModel:
    """A model already built, ready to offload: eval mode, eager experts (what makes
    offloaded outputs exact), its MoE blocks found; no tokenizer."""
    spec = spec_of_module(model, name)
    model.eval()
    model.set_experts_implementation("eager")
    adapter = adapter_for(spec.family)
    blocks = find_moe_blocks(model, spec, adapter)
    return LoadedModel(model, spec, blocks, None, "module", adapter)
