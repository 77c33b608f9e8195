"""Time costs of compute and transfers, from a HardwareProfile and a ModelSpec.

The simulator calls only these functions, so a calibrated profile and a published one
are used the same way.
"""

from __future__ import annotations

from specs.hardware import HardwareProfile
from specs.model_spec import DTYPE_BYTES, ModelSpec


def _roofline_s(hw: HardwareProfile, bytes_read: float, flops: float) -> float:
    eff = hw.compute.roofline_efficiency
    mem = bytes_read / (hw.gpu.memory_bandwidth_Bps * eff)
    cmp = flops / (hw.gpu.tflops * 1e12 * eff)
    return max(mem, cmp) + hw.compute.kernel_launch_s


def expert_time_s(hw: HardwareProfile, spec: ModelSpec, tokens: int) -> float:
    """One routed expert's FFN over ``tokens`` tokens (tokens >= 1)."""
    if hw.compute.expert is not None:
        return hw.compute.expert(tokens)
    flops = 2 * 3 * spec.hidden_size * spec.expert_intermediate_size * tokens
    return _roofline_s(hw, spec.expert_bytes, flops)


def dense_layer_time_s(hw: HardwareProfile, spec: ModelSpec, tokens: int, context: int) -> float:
    """One decoder layer without its routed experts: attention, norms, gate, shared experts.

    ``tokens`` is the number of tokens in the iteration, ``context`` the mean KV length.
    """
    if hw.compute.dense is not None:
        return hw.compute.dense(tokens, context)
    b = DTYPE_BYTES[spec.dtype]
    params = spec.dense_bytes_per_layer / b
    kv_read = context * spec.kv_bytes_per_token / spec.num_layers
    flops = 2 * params * tokens + 4 * spec.num_attention_heads * spec.head_dim * tokens * context
    return _roofline_s(hw, spec.dense_bytes_per_layer + kv_read, flops)


def head_time_s(hw: HardwareProfile, spec: ModelSpec, tokens: int) -> float:
    """Embedding lookup and LM head for one iteration."""
    if hw.compute.head is not None:
        return hw.compute.head(tokens)
    b = DTYPE_BYTES[spec.dtype]
    lm_head_bytes = spec.embedding_bytes / 2
    return _roofline_s(hw, lm_head_bytes, 2 * (lm_head_bytes / b) * tokens)


def transfer_time_s(hw: HardwareProfile, nbytes: int, pinned: bool = True) -> float:
    """One host->GPU copy of ``nbytes`` on an otherwise idle link."""
    bw = hw.link.pinned_bandwidth_Bps if pinned else hw.link.pageable_bandwidth_Bps
    return hw.link.latency_s + nbytes / bw
