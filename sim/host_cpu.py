"""The host CPU as a server of expert work (hybrid execution's CPU miss action).

Model: the CPU runs one expert task at a time on all its cores (as llama.cpp and
KTransformers parallelise one expert's matmuls over the cores), first come first served.
A task for ``tokens`` rows:

1. the rows' hidden states go down the link (D2H) from the moment of demand;
2. the task starts once they are there and the CPU is free, and takes
   ``specs.costs.cpu_expert_time_s``: the expert's weight bytes over the host memory
   bandwidth left to it (bandwidth-bound decode) or its FLOPs over the CPU's FLOP/s
   (compute-bound prefill), whichever is longer. Copies on the host->GPU links read
   the same host memory: while ``c`` links carry a copy when a task starts, the task
   gets ``1 - sum(link bandwidths) / host bandwidth`` of it (at least 10%; the share
   is taken at the task's start, not re-rated during it). Copies are not slowed by the
   CPU in this model (PCIe, not host memory, bounds them on every preset);
3. the output goes back up (H2D); the layer cannot end before that.

It overlaps GPU compute and copies. Its clock is the engine's (no simpy event per
task, as the links: a FIFO server needs only its "free at" time).
"""

from __future__ import annotations

from collections.abc import Callable

from policies.base import CpuState
from specs import costs
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec

MIN_MEMORY_SHARE = 0.1


class HostCpu:
    """FIFO server of CPU expert tasks (see the module docstring)."""

    def __init__(
        self,
        hw: HardwareProfile,
        spec: ModelSpec,
        copies_Bps: Callable[[], float],
    ) -> None:
        """``copies_Bps()``: the host bandwidth the links' copies take now."""
        if hw.host is None:
            raise ValueError(f"hardware {hw.name!r} has no host figures")
        self.hw, self.spec, self.copies_Bps = hw, spec, copies_Bps
        self.host_Bps = hw.host.memory_bandwidth_Bps
        self.free_at = 0.0
        self.busy_s = 0.0
        self.tasks = 0
        self._compute: dict[tuple[int, float], float] = {}
        self._act: dict[int, float] = {}
        self._state: tuple[float, float, float] | None = None

    def compute_s(self, tokens: int, share: float = 1.0) -> float:
        """One expert task's CPU time over ``tokens`` rows with ``share`` of the memory."""
        k = (tokens, share)
        t = self._compute.get(k)
        if t is None:
            t = self._compute[k] = costs.cpu_expert_time_s(self.hw, self.spec, tokens, share)
        return t

    def round_trip_s(self, tokens: int) -> float:
        """Activations down and back for ``tokens`` rows."""
        t = self._act.get(tokens)
        if t is None:
            t = self._act[tokens] = costs.activation_round_trip_s(self.hw, self.spec, tokens)
        return t

    def submit(self, tokens: int, now: float) -> float:
        """Queue one expert task demanded at ``now``; returns when its output is back on
        the GPU."""
        half = self.round_trip_s(tokens) / 2  # down and up cost alike (same rows)
        share = max(MIN_MEMORY_SHARE, 1.0 - self.copies_Bps() / self.host_Bps)
        work = self.compute_s(tokens, round(share, 3))
        start = max(now + half, self.free_at)
        self.free_at = start + work
        self.busy_s += work
        self.tasks += 1
        return self.free_at + half

    def state(self, now: float) -> CpuState:
        """The queue as a policy sees it (``PolicyContext.executor.cpu_state()``): the
        weight-reading time (and task overhead and link latencies) as the fixed part, the
        FLOPs and activation bytes per row as the per-token part; their sum bounds the
        model's max() from above. ``copy_slowdown``: the memory share one link's copy
        takes from a task (as :meth:`submit` rates it)."""
        if self._state is None:
            spec, host = self.spec, self.hw.host
            assert host is not None
            fixed = (
                spec.expert_bytes / (self.host_Bps * host.expert_bandwidth_efficiency)
                + host.task_overhead_s
                + 2 * self.hw.link.latency_s
            )
            flops = 2 * 3 * spec.hidden_size * spec.expert_intermediate_size
            act = self.round_trip_s(1) - 2 * self.hw.link.latency_s
            slowdown = min(
                1.0 - MIN_MEMORY_SHARE, self.hw.link.pinned_bandwidth_Bps / self.host_Bps
            )
            self._state = (flops / host.flops + act, fixed, slowdown)
        per_token, fixed, slowdown = self._state
        return CpuState(max(0.0, self.free_at - now), per_token, fixed, slowdown)
