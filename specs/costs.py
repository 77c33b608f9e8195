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


def cpu_expert_time_s(
    hw: HardwareProfile, spec: ModelSpec, tokens: int, memory_share: float = 1.0
) -> float:
    """One routed expert's FFN on the host CPU over ``tokens`` rows, weights read from host
    memory in ``spec``'s expert format: the larger of the weight bytes over the effective
    bandwidth (decode: bandwidth-bound) and the FLOPs over the CPU's FLOP/s (prefill:
    compute-bound), plus the per-task overhead. ``memory_share`` (0..1]: the share of the
    host memory bandwidth left to the CPU (copies take the rest). ValueError without
    host figures."""
    host = hw.host
    if host is None:
        raise ValueError(f"hardware {hw.name!r} has no host figures")
    bw = host.memory_bandwidth_Bps * host.expert_bandwidth_efficiency * memory_share
    flops = 2 * 3 * spec.hidden_size * spec.expert_intermediate_size * tokens
    return max(spec.expert_bytes / bw, flops / host.flops) + host.task_overhead_s


def activation_round_trip_s(hw: HardwareProfile, spec: ModelSpec, tokens: int) -> float:
    """``tokens`` rows of hidden states GPU->host and the expert's output back
    (rows x hidden x activation bytes each way, a latency each way)."""
    nbytes = tokens * spec.hidden_size * DTYPE_BYTES[spec.dtype]
    down = hw.link.pinned_bandwidth_Bps
    if hw.host is not None and hw.host.d2h_bandwidth_Bps is not None:
        down = hw.host.d2h_bandwidth_Bps
    return 2 * hw.link.latency_s + nbytes / down + nbytes / hw.link.pinned_bandwidth_Bps
