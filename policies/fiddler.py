"""``fiddler``: on a miss, compute the expert on the CPU unless fetching it is cheaper.

Source: Fiddler (efeslab/fiddler; arXiv 2402.07033, ICLR'25): popular experts are placed
on the GPU ahead of time; for an expert not on the GPU, Fiddler compares the latency of
copying its weights to the GPU with that of running it on the CPU for the current number
of input tokens (activations moved instead of weights), and takes the faster. Here the
cost model is the executor's own view (link queue + one copy vs CPU queue + task time);
the initial placement is the experts most used in the training workload (offline mode),
as many as the cache holds; fetched experts then replace the least recently used ones
(Fiddler keeps its placement static; the difference only matters when it fetches).
"""

from __future__ import annotations

from policies.base import MissAction, Policy, RecencyEviction
from policies.cache import ExpertKey
from policies.hybrid_common import HotPlacement, fetch_and_cpu_s
from policies.registry import register_policy


@register_policy
class Fiddler(HotPlacement, RecencyEviction, Policy):
    name = "fiddler"
    description = "CPU on a miss unless fetching is cheaper (Fiddler's cost model); hot placement"

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        fetch, cpu = fetch_and_cpu_s(self.ctx, key, tokens)
        return MissAction.FETCH if fetch < cpu else MissAction.CPU
