"""``fiddler``: on a miss, compute the expert on the CPU unless fetching it is cheaper.

Source: Fiddler (efeslab/fiddler; arXiv 2402.07033, ICLR'25): popular experts are placed
on the GPU ahead of time; for an expert not on the GPU, Fiddler compares the latency of
copying its weights to the GPU with that of running it on the CPU for the current number
of input tokens (activations moved instead of weights), and takes the faster. Here the
cost model is the executor's own view (link queue + one copy vs CPU queue + task time);
the initial placement is the experts most used in the training workload (offline mode),
as many as the cache holds less one slot. Fiddler's placement is static: a weight it
copies for a GPU run goes into one placeholder buffer (``expert_placeholder`` in
efeslab/fiddler src/fiddler/mixtral.py), never over a placed expert. Here that slot is the
one left free: a fetched expert stays cached until another fetch needs its slot, fetched
experts go first (least recently used first), and a placed one (the least used in
training) only when several copies of one layer step need slots at once (Fiddler loads
them one after another into its one buffer).
"""

from __future__ import annotations

from policies.base import MissAction, Policy
from policies.cache import CacheEntry, ExpertKey
from policies.hybrid_common import HotPlacement, fetch_and_cpu_s
from policies.registry import register_policy


@register_policy
class Fiddler(HotPlacement, Policy):
    name = "fiddler"
    description = "CPU on a miss unless fetching is cheaper (Fiddler's cost model); hot placement"
    staging_slots = 1  # Fiddler's placeholder buffer

    def eviction_score(self, entry: CacheEntry) -> float:
        return self.placement_scores([entry])[0]

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return self.placement_scores(entries)

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        fetch, cpu = fetch_and_cpu_s(self.ctx, key, tokens)
        return MissAction.FETCH if fetch < cpu else MissAction.CPU
