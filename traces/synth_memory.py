"""Memory the synthetic generator needs, estimated before anything is drawn."""

from __future__ import annotations

from specs.limits import require_disk, require_memory
from specs.model_spec import ModelSpec
from traces.synth_config import SynthConfig


def token_row_bytes(spec: ModelSpec, embedding_dim: int) -> int:
    """Peak bytes per token row while drawing: ids (int16) and weights (float32) per
    (layer, k); gate rows, logits, lookahead rows and their noise (float32) per (layer,
    expert); float64 per-layer temporaries (noise, logits) per expert; the embedding
    (float64 draw, float32 kept)."""
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    return L * K * 6 + 4 * 4 * L * J + 3 * 8 * J + 12 * embedding_dim + 64


def estimate_bytes(spec: ModelSpec, cfg: SynthConfig) -> float:
    """Estimated peak memory of :func:`generate` (mean lengths, capped as drawn)."""
    rows = _rows(cfg)
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


def stored_row_bytes(spec: ModelSpec, cfg: SynthConfig) -> int:
    """Upper estimate of one token row's bytes in a v2 trace file: ids (2 bytes) and
    float16 weights per (layer, k), sparse gate and lookahead rows (2 x top-K entries of
    id + float16, plus the rest's mass) where stored, the float16 embedding."""
    L, K = spec.num_moe_layers, spec.top_k
    sparse_row = L * (2 * K * 4 + 2)
    rows = int(cfg.with_gate_probs) + int(cfg.with_lookahead)
    emb = 2 * cfg.embedding_dim if cfg.with_embeddings else 0
    return L * K * 4 + rows * sparse_row + emb


def check_stream(spec: ModelSpec, cfg: SynthConfig, budget_bytes: int, out_dir: str) -> None:
    """InputError when a streamed synthesis could not run: one chunk's working memory
    (``budget_bytes`` of arrays, or the whole workload when smaller) past what the machine
    has free, or the file's estimated size past the free disk space under ``out_dir``."""
    whole = estimate_bytes(spec, cfg)
    require_memory(
        f"synthetic workload of {cfg.num_requests} requests for {spec.name} (one chunk)",
        min(
            whole, 2 * budget_bytes + whole - _rows(cfg) * token_row_bytes(spec, cfg.embedding_dim)
        ),
        "lower the number of requests or their lengths (max_prompt_len, max_output_len)",
    )
    require_disk(
        f"synthetic trace of {cfg.num_requests} requests for {spec.name}",
        _rows(cfg) * stored_row_bytes(spec, cfg),
        out_dir,
        "lower the number of requests or their lengths, or write to a larger disk",
    )


def _rows(cfg: SynthConfig) -> float:
    p_mean, o_mean = cfg.length_means()
    per_request = min(p_mean, cfg.max_prompt_len) + min(o_mean, cfg.max_output_len)
    return float(cfg.num_requests) * max(per_request - 1, 1)
