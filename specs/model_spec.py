"""ModelSpec: what an MoE model is, as far as offloading cares.

Layers in traces, policies and the simulator are indexed over *MoE layers only*
(0 .. num_moe_layers - 1); ``dense_layers`` names the decoder layers that have a dense
FFN instead (e.g. DeepSeek-V3's first three) so costs can still account for them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from specs.errors import InputError

DType = Literal["fp32", "bf16", "fp16", "fp8"]
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
WeightFormat = Literal["fp32", "bf16", "fp16", "fp8", "int8", "int4", "q4_k_m"]
# bits per weight, block scales included: int8 as GGUF Q8_0 (34 bytes per 32 weights),
# int4 as Q4_K (144 bytes per 256 weights, llama.cpp's k-quants), fp8 as DeepSeek-V3's
# e4m3 with one fp32 scale per 128x128 block; q4_k_m as llama.cpp's Q4_K_M mix for an
# expert: gate and up Q4_K, down Q6_K (210 bytes per 256 weights) in the half of the
# layers llama.cpp's use_more_bits() picks (first and last eighth, every third between)
# and Q4_K in the others, averaged over the layers
FORMAT_BITS: dict[str, float] = {
    "fp32": 32.0,
    "bf16": 16.0,
    "fp16": 16.0,
    "fp8": 8.0 + 32.0 / (128 * 128),
    "int8": 34 * 8 / 32,
    "int4": 144 * 8 / 256,
    "q4_k_m": (2 * 144 + (144 + 210) / 2) * 8 / 256 / 3,
}

MAX_LAYERS = 10**4
MAX_EXPERTS = 2**15 - 1  # expert ids are int16 in traces
MAX_WIDTH = 2**20  # hidden, intermediate and head sizes
MAX_VOCAB = 2**24
MAX_HEADS = 2**14
MAX_BYTES = 2**50  # 1 PiB: any one size in bytes


class HFModelRecipe(BaseModel):
    """How to build a random-weight transformers model for this spec (tiny presets)."""

    model_config = ConfigDict(extra="forbid")
    config_class: str = Field(description="transformers config class name, e.g. MixtralConfig")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    """Dimensions and byte sizes of one MoE model.

    Contract: all sizes are positive, ``top_k <= num_experts``, dense layers lie in
    ``[0, num_layers)``; ``expert_bytes`` is the size of one routed expert's weights in
    ``dtype`` (gate, up and down projections).
    """

    # Upper bounds are sanity limits far past any published model (the largest have a
    # few hundred layers and experts); MAX_EXPERTS is what a trace's int16 ids hold.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=256)
    family: str = Field(description="transformers model_type, e.g. 'mixtral'")
    num_layers: int = Field(gt=0, le=MAX_LAYERS, description="decoder layers, dense and MoE")
    dense_layers: list[int] = Field(
        default_factory=list, description="decoder layers without experts"
    )
    num_experts: int = Field(gt=0, le=MAX_EXPERTS, description="routed experts per MoE layer (J)")
    top_k: int = Field(gt=0, description="experts per token (K)")
    num_shared_experts: int = Field(default=0, ge=0, le=MAX_EXPERTS)
    hidden_size: int = Field(gt=0, le=MAX_WIDTH)
    expert_intermediate_size: int = Field(gt=0, le=MAX_WIDTH)
    shared_expert_intermediate_size: int = Field(default=0, ge=0, le=MAX_WIDTH)
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    num_attention_heads: int = Field(gt=0, le=MAX_HEADS)
    num_kv_heads: int = Field(gt=0, le=MAX_HEADS)
    head_dim: int = Field(gt=0, le=MAX_WIDTH)
    dtype: DType = "bf16"
    expert_bytes: int = Field(
        default=0, ge=0, le=MAX_BYTES, description="0 = derive from dimensions"
    )
    weight_format: WeightFormat | None = Field(
        default=None,
        description="format the weights are stored and run in (None: dtype); "
        "see with_weight_format",
    )
    dense_bytes_per_layer: int = Field(
        default=0, ge=0, le=MAX_BYTES, description="0 = derive from dimensions"
    )
    embedding_bytes: int = Field(
        default=0, ge=0, le=MAX_BYTES, description="0 = derive from dimensions"
    )
    sources: list[str] = Field(default_factory=list, description="where the figures come from")
    hf_recipe: HFModelRecipe | None = None

    @model_validator(mode="after")
    def _check_and_derive(self) -> ModelSpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) exceeds num_experts ({self.num_experts})")
        bad = [layer for layer in self.dense_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} outside [0, {self.num_layers})")
        if len(set(self.dense_layers)) >= self.num_layers:
            raise ValueError("a model needs at least one MoE layer")
        b = DTYPE_BYTES[self.dtype]
        h = self.hidden_size
        if self.expert_bytes == 0:
            self.expert_bytes = 3 * h * self.expert_intermediate_size * b
        if self.dense_bytes_per_layer == 0:
            attn = h * self.num_attention_heads * self.head_dim * 2
            attn += h * self.num_kv_heads * self.head_dim * 2
            gate = h * self.num_experts
            shared = 3 * h * self.shared_expert_intermediate_size * max(self.num_shared_experts, 0)
            self.dense_bytes_per_layer = (attn + gate + shared + 2 * h) * b
        if self.embedding_bytes == 0:
            self.embedding_bytes = 2 * self.vocab_size * h * b
        return self

    # -- derived figures -------------------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Weights of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def expert_bytes_as(self, fmt: str) -> int:
        """Bytes of one routed expert in weight format ``fmt`` (FORMAT_BITS)."""
        if fmt not in FORMAT_BITS:
            raise InputError(f"unknown weight format {fmt!r} (one of {', '.join(FORMAT_BITS)})")
        return math.ceil(self.expert_params * FORMAT_BITS[fmt] / 8)

    def with_weight_format(self, fmt: str) -> ModelSpec:
        """This model with its weights in ``fmt`` (as hybrid users run quantized models):
        expert bytes from FORMAT_BITS, dense and embedding bytes scaled by the same bits
        per weight against ``dtype``. Activations stay in ``dtype``; the name stays (the
        same model's traces still fit)."""
        scale = FORMAT_BITS[fmt] / (8 * DTYPE_BYTES[self.dtype]) if fmt in FORMAT_BITS else 0
        return self.model_copy(
            update={
                "weight_format": fmt,
                "expert_bytes": self.expert_bytes_as(fmt),
                "dense_bytes_per_layer": math.ceil(self.dense_bytes_per_layer * scale),
                "embedding_bytes": math.ceil(self.embedding_bytes * scale),
            }
        )

    @property
    def num_moe_layers(self) -> int:
        """L: the number of layers with routed experts (trace layer indices 0..L-1)."""
        return self.num_layers - len(set(self.dense_layers))

    @property
    def moe_layer_ids(self) -> list[int]:
        """Decoder-layer index of each MoE layer, in order."""
        dense = set(self.dense_layers)
        return [i for i in range(self.num_layers) if i not in dense]

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    @property
    def experts_total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes

    @property
    def non_expert_bytes(self) -> int:
        """Dense weights that stay on the GPUs: attention, gates, shared experts, embeddings."""
        return self.num_layers * self.dense_bytes_per_layer + self.embedding_bytes

    @property
    def model_bytes(self) -> int:
        return self.experts_total_bytes + self.non_expert_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def summary(self) -> dict[str, Any]:
        """The spec plus derived figures, for `fmoe models --json`."""
        out = self.model_dump(exclude={"hf_recipe"})
        out.update(
            num_moe_layers=self.num_moe_layers,
            total_experts=self.total_experts,
            experts_total_bytes=self.experts_total_bytes,
            model_bytes=self.model_bytes,
            runnable_on_cpu=self.hf_recipe is not None,
        )
        return out

    # -- IO ----------------------------------------------------------------------------
    def to_json(self, path: str | Path) -> None:
        from specs.jsonio import write_json_atomic

        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelSpec:
        from specs.jsonio import load_model_json

        return load_model_json(cls, path)

    @classmethod
    def from_transformers_config(
        cls, config: Any, name: str | None = None, dtype: DType = "bf16"
    ) -> ModelSpec:
        """Build a spec from a transformers MoE config object.

        Raises InputError when the config has no routed experts.
        """
        d = config.to_dict()
        experts = d.get("num_local_experts") or d.get("num_experts") or d.get("n_routed_experts")
        if not experts:
            raise InputError(
                f"config of type {d.get('model_type')!r} is not an MoE model (no experts field)"
            )
        n_layers = d["num_hidden_layers"]
        first_dense = d.get("first_k_dense_replace") or 0
        dense = list(range(first_dense))
        step = d.get("decoder_sparse_step") or 1
        if step > 1:
            dense += [i for i in range(n_layers) if (i + 1) % step != 0 and i not in dense]
        dense += [i for i in d.get("mlp_only_layers") or [] if i not in dense]
        inter = d.get("moe_intermediate_size") or d["intermediate_size"]
        n_shared = d.get("n_shared_experts") or (
            1 if d.get("shared_expert_intermediate_size") else 0
        )
        shared_inter = d.get("shared_expert_intermediate_size") or (
            inter * n_shared if n_shared else 0
        )
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        return cls(
            name=name or d.get("model_type", "model"),
            family=d.get("model_type", "unknown"),
            num_layers=n_layers,
            dense_layers=sorted(dense),
            num_experts=experts,
            top_k=d.get("num_experts_per_tok") or 2,
            num_shared_experts=n_shared if shared_inter else 0,
            hidden_size=d["hidden_size"],
            expert_intermediate_size=inter,
            shared_expert_intermediate_size=shared_inter
            if n_shared == 0
            else shared_inter // max(n_shared, 1),
            vocab_size=d["vocab_size"],
            num_attention_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            dtype=dtype,
            sources=["built from a transformers config"],
        )
