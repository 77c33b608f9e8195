"""``fmoe-hybrid``: fMoE's expert maps and searches, with the miss action chosen by cost.

fMoE (``policies.fmoe``) prefetches what its semantic and trajectory searches predict
and evicts by prediction-weighted frequency; this subclass keeps all of that and adds,
for each demanded expert that is not resident, the cheapest action from the executor's
view: fetch it when its copy (behind the link's queue) lands no later than a CPU task
(behind the CPU's queue, activations both ways) would return, else compute it on the
CPU. A tie goes to the fetch, which also leaves the expert cached for later uses. Only
exact actions (fetch, CPU): exact by default and always.

With a profile without host figures every miss is a fetch (plain fMoE).
"""

from __future__ import annotations

from typing import Any

from policies.base import GateOutput, IterationStart, MissAction, PrefetchDecision
from policies.cache import ExpertKey, ExpertState
from policies.fmoe import FmoePolicy
from policies.hybrid_common import HotPlacement, fetch_and_cpu_s
from policies.registry import register_policy


@register_policy
class FmoeHybrid(HotPlacement, FmoePolicy):
    name = "fmoe-hybrid"
    description = "fMoE prefetch and eviction; each miss fetched or run on the CPU, by cost"
    miss_action_on_loading = True  # a late prefetch may lose to the CPU too

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        view = None if self.ctx is None else self.ctx.executor
        if view is None or view.cpu_state() is None:
            return MissAction.FETCH
        fetch, cpu = fetch_and_cpu_s(self.ctx, key, tokens)
        if self.ctx.cache_of(key).state(key) is ExpertState.LOADING:  # type: ignore[union-attr]
            # its copy is under way: at most the link's queue is left of it
            fetch -= view.link_state(self.ctx.placement.device_of(key)).copy_s  # type: ignore[union-attr]
        return MissAction.FETCH if fetch <= cpu else MissAction.CPU

    # -- prefetch only what arrives in time ------------------------------------------------
    def on_iteration_start(self, ev: IterationStart) -> None:
        self._at_layer, self._rows = -1, max(1, len(ev.request_ids))
        super().on_iteration_start(ev)

    def on_gate(self, ev: GateOutput) -> None:
        self._at_layer, self._rows = ev.layer, max(1, len(ev.topk_ids))
        super().on_gate(ev)

    def decide_prefetch(self) -> PrefetchDecision:
        """fMoE's orders, kept only while the link is otherwise idle (demand copies go
        first and a queued prefetch would slow them and the CPU's memory reads), when the
        copy lands before the expert is needed (the copies accepted before it, against
        the layers until its layer times the expected layer time) and when one copy costs
        no more than one CPU task: otherwise the CPU serves the expert when it comes.
        Without a CPU view every order is kept (plain fMoE)."""
        dec = super().decide_prefetch()
        ctx = self.ctx
        view = None if ctx is None else ctx.executor
        if not dec.enqueue or view is None or view.cpu_state() is None:
            return dec
        assert ctx is not None
        L = ctx.spec.num_moe_layers
        at = getattr(self, "_at_layer", -1)
        layer_s = self._layer_estimate_s(view)
        cpu = view.cpu_state()
        # what a CPU task costs now (its queue included): a copy dearer than that saves
        # less than it costs the link, the slot it takes and the host memory it reads
        cpu_task_s = cpu.expert_s_fixed + cpu.expert_s_per_token
        ahead: dict[int, float] = {}
        kept = []
        for order in sorted(dec.enqueue, key=lambda o: -o.priority):
            dev = ctx.placement.device_of(order.key)
            if dev not in ahead:
                ahead[dev] = view.link_state(dev).queued_s
            link = view.link_state(dev)
            arrive = ahead[dev] + link.copy_s
            layers = order.layer - at if order.layer > at else order.layer + L - at
            if ahead[dev] == 0.0 and arrive <= layers * layer_s and link.copy_s <= cpu_task_s:
                ahead[dev] = arrive
                kept.append(order)
        dec.enqueue = kept
        return dec

    def _layer_estimate_s(self, view: Any) -> float:
        """One MoE layer step now: the GPU part, or the CPU serving the share of the
        layer's experts that miss (the run's miss rate so far), whichever is longer."""
        assert self.ctx is not None
        spec = self.ctx.spec
        rows = getattr(self, "_rows", 1)
        experts = min(rows * spec.top_k, spec.num_experts)
        demands = sum(c.counters.demands for c in self.ctx.caches)
        misses = sum(c.counters.misses for c in self.ctx.caches)
        miss_rate = misses / demands if demands else 1.0
        cpu = view.cpu_state()
        per_expert_rows = rows * spec.top_k / experts
        cpu_s = (
            experts * miss_rate * (cpu.expert_s_fixed + per_expert_rows * cpu.expert_s_per_token)
        )
        return max(view.layer_time_s(rows), cpu_s)
