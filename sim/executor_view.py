"""The simulator's :class:`~policies.base.ExecutorView`: what a policy may know of the
links and the layer time (deadline-aware prefetch), read from the live links and the
run's cost model. Estimates, as the interface says: they ignore copies the policy has
not ordered yet and the demand loads of layers still to come."""

from __future__ import annotations

from typing import Any

from policies.base import CpuState, LinkState, Residency
from sim.links import Links
from sim.timing import Timing
from specs.model_spec import ModelSpec


class SimExecutorView:
    """Links and layer time of one simulated run.

    ``context`` is the mean KV length the layer-time estimate assumes (the run's mean
    prompt plus half its mean output, set by :func:`sim.run.simulate`)."""

    def __init__(self, links: Links, timing: Timing, spec: ModelSpec, context: float = 0.0):
        self.links, self.timing, self.spec = links, timing, spec
        self.context = float(context)
        self._copy_s = timing.transfer(spec.expert_bytes)
        self._layer: dict[int, float] = {}
        n = timing.hw.num_gpus
        # decoder layers per MoE layer (dense layers' time is spread over the MoE ones)
        self._per_moe = spec.num_layers / max(spec.num_moe_layers, 1)
        self._handoffs = (n - 1) / max(spec.num_moe_layers, 1)
        self._gpus = n

    def link_state(self, device: int) -> LinkState:
        """Seconds of copies ahead of a new prefetch on ``device``'s link: what is left of
        the copies in flight and the queued demand loads, at the link bandwidth (queued
        prefetches are the policy's own; it ranks them itself). The engine's clock may run
        ahead of simpy's, so "now" is the latest time the view can see (simpy's clock or
        the start of a copy segment): an in-flight copy may be counted a little long."""
        link = self.links.links[device]
        now = self.links.env.now
        ch = link.ch0
        if ch is not None:  # one channel: the loops below, unrolled (per prefetch order)
            left_s = 0.0
            job = ch.job
            if job is not None:
                if ch.start > now:
                    now = ch.start
                left_s += max(0.0, ch.end - now) + max(0, job.remaining - ch.seg) / link.bw
            left_s += sum(j.remaining for j in link.demand_q) / link.bw
            if self.hybrid is not None:
                left_s += self.hybrid.pending_fetches[device] * self._copy_s
            return LinkState(left_s / 1, link.bw, self._copy_s)
        for ch in link.channels:
            if ch.job is not None and ch.start > now:
                now = ch.start
        left_s = 0.0
        for ch in link.channels:
            job = ch.job
            if job is None:
                continue
            # the rest of this segment, then the job's bytes after it
            left_s += max(0.0, ch.end - now) + max(0, job.remaining - ch.seg) / link.bw
        left_s += sum(j.remaining for j in link.demand_q) / link.bw
        if self.hybrid is not None:  # fetches a layer step decided but has not started yet
            left_s += self.hybrid.pending_fetches[device] * self._copy_s
        return LinkState(left_s / len(link.channels), link.bw, self._copy_s)

    def layer_time_s(self, tokens: int) -> float:
        """One MoE layer step at ``tokens`` rows without waiting for copies: the decoder
        layers per MoE layer (dense part), the routed experts' compute (the distinct
        experts the rows choose, spread over the GPUs), the pipeline hand-offs and the
        activation exchange per MoE layer."""
        t = self._layer.get(tokens)
        if t is not None:
            return t
        spec, timing = self.spec, self.timing
        rows = max(int(tokens), 1)
        J, K = spec.num_experts, spec.top_k
        distinct = J * (1.0 - (1.0 - K / J) ** rows)  # expected distinct experts chosen
        per_expert = max(1, round(rows * K / distinct))
        experts = distinct / self._gpus * timing.expert(per_expert)
        dense = self._per_moe * timing.dense(rows, self.context)
        t = dense + experts + self._handoffs * timing.handoff(rows) + timing.exchange(rows)
        self._layer[tokens] = t
        return t

    hybrid: Any = None  # the engine (sim.engine_hybrid.HybridSteps), set when it is built

    def cpu_state(self) -> CpuState | None:
        """The host CPU's expert queue (sim.host_cpu), or None when the profile has no host
        figures."""
        e = self.hybrid
        if e is None or e.cpu is None:
            return None
        return e.cpu.state(e.now_hint)

    def residency(self) -> Residency | None:
        """None: the Python engine's caches are dicts only (policies read them). The
        prefetching compiled path puts its own method on the view while it runs
        (:func:`sim.engine_prefetch_view.residency_of`)."""
        return None
