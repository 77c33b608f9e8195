"""fMoE's eviction scores (FMOE_ALGORITHM.md step 5) and the ablation's alternatives,
as a mixin of :class:`policies.fmoe.FmoePolicy`."""

from __future__ import annotations

from policies.cache import CacheEntry

_TIE_EPS = 1e-9  # recency tie-break weight, far below any meaningful p * freq gap


class FmoeEviction:
    """Step 5 of fMoE: which cached expert goes first."""

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: ``fmoe`` p x uses while cached, ``lfu`` uses while cached,
        ``lfu-global`` uses over the run, ``lru`` last use (ties: least recent first)."""
        return self._scores([entry])[0]

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return self._scores(entries)

    def _tie(self, entry: CacheEntry) -> float:
        return _TIE_EPS * entry.last_used / (abs(self._now) + 1.0)

    def _scores_lru(self, entries: list[CacheEntry]) -> list[float]:
        return [float(e.last_used) for e in entries]

    def _scores_lfu(self, entries: list[CacheEntry]) -> list[float]:
        return [e.uses + self._tie(e) for e in entries]

    def _scores_lfu_global(self, entries: list[CacheEntry]) -> list[float]:
        freq = self._freq
        return [float(freq[e.key[0]][e.key[1]] if freq else e.uses) + self._tie(e) for e in entries]

    def _scores_fmoe(self, entries: list[CacheEntry]) -> list[float]:
        # one comprehension, no call per entry: this runs for every load once a cache is full
        pred, tie = self._pred, _TIE_EPS / (abs(self._now) + 1.0)
        if not pred:  # unbound: no forecast, p = 0
            return [tie * e.last_used for e in entries]
        return [pred[lay][j] * e.uses + tie * e.last_used for e in entries for lay, j in (e.key,)]
