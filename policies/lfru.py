"""``lfru``: vLLM's per-layer LFRU expert cache.

Source: vLLM PR #37190 (``CachedWeightProvider``), as summarised in HYBRID_FIGURES.md
section 5: one cache per MoE layer; a counter ``t`` goes up on every access; per expert
``freq`` (accesses since it was inserted, 1 at insertion) and ``last`` (``t`` at its last
access); a miss takes a free slot or evicts the resident expert not used by this forward
with the lowest ``freq / (t - last + 1)``. Run it with ``--cache-scope per-layer`` for
vLLM's one-cache-per-layer (the study does); with the global scope it is LFRU over all
slots. On-demand only: no prefetch, every miss a fetch.
"""

from __future__ import annotations

from typing import Any

from policies.base import Policy
from policies.cache import CacheEntry, ExpertKey
from policies.registry import register_policy


@register_policy
class LFRU(Policy):
    name = "lfru"
    description = "vLLM's per-layer LFRU: evict the lowest freq / (t - last + 1)"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.t = 0
        self.freq: dict[ExpertKey, int] = {}
        self.last: dict[ExpertKey, int] = {}

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self.t += 1
        self.freq[key] = self.freq.get(key, 0) + 1
        self.last[key] = self.t

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self.t += 1
        self.freq[key] = 0  # the use that follows makes it 1, vLLM's freq at insertion
        self.last[key] = self.t

    def eviction_score(self, entry: CacheEntry) -> float:
        k = entry.key
        return self.freq.get(k, 0) / (self.t - self.last.get(k, 0) + 1)

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        freq, last, t1 = self.freq, self.last, self.t + 1
        return [freq.get(e.key, 0) / (t1 - last.get(e.key, 0)) for e in entries]
