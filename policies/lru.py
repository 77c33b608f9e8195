"""``lru``: on-demand loading only; evict the least recently used expert.

No prediction and no prefetch: every miss is a demand load by the executor. Recency is
the cache entry's ``last_used`` (set when loaded and on every use).
"""

from __future__ import annotations

from policies.base import Policy
from policies.cache import CacheEntry, by_recency
from policies.registry import register_policy


@register_policy
class LRU(Policy):
    name = "lru"
    description = "on-demand loads only; evict the least recently used expert"

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: the oldest last use."""
        return entry.last_used

    @by_recency  # the cache answers from its recency order (same choice, no scoring)
    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return [e.last_used for e in entries]
