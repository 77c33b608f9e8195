"""SynthConfig: the synthetic generator's knobs (see :mod:`traces.synth` for what each does).

The routing defaults are fitted to measured statistics of real routing by
experiments/synth_defaults_fit.py (the Mixtral paper's Table 5 and the switch-base-8 trace
in tests/fixtures), or, where nothing measured constrains them, keep the generator's
first values; docs/workloads.md gives each default's source."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LENGTH_PRESETS: dict[str, tuple[float, float]] = {
    "lmsys": (37.0, 127.0),  # LMSYS-Chat-1M mean input/output tokens (fMoE paper)
    "sharegpt": (43.0, 122.0),  # ShareGPT
}


MAX_REQUESTS = 10**7
MAX_SEED = 2**63 - 1  # numpy and torch seeds
MAX_LEN = 2**20  # tokens of one prompt or output
MAX_KINDS = 10**5  # topics and token kinds
MAX_SCALE = 1e3  # strengths, noises, skews, temperature: float32 logits stay finite


class SynthConfig(BaseModel):
    """Knobs of the synthetic generator (see the module docstring for what each does)."""

    # Upper bounds are sanity limits (nothing a workload needs is near them) that keep
    # the float32 routing math finite; memory is checked against the machine separately.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_requests: int = Field(100, ge=1, le=MAX_REQUESTS, description="requests to generate")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="seed of the tokens (lengths, kinds, noise, arrivals)"
    )
    world_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="seed of the structure (topics, popularity, affinity); None = seed",
    )
    preset: Literal["lmsys", "sharegpt"] = Field(
        "lmsys", description="length means: lmsys 37/127, sharegpt 43/122"
    )
    prompt_len_mean: float | None = Field(
        None, gt=0, le=MAX_LEN, description="mean prompt tokens; None = preset"
    )
    output_len_mean: float | None = Field(
        None, gt=0, le=MAX_LEN, description="mean output tokens; None = preset"
    )
    length_sigma: float = Field(
        0.8,
        ge=0,
        le=10,
        description="lognormal shape of both lengths; 0 = every request at the mean",
    )
    max_prompt_len: int = Field(2048, ge=1, le=MAX_LEN)
    max_output_len: int = Field(2048, ge=1, le=MAX_LEN)
    arrival: Literal["fixed", "poisson"] = Field("poisson", description="arrival process")
    arrival_rate: float = Field(
        0.0, ge=0, le=1e9, description="requests per second; 0 = all arrive at t=0"
    )
    num_topics: int = Field(8, ge=1, le=MAX_KINDS, description="semantic clusters of requests")
    topic_skew: float = Field(
        0.0, ge=0, le=MAX_SCALE, description="Zipf exponent of topic frequencies"
    )
    kinds_per_topic: int = Field(
        4,
        ge=1,
        le=MAX_KINDS,
        description="token kinds per topic (own embedding offset and routing)",
    )
    num_kinds: int | None = Field(
        None,
        ge=1,
        le=MAX_KINDS,
        description="token kinds shared by all topics (each topic uses kinds_per_topic of "
        "them); None = every topic has its own kinds",
    )
    popularity_skew: float | list[float] = Field(
        0.0, description="Zipf exponent of expert popularity, one or per layer"
    )
    topic_strength: float = Field(
        0.1, ge=0, le=MAX_SCALE, description="how differently topics route"
    )
    kind_strength: float = Field(
        0.15, ge=0, le=MAX_SCALE, description="how differently token kinds route"
    )
    affinity: float = Field(1.25, ge=0, le=MAX_SCALE, description="cross-layer transition strength")
    temporal_locality: float = Field(
        0.06,
        ge=0,
        le=1,
        description="probability a token re-uses the previous token's experts (at the last layer)",
    )
    temporal_locality_first: float | None = Field(
        0.02,
        ge=0,
        le=1,
        description="re-use probability at the first MoE layer, rising linearly to "
        "temporal_locality at the last; None = temporal_locality at every layer",
    )
    temporal_locality_mid: float | None = Field(
        0.18,
        ge=0,
        le=1,
        description="re-use probability at the middle MoE layer: the profile runs linearly "
        "first -> middle -> last; None = straight from first to last",
    )
    routing_noise: float = Field(
        1.0, ge=0, le=MAX_SCALE, description="scale of per-token Gumbel noise on the logits"
    )
    gate_temperature: float = Field(
        1.0,
        ge=1 / MAX_SCALE,
        le=MAX_SCALE,
        description="softmax temperature of the gate rows",
    )
    normalize_topk: bool = Field(
        True, description="renormalize top-K weights to sum 1 (Mixtral) or not (Qwen)"
    )
    embedding_dim: int = Field(64, ge=1, le=2**16, description="width of per-token embeddings")
    embedding_noise: float = Field(
        0.3, ge=0, le=MAX_SCALE, description="token-specific embedding noise"
    )
    kind_embedding_scale: float = Field(
        0.7, ge=0, le=MAX_SCALE, description="distance of kind offsets from the topic centroid"
    )
    lookahead_noise: float = Field(
        1.2, ge=0, le=MAX_SCALE, description="noise of lookahead rows vs the next layer's logits"
    )
    with_gate_probs: bool = True
    with_embeddings: bool = True
    with_lookahead: bool = True

    @field_validator("popularity_skew")
    @classmethod
    def _skew_ok(cls, v: float | list[float]) -> float | list[float]:
        vals = v if isinstance(v, list) else [v]
        if not vals or any(not math.isfinite(x) or not 0 <= x <= MAX_SCALE for x in vals):
            raise ValueError(
                f"popularity_skew must be in [0, {MAX_SCALE:g}] (one value or one per layer)"
            )
        return v

    def length_means(self) -> tuple[float, float]:
        p, o = LENGTH_PRESETS[self.preset]
        return (self.prompt_len_mean or p, self.output_len_mean or o)


# -- shared sampling core ---------------------------------------------------------------------
