"""A synthetic workload generator whose structure is explicit and tunable, and a fit to real traces.

The model (one "world" drawn from ``world_seed``, tokens drawn from ``seed``):

- Requests belong to topics (``num_topics``, frequencies Zipf(``topic_skew``)); each
  request carries ``tags["topic"]``. Each topic uses ``kinds_per_topic`` token kinds
  (think: groups of similar tokens), drawn per token from a topic-specific mix. The kinds
  come from one vocabulary of ``num_kinds`` shared by all topics (topics overlap in
  vocabulary, as real prompts do), or, with ``num_kinds=None``, each topic owns its own.
- Routing logits of token t at layer l are the sum of
  popularity  ``-popularity_skew[l] * log(rank)`` over a random expert order per layer
  (0 = uniform; larger = a few experts take most tokens);
  topic       ``topic_strength * N(0, 1)`` per (topic, layer, expert): requests of a
  topic route alike;
  kind        ``kind_strength * N(0, 1)`` per (kind, layer, expert): tokens of a kind
  route alike, and carry nearby embeddings, so semantically similar tokens route
  alike;
  affinity    ``affinity * A_l[i, :]`` averaged over the experts i chosen at layer l-1,
  A_l ~ N(0, 1): which experts tend to follow which (cross-layer transitions);
  noise       ``routing_noise * Gumbel``: token-specific randomness.
- Temporal locality: a token re-uses the previous token's routing rows (same experts,
  same gate rows) with a per-layer probability rising linearly from
  ``temporal_locality_first`` at the first MoE layer to ``temporal_locality`` at the last
  (``temporal_locality_first=None``: the same at every layer). One draw per token serves
  all layers, so the copies nest across layers: a token follows its own routing up to
  some depth and its predecessor's below it.
- The chosen experts are the top-K of the logits; the gate row is
  ``softmax(logits / gate_temperature)`` (so its top-K are exactly ``topk_ids``); the
  weights are the top-K probabilities, renormalized to sum 1 when ``normalize_topk``.
- Lookahead row l (the next layer's gate applied to this layer's hidden state) is
  ``softmax((logits_{l+1} + lookahead_noise * N(0, 1)) / gate_temperature)``; the last
  layer's row is zero. ``lookahead_noise`` sets how often it agrees with layer l+1's
  actual top expert (about 70% at the default).
- Embeddings (the embedding layer's output, ``embedding_dim`` wide, a low-dimensional
  stand-in for the hidden size): unit topic centroid + ``kind_embedding_scale`` x unit
  kind offset + ``embedding_noise`` x token noise (norm about ``embedding_noise``).
- Lengths: lognormal with the preset's means (``lmsys`` 37/127, ``sharegpt`` 43/122 as
  in the fMoE paper) and shape ``length_sigma``, clipped to [1, max]; arrivals at t=0,
  every 1/rate (``fixed``) or Poisson at ``arrival_rate`` requests per second.

:func:`fit` estimates per-layer popularity, cross-layer transition probabilities,
temporal re-use and the length and arrival figures from a real workload;
``FittedModel.generate`` draws a workload with those statistics (routing, weights, gate
and lookahead rows; no embeddings, which a routing-only trace cannot inform).

Why the defaults are what they are (the fMoE paper's motivation and the routing
analyses it builds on; changed after the first fMoE simulations, where the old defaults
made a token's routing barely predictable from its own semantics, so every per-token
predictor lost to request-level averages, the opposite of what the paper observes):

- ``popularity_skew`` 0.3 (was 1.0): load-balancing losses make decoder-only MoE routing
  close to uniform over a dataset ("balanced expert routing", the fMoE paper's argument
  against coarse request-level tracking).
- ``topic_strength`` 0.5 (was 1.0), ``kind_strength`` 3.0 (was 1.5), shared kinds
  (``num_kinds`` 64 used ``kinds_per_topic`` 16 at a time, was 4 own kinds per topic),
  ``kind_embedding_scale`` 2.0 (was 0.7): routing follows the token (its identity and
  syntax) far more than the topic of the text (Mixtral's routing analysis finds no clear
  domain specialisation; OpenMoE reports context-independent, token-id-driven routing),
  and the embedding layer's output of a token does not depend on the topic, so the
  nearest stored embedding is a token of the same kind, usually from another request.
  A request mixes many kinds, which is what blurs request-level aggregates.
- ``gate_temperature`` 1.5 (was 1.0): keeps the gate rows about as confident as before
  (mean top-2 mass 0.84, was 0.87) now that the kind term widens the logits.
- ``temporal_locality_first`` 0.0 rising to ``temporal_locality`` 0.3: Mixtral's
  consecutive-token expert repetition is near chance at the first layer and clearly
  above it in the middle and last layers; the first layers route by the token itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from specs.errors import InputError
from specs.limits import require_memory
from specs.model_spec import ModelSpec
from traces.types import Request, Routing, Workload

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
        16,
        ge=1,
        le=MAX_KINDS,
        description="token kinds per topic (own embedding offset and routing)",
    )
    num_kinds: int | None = Field(
        64,
        ge=1,
        le=MAX_KINDS,
        description="token kinds shared by all topics (each topic uses kinds_per_topic of "
        "them); None = every topic has its own kinds",
    )
    popularity_skew: float | list[float] = Field(
        0.3, description="Zipf exponent of expert popularity, one or per layer"
    )
    topic_strength: float = Field(
        0.5, ge=0, le=MAX_SCALE, description="how differently topics route"
    )
    kind_strength: float = Field(
        3.0, ge=0, le=MAX_SCALE, description="how differently token kinds route"
    )
    affinity: float = Field(3.0, ge=0, le=MAX_SCALE, description="cross-layer transition strength")
    temporal_locality: float = Field(
        0.3,
        ge=0,
        le=1,
        description="probability a token re-uses the previous token's experts (at the last layer)",
    )
    temporal_locality_first: float | None = Field(
        0.0,
        ge=0,
        le=1,
        description="re-use probability at the first MoE layer, rising linearly to "
        "temporal_locality at the last; None = temporal_locality at every layer",
    )
    routing_noise: float = Field(
        1.0, ge=0, le=MAX_SCALE, description="scale of per-token Gumbel noise on the logits"
    )
    gate_temperature: float = Field(
        1.5,
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
        2.0, ge=0, le=MAX_SCALE, description="distance of kind offsets from the topic centroid"
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
@dataclass
class _Skeleton:
    """Request-level draws: lengths, arrivals, and the flat token index."""

    prompt_len: np.ndarray
    output_len: np.ndarray
    arrival_s: np.ndarray
    offsets: np.ndarray
    req_of_token: np.ndarray
    first: np.ndarray  # token is its request's first row

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def _skeleton(prompt_len: np.ndarray, output_len: np.ndarray, arrival_s: np.ndarray) -> _Skeleton:
    counts = prompt_len + output_len - 1
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    req = np.repeat(np.arange(len(counts)), counts)
    first = np.zeros(int(offsets[-1]), dtype=bool)
    first[offsets[:-1]] = True
    return _Skeleton(prompt_len, output_len, arrival_s, offsets, req, first)


def _lognormal_lengths(
    rng: np.random.Generator, n: int, mean: float, sigma: float, cap: int
) -> np.ndarray:
    if sigma == 0:
        return np.full(n, int(np.clip(round(mean), 1, cap)), dtype=np.int64)
    mu = math.log(mean) - sigma**2 / 2  # so that E[exp(N(mu, sigma))] = mean
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), 1, cap).astype(np.int64)


def _arrivals(rng: np.random.Generator, n: int, kind: str, rate: float) -> np.ndarray:
    if rate == 0:
        return np.zeros(n)
    if kind == "fixed":
        return np.arange(n) / rate
    gaps = rng.exponential(1.0 / rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def _softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    e = np.exp((z - z.max(axis=-1, keepdims=True)) / np.float32(temperature))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def _sample_routing(
    sk: _Skeleton,
    spec: ModelSpec,
    rng: np.random.Generator,
    base_logits,  # (layer, prev_ids [N, K] | None) -> logits [N, J]
    reuse: np.ndarray,  # [L] probability of copying the previous token's row
    noise: float,
    temperature: float,
    normalize_topk: bool,
    lookahead_noise: float,
    with_probs: bool,
    with_lookahead: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Sample top-K routing for every token, layer by layer (vectorized over tokens)."""
    N, L, J, K = sk.num_tokens, spec.num_moe_layers, spec.num_experts, spec.top_k
    ids = np.empty((N, L, K), dtype=np.int16)
    weights = np.empty((N, L, K), dtype=np.float32)
    probs_all = np.empty((N, L, J), dtype=np.float32) if with_probs else None
    logits_all = np.empty((N, L, J), dtype=np.float32) if with_lookahead else None
    arange = np.arange(N)
    # one draw per token for all layers: copies nest across layers (a token that copies at
    # a layer with low re-use copies at every layer with higher re-use), so a copied
    # token keeps a consistent layer-to-layer path instead of mixing two tokens' paths
    copy_draw = rng.random(N)
    prev: np.ndarray | None = None
    for layer in range(L):
        z = np.asarray(base_logits(layer, prev), dtype=np.float32)
        if noise > 0:
            u = np.maximum(rng.random((N, J), dtype=np.float32), np.float32(1e-12))
            z = z - np.float32(noise) * np.log(-np.log(u))  # Gumbel(0, noise)
        # temporal locality: copy the row of the nearest earlier token that did not copy
        copy = (copy_draw < reuse[layer]) & ~sk.first
        src = np.maximum.accumulate(np.where(copy, 0, arange))
        z = z[src].astype(np.float32)
        p = _softmax(z, temperature).astype(np.float32)
        # top-K read off the stored float32 gate row, so the two always agree
        top = np.argpartition(-p, K - 1, axis=-1)[:, :K] if K < J else np.tile(np.arange(J), (N, 1))
        order = np.argsort(-np.take_along_axis(p, top, -1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, -1)
        w = np.take_along_axis(p, top, axis=-1)
        if normalize_topk:
            w = w / w.sum(axis=-1, keepdims=True)
        ids[:, layer], weights[:, layer] = top, w
        if probs_all is not None:
            probs_all[:, layer] = p
        if logits_all is not None:
            logits_all[:, layer] = z
        prev = top
    look = None
    if logits_all is not None:
        look = np.zeros((N, L, J), dtype=np.float32)
        if L > 1:
            noise_rows = rng.standard_normal((N, L - 1, J), dtype=np.float32)
            nxt = logits_all[:, 1:] + np.float32(lookahead_noise) * noise_rows
            look[:, :-1] = _softmax(nxt, temperature)
    return ids, weights, probs_all, look


def _assemble(
    spec: ModelSpec,
    sk: _Skeleton,
    routing: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
    embeddings: np.ndarray | None,
    tags: list[dict[str, Any]],
    provenance: dict[str, Any],
    prefix: str,
) -> Workload:
    ids, weights, probs, look = routing
    reqs = []
    off = sk.offsets.tolist()
    for i in range(len(sk.prompt_len)):
        sl = slice(off[i], off[i + 1])
        reqs.append(
            Request(
                request_id=f"{prefix}{i}",
                arrival_s=float(sk.arrival_s[i]),
                prompt_len=int(sk.prompt_len[i]),
                output_len=int(sk.output_len[i]),
                routing=Routing(
                    topk_ids=ids[sl],
                    topk_weights=weights[sl],
                    gate_probs=None if probs is None else probs[sl],
                    embeddings=None if embeddings is None else embeddings[sl],
                    lookahead=None if look is None else look[sl],
                ),
                tags=tags[i],
            )
        )
    return Workload(spec, reqs, provenance)


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# -- memory, before anything is drawn --------------------------------------------------------
def token_row_bytes(spec: ModelSpec, embedding_dim: int) -> int:
    """Peak bytes per token row while drawing: ids (int16) and weights (float32) per
    (layer, k); gate rows, logits, lookahead rows and their noise (float32) per (layer,
    expert); float64 per-layer temporaries (noise, logits) per expert; the embedding
    (float64 draw, float32 kept)."""
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    return L * K * 6 + 4 * 4 * L * J + 3 * 8 * J + 12 * embedding_dim + 64


def estimate_bytes(spec: ModelSpec, cfg: SynthConfig) -> float:
    """Estimated peak memory of :func:`generate` (mean lengths, capped as drawn)."""
    p_mean, o_mean = cfg.length_means()
    per_request = min(p_mean, cfg.max_prompt_len) + min(o_mean, cfg.max_output_len)
    rows = cfg.num_requests * max(per_request - 1, 1)
    L, J = spec.num_moe_layers, spec.num_experts
    kinds = cfg.num_kinds if cfg.num_kinds is not None else cfg.num_topics * cfg.kinds_per_topic
    world = 12 * (cfg.num_topics + kinds) * L * J + 12 * L * J * J
    return float(rows) * token_row_bytes(spec, cfg.embedding_dim) + world


def check_memory(spec: ModelSpec, cfg: SynthConfig) -> None:
    """InputError naming the knobs when :func:`generate` would not fit in memory."""
    require_memory(
        f"synthetic workload of {cfg.num_requests} requests for {spec.name}",
        estimate_bytes(spec, cfg),
        "lower the number of requests or their lengths (max_prompt_len, max_output_len)",
    )


# -- knob-driven generator -------------------------------------------------------------------
def generate(spec: ModelSpec, cfg: SynthConfig) -> Workload:
    """Draw a synthetic workload for ``spec`` with the structure ``cfg`` describes.

    Deterministic in (cfg.world_seed or cfg.seed, cfg.seed). Requests carry
    ``tags["topic"]`` (and ``tags["kinds"]`` is not stored: kinds are per token).
    Raises InputError before drawing when the workload would not fit in memory.
    """
    check_memory(spec, cfg)
    L, J = spec.num_moe_layers, spec.num_experts
    skew = (
        cfg.popularity_skew if isinstance(cfg.popularity_skew, list) else [cfg.popularity_skew] * L
    )
    if len(skew) != L:
        raise InputError(f"popularity_skew has {len(skew)} values but the model has {L} MoE layers")
    world = np.random.default_rng(
        [cfg.seed if cfg.world_seed is None else cfg.world_seed, 0xC0FFEE]
    )
    rng = np.random.default_rng([cfg.seed, 1])
    C, Kd, D = cfg.num_topics, cfg.kinds_per_topic, cfg.embedding_dim

    # the world: structure shared by every workload drawn with this world seed
    log_rank = np.log(np.arange(1, J + 1))
    f32 = np.float32
    pop = np.stack([-s * log_rank[world.permutation(J)] for s in skew]).astype(f32)  # [L, J]
    topic_logits = (cfg.topic_strength * world.standard_normal((C, L, J))).astype(f32)
    V = C * Kd if cfg.num_kinds is None else cfg.num_kinds  # the kind vocabulary
    if Kd > V:
        raise InputError(f"kinds_per_topic ({Kd}) exceeds num_kinds ({V})")
    kind_logits = (cfg.kind_strength * world.standard_normal((V, L, J))).astype(f32)
    kind_mix = world.dirichlet(np.ones(Kd), size=C)  # [C, Kd]
    trans = (cfg.affinity * world.standard_normal((L, J, J))).astype(f32)  # row i: after expert i
    centroids = _unit(world, (C, D))
    kind_offsets = cfg.kind_embedding_scale * _unit(world, (V, D))
    if cfg.num_kinds is None:  # topic c owns kinds c*Kd .. (c+1)*Kd-1
        topic_kinds = np.arange(V).reshape(C, Kd)
    else:  # topics draw their kinds from one shared vocabulary, so they overlap
        topic_kinds = np.stack([world.choice(V, Kd, replace=False) for _ in range(C)])
    topic_p = np.arange(1, C + 1, dtype=float) ** -cfg.topic_skew
    topic_p /= topic_p.sum()

    # requests and tokens
    n = cfg.num_requests
    p_mean, o_mean = cfg.length_means()
    sk = _skeleton(
        _lognormal_lengths(rng, n, p_mean, cfg.length_sigma, cfg.max_prompt_len),
        _lognormal_lengths(rng, n, o_mean, cfg.length_sigma, cfg.max_output_len),
        _arrivals(rng, n, cfg.arrival, cfg.arrival_rate),
    )
    topic_of_req = rng.choice(C, size=n, p=topic_p)
    topic = topic_of_req[sk.req_of_token]
    cum = np.cumsum(kind_mix[topic], axis=1)
    kind = topic_kinds[topic, np.minimum((rng.random((len(topic), 1)) > cum).sum(axis=1), Kd - 1)]

    def base(layer: int, prev: np.ndarray | None) -> np.ndarray:
        z = pop[layer] + topic_logits[topic, layer] + kind_logits[kind, layer]
        if prev is not None:
            z = z + trans[layer][prev.astype(np.int64)].mean(axis=1)
        return z

    first = (
        cfg.temporal_locality
        if cfg.temporal_locality_first is None
        else cfg.temporal_locality_first
    )
    reuse = (
        np.linspace(first, cfg.temporal_locality, L) if L > 1 else np.full(L, cfg.temporal_locality)
    )
    routing = _sample_routing(
        sk, spec, rng, base, reuse, cfg.routing_noise,
        cfg.gate_temperature, cfg.normalize_topk, cfg.lookahead_noise,
        cfg.with_gate_probs, cfg.with_lookahead,
    )  # fmt: skip
    emb = None
    if cfg.with_embeddings:
        noise = cfg.embedding_noise / math.sqrt(D) * rng.standard_normal((len(topic), D))
        emb = (centroids[topic] + kind_offsets[kind] + noise).astype(np.float32)
    tags = [{"topic": int(c)} for c in topic_of_req]
    prov = {
        "source": "synthetic",
        "generator": "traces.synth.generate",
        "model": spec.name,
        "config": cfg.model_dump(mode="json"),
    }
    return _assemble(spec, sk, routing, emb, tags, prov, prefix="syn")


# -- fitting to a real trace -------------------------------------------------------------------
@dataclass
class FittedModel:
    """Statistics estimated from a real workload, and a generator that reproduces them.

    ``popularity`` [L, J]: share of selections per expert; ``transitions`` [L-1, J, J]:
    P(expert j chosen at l+1 | expert i chosen at l) over the K x K pairs of each token
    (the target); ``transition_logits`` [L-1, J, J]: what generation adds to layer l+1's
    logits for each expert chosen at l (averaged over the K), calibrated so that the
    generated pairs reproduce ``transitions``;
    ``reuse`` [L]: probability a token copies the previous token's routing row;
    ``prompt_lens``/``output_lens``: the real requests' lengths, resampled;
    ``arrival_rate``: requests per second (0 when all arrive together).
    """

    spec: ModelSpec
    popularity: np.ndarray
    transitions: np.ndarray
    transition_logits: np.ndarray
    reuse: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrival_rate: float
    source: dict[str, Any]

    def generate(
        self,
        num_requests: int,
        seed: int = 0,
        with_gate_probs: bool = True,
        with_lookahead: bool = True,
        lookahead_noise: float = 1.2,
        normalize_topk: bool = True,
    ) -> Workload:
        """Draw a workload whose popularity, transitions, re-use and lengths match the fit."""
        if not 1 <= num_requests <= MAX_REQUESTS:
            raise InputError(f"num_requests must be in [1, {MAX_REQUESTS}], got {num_requests}")
        mean_len = float(np.mean(self.prompt_lens) + np.mean(self.output_lens))
        require_memory(
            f"fitted workload of {num_requests} requests",
            num_requests * max(mean_len - 1, 1) * token_row_bytes(self.spec, 0),
            "lower the number of requests",
        )
        rng = np.random.default_rng([seed, 2])
        pick = rng.integers(0, len(self.prompt_lens), num_requests)
        sk = _skeleton(
            self.prompt_lens[pick].astype(np.int64),
            self.output_lens[pick].astype(np.int64),
            _arrivals(rng, num_requests, "poisson", self.arrival_rate),
        )
        log_pop = np.log(self.popularity)
        trans = self.transition_logits

        def base(layer: int, prev: np.ndarray | None) -> np.ndarray:
            if prev is None:
                return np.broadcast_to(log_pop[0], (sk.num_tokens, log_pop.shape[1]))
            return trans[layer - 1][prev.astype(np.int64)].mean(axis=1)

        # Gumbel noise of scale 1 on log-probabilities = sampling without replacement
        routing = _sample_routing(
            sk, self.spec, rng, base, self.reuse, 1.0, 1.0, normalize_topk,
            lookahead_noise, with_gate_probs, with_lookahead,
        )  # fmt: skip
        prov = {
            "source": "synthetic-fit",
            "generator": "traces.synth.FittedModel.generate",
            "model": self.spec.name,
            "fitted_from": self.source,
            "seed": seed,
        }
        return _assemble(
            self.spec, sk, routing, None, [{} for _ in range(num_requests)], prov, prefix="fit"
        )


def _share_rate(ids: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[L] share of rows whose expert set overlaps the other array's row at that layer."""
    return (ids[..., :, None] == other[..., None, :]).any(axis=(-1, -2)).mean(axis=0)


def _pair_transitions(ids: np.ndarray, popularity: np.ndarray, smoothing: float) -> np.ndarray:
    """[L-1, J, J] smoothed P(j at l+1 | i at l) over the K x K pairs of each token."""
    _, L, K = ids.shape
    J = popularity.shape[1]
    trans = np.zeros((max(L - 1, 0), J, J))
    for layer in range(L - 1):
        a = np.repeat(ids[:, layer], K, axis=1).ravel()
        b = np.tile(ids[:, layer + 1], (1, K)).ravel()
        c = np.bincount(a * J + b, minlength=J * J).reshape(J, J).astype(float)
        trans[layer] = c + smoothing * popularity[layer + 1]
    return trans / trans.sum(axis=2, keepdims=True) if L > 1 else trans


def fit(
    real: Workload,
    smoothing: float = 0.5,
    seed: int = 0,
    calibration_rounds: int = 6,
    calibration_tokens: int = 20_000,
) -> FittedModel:
    """Estimate popularity, cross-layer transitions, temporal re-use, lengths and arrivals.

    ``smoothing`` adds that many pseudo-counts per transition row, spread by the next
    layer's popularity (rows never seen in the real trace fall back to popularity).
    The re-use probability is set so that the share of tokens overlapping the previous
    token's experts matches the real trace: observed overlap minus chance overlap
    (tokens paired at random), over one minus chance. It absorbs any within-request
    similarity of the real trace (e.g. topics), which the fitted model has no other
    way to express.

    Drawing K experts from the average of the previous experts' rows blurs the pair
    statistics, so the transition logits start at log(transitions) and are corrected
    ``calibration_rounds`` times: generate about ``calibration_tokens`` token rows, and
    add log(target) - log(generated) (and the re-use gap) to the parameters.
    """
    if not real.requests:
        raise InputError("cannot fit an empty workload")
    spec = real.spec
    L, J = spec.num_moe_layers, spec.num_experts
    ids = np.concatenate([r.routing.topk_ids for r in real.requests]).astype(np.int64)
    N = len(ids)
    first = np.zeros(N, dtype=bool)
    first[np.cumsum([0] + [r.routing.num_tokens for r in real.requests[:-1]])] = True

    counts = np.zeros((L, J))
    for layer in range(L):
        counts[layer] = np.bincount(ids[:, layer].ravel(), minlength=J)
    popularity = (counts + 0.5) / (counts + 0.5).sum(axis=1, keepdims=True)

    trans = _pair_transitions(ids, popularity, smoothing)

    # re-use: share of tokens overlapping the previous token, minus chance overlap
    keep = np.flatnonzero(~first)
    observed = _share_rate(ids[keep], ids[keep - 1]) if len(keep) else np.zeros(L)
    perm = np.random.default_rng(seed).permutation(N)
    chance = _share_rate(ids, ids[perm])
    reuse = np.clip((observed - chance) / np.maximum(1 - chance, 1e-9), 0.0, 1.0)

    arr = np.sort([r.arrival_s for r in real.requests])
    span = float(arr[-1] - arr[0]) if len(arr) > 1 else 0.0
    rate = (len(arr) - 1) / span if span > 0 else 0.0
    model = FittedModel(
        spec=spec,
        popularity=popularity,
        transitions=trans,
        transition_logits=np.log(trans),
        reuse=reuse,
        prompt_lens=np.array([r.prompt_len for r in real.requests]),
        output_lens=np.array([r.output_len for r in real.requests]),
        arrival_rate=rate,
        source={
            k: real.provenance.get(k) for k in ("source", "file", "model") if k in real.provenance
        },
    )
    per_request = max(N / len(real.requests), 1.0)
    n_cal = int(np.clip(np.ceil(calibration_tokens / per_request), 20, 5000))
    for round_ in range(calibration_rounds if L > 1 else 0):
        sample = model.generate(
            n_cal, seed=seed + 1000 + round_, with_gate_probs=False, with_lookahead=False
        )
        got = np.concatenate([r.routing.topk_ids for r in sample.requests]).astype(np.int64)
        model.transition_logits += np.log(trans) - np.log(
            _pair_transitions(got, popularity, smoothing)
        )
        starts = np.cumsum([0] + [r.routing.num_tokens for r in sample.requests[:-1]])
        later = np.setdiff1d(np.arange(len(got)), starts)
        model.reuse = np.clip(
            model.reuse + observed - _share_rate(got[later], got[later - 1]), 0.0, 1.0
        )
    return model
