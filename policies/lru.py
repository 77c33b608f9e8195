"""``lru``: on-demand loading only; evict the least recently used expert.

No prediction and no prefetch: every miss is a demand load by the executor. Recency is
the cache entry's ``last_used`` (set when loaded and on every use).
"""

from __future__ import annotations

from policies.base import Policy, RecencyEviction
from policies.cache import KernelEviction
from policies.registry import register_policy


@register_policy
class LRU(RecencyEviction, Policy):
    name = "lru"
    description = "on-demand loads only; evict the least recently used expert"

    def kernel_eviction(self) -> KernelEviction:
        return KernelEviction("recency")
