"""Memoised costs for one run, all from specs.costs (so calibrated and published
profiles behave the same) plus the interconnect figures of the profile."""

from __future__ import annotations

from specs import costs
from specs.hardware import HardwareProfile
from specs.model_spec import DTYPE_BYTES, ModelSpec


class Timing:
    """Cost functions of one (hardware, model) pair; pure, so results are cached."""

    def __init__(self, hw: HardwareProfile, spec: ModelSpec, pinned: bool = True) -> None:
        self.hw, self.spec, self.pinned = hw, spec, pinned
        self._expert: dict[int, float] = {}
        self._act_bytes = spec.hidden_size * DTYPE_BYTES[spec.dtype]
        self.bandwidth_Bps = (
            hw.link.pinned_bandwidth_Bps if pinned else hw.link.pageable_bandwidth_Bps
        )
        self.latency_s = hw.link.latency_s

    def expert(self, tokens: int) -> float:
        """One routed expert's FFN over ``tokens`` rows."""
        t = self._expert.get(tokens)
        if t is None:
            t = self._expert[tokens] = costs.expert_time_s(self.hw, self.spec, tokens)
        return t

    def dense(self, tokens: int, context: float) -> float:
        """One decoder layer without routed experts (``context``: mean KV length)."""
        return costs.dense_layer_time_s(self.hw, self.spec, tokens, context)  # type: ignore[arg-type]

    def head(self, tokens: int) -> float:
        """Embedding lookup and LM head of one iteration."""
        return costs.head_time_s(self.hw, self.spec, tokens)

    def transfer(self, nbytes: int) -> float:
        """One host->GPU copy on an idle link."""
        return costs.transfer_time_s(self.hw, nbytes, self.pinned)

    def exchange(self, tokens: int) -> float:
        """Expert-parallel activations to the experts' GPUs and back (0 on one GPU)."""
        if self.hw.num_gpus == 1:
            return 0.0
        ic = self.hw.interconnect
        return tokens * self._act_bytes * 2 / ic.bandwidth_Bps + ic.latency_s

    def handoff(self, tokens: int) -> float:
        """Hidden states from one pipeline stage (GPU) to the next."""
        ic = self.hw.interconnect
        return tokens * self._act_bytes / ic.bandwidth_Bps + ic.latency_s
