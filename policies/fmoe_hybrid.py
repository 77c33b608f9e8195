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

from policies.base import MissAction
from policies.cache import ExpertKey
from policies.fmoe import FmoePolicy
from policies.hybrid_common import fetch_and_cpu_s
from policies.registry import register_policy


@register_policy
class FmoeHybrid(FmoePolicy):
    name = "fmoe-hybrid"
    description = "fMoE prefetch and eviction; each miss fetched or run on the CPU, by cost"

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        view = None if self.ctx is None else self.ctx.executor
        if view is None or view.cpu_state() is None:
            return MissAction.FETCH
        fetch, cpu = fetch_and_cpu_s(self.ctx, key, tokens)
        return MissAction.FETCH if fetch <= cpu else MissAction.CPU
