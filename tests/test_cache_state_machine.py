"""ExpertCache against a plain reference model (hypothesis RuleBasedStateMachine).

The model keeps one record per cached key and its own counters; every rule applies the
same step to both and checks the cache's answer (hit, victims, errors). Invariants:
capacity never exceeded; a pinned key never evicted; compute may only use a resident
key; hits + misses = demands; bytes loaded = loads x expert bytes; counters never
negative and never decreasing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from policies.cache import (
    CacheCounters,
    CacheEntry,
    CacheError,
    CacheFullError,
    ExpertCache,
    ExpertState,
    lru_score,
    lru_scores,
)

KEYS = [(layer, e) for layer in range(3) for e in range(4)]

SCORES = {
    "lru": lru_score,
    "uses": lambda e: e.uses * 1e6 + e.last_used,
    "fixed": lambda e: float((e.key[0] * 7 + e.key[1] * 3) % 5),
}


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        capacity=st.integers(1, 5),
        expert_bytes=st.integers(1, 1000),
        score=st.sampled_from(sorted(SCORES)),
    )
    def setup(self, capacity: int, expert_bytes: int, score: str) -> None:
        self.cache = ExpertCache(capacity, expert_bytes)
        self.capacity, self.eb = capacity, expert_bytes
        self.score = SCORES[score]
        # lru: the cache's own by_recency scorer (answered from its recency order)
        self.scores = (
            lru_scores if score == "lru" else lambda entries: [self.score(e) for e in entries]
        )
        self.model: dict[tuple[int, int], CacheEntry] = {}
        self.n = CacheCounters()
        self.prev = CacheCounters()
        self.t = 0.0
        self.dt = 1.0

    def tick(self) -> float:
        self.t += self.dt
        return self.t

    @rule(dt=st.sampled_from([1.0, 0.0, -1.0]))
    def clock_step(self, dt: float) -> None:
        """Later calls tick by ``dt``: equal times tie on last_used, earlier ones go back."""
        self.dt = dt

    # -- model helpers ----------------------------------------------------------------
    def model_victim(self) -> tuple[int, int] | None:
        cands = [
            (1 if e.protected else 0, self.score(e), k)
            for k, e in self.model.items()
            if e.state is ExpertState.RESIDENT and e.pins == 0
        ]
        return min(cands)[2] if cands else None

    def model_evict(self, key: tuple[int, int]) -> None:
        e = self.model.pop(key)
        assert e.pins == 0, "model evicted a pinned key"
        self.n.evictions += 1
        if e.by_prefetch and not e.prefetch_used:
            self.n.prefetches_wasted += 1

    # -- rules ------------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS), prefetch=st.booleans(), pin=st.booleans())
    def begin_load(self, key: tuple[int, int], prefetch: bool, pin: bool) -> None:
        now = self.tick()
        if key in self.model:
            with pytest.raises(CacheError):
                self.cache.begin_load(key, now, prefetch=prefetch, scores=self.scores, pin=pin)
            return
        expected: list[tuple[int, int]] = []
        if len(self.model) >= self.capacity:
            victim = self.model_victim()
            if victim is None:
                with pytest.raises(CacheFullError):
                    self.cache.begin_load(key, now, prefetch=prefetch, scores=self.scores, pin=pin)
                return
            expected.append(victim)
        for v in expected:
            assert self.model[v].pins == 0
        evicted = self.cache.begin_load(key, now, prefetch=prefetch, scores=self.scores, pin=pin)
        assert evicted == expected
        for v in expected:
            self.model_evict(v)
        if prefetch:
            self.n.evictions_by_prefetch += len(expected)
        self.model[key] = CacheEntry(
            key,
            ExpertState.LOADING,
            loaded_at=now,
            last_used=now,
            by_prefetch=prefetch,
            protected=prefetch,
            pins=1 if pin else 0,
        )
        self.n.loads += 1
        self.n.bytes_loaded += self.eb
        if prefetch:
            self.n.prefetches_issued += 1
        else:
            self.n.demand_loads += 1

    @rule(data=st.data())
    def finish_load(self, data: st.DataObject) -> None:
        loading = sorted(k for k, e in self.model.items() if e.state is ExpertState.LOADING)
        key = data.draw(st.sampled_from(loading or KEYS))
        now = self.tick()
        if key not in loading:
            with pytest.raises(CacheError):
                self.cache.finish_load(key, now)
            return
        self.cache.finish_load(key, now)
        self.model[key].state = ExpertState.RESIDENT
        self.model[key].loaded_at = now

    @rule(data=st.data())
    def cancel_load(self, data: st.DataObject) -> None:
        loading = sorted(k for k, e in self.model.items() if e.state is ExpertState.LOADING)
        key = data.draw(st.sampled_from(loading or KEYS))
        e = self.model.get(key)
        if e is None or e.state is not ExpertState.LOADING or e.pins:
            with pytest.raises(CacheError):
                self.cache.cancel_load(key)
            return
        self.cache.cancel_load(key)
        del self.model[key]
        if e.by_prefetch:
            self.n.prefetches_cancelled += 1

    @rule(key=st.sampled_from(KEYS))
    def demand(self, key: tuple[int, int]) -> None:
        e = self.model.get(key)
        expect_hit = e is not None and e.state is ExpertState.RESIDENT
        assert self.cache.demand(key) == expect_hit
        self.n.demands += 1
        if expect_hit:
            self.n.hits += 1
        else:
            self.n.misses += 1
        if e is not None and e.by_prefetch and not e.prefetch_used:
            e.prefetch_used = True
            self.n.prefetches_used += 1
            if expect_hit:
                self.n.prefetches_timely += 1
            else:
                self.n.prefetches_late += 1

    @rule(key=st.sampled_from(KEYS))
    def demand_and_pin(self, key: tuple[int, int]) -> None:
        """demand, then pin when cached; the answer is the state at demand."""
        e = self.model.get(key)
        expect = ExpertState.ABSENT if e is None else e.state
        assert self.cache.demand_and_pin(key) is expect
        self.n.demands += 1
        if expect is ExpertState.RESIDENT:
            self.n.hits += 1
        else:
            self.n.misses += 1
        if e is not None:
            if e.by_prefetch and not e.prefetch_used:
                e.prefetch_used = True
                self.n.prefetches_used += 1
                if expect is ExpertState.RESIDENT:
                    self.n.prefetches_timely += 1
                else:
                    self.n.prefetches_late += 1
            e.pins += 1

    @rule(key=st.sampled_from(KEYS))
    def pin(self, key: tuple[int, int]) -> None:
        if key not in self.model:
            with pytest.raises(CacheError):
                self.cache.pin(key)
            return
        self.cache.pin(key)
        self.model[key].pins += 1

    @rule(key=st.sampled_from(KEYS))
    def unpin(self, key: tuple[int, int]) -> None:
        e = self.model.get(key)
        if e is None or e.pins == 0:
            with pytest.raises(CacheError):
                self.cache.unpin(key)
            return
        self.cache.unpin(key)
        e.pins -= 1

    @rule(key=st.sampled_from(KEYS), unpin=st.booleans())
    def use(self, key: tuple[int, int], unpin: bool) -> None:
        """Compute may only use a resident key (and, with unpin, a pinned one): anything
        else is refused and changes nothing."""
        now = self.tick()
        e = self.model.get(key)
        if e is None or e.state is not ExpertState.RESIDENT or (unpin and e.pins == 0):
            with pytest.raises(CacheError):
                self.cache.use(key, now, unpin=unpin)
            return
        self.cache.use(key, now, unpin=unpin)
        e.uses += 1
        e.last_used = now
        e.protected = False
        e.pins -= unpin

    @rule(key=st.sampled_from(KEYS))
    def evict(self, key: tuple[int, int]) -> None:
        e = self.model.get(key)
        if e is None or e.state is not ExpertState.RESIDENT or e.pins:
            with pytest.raises(CacheError):
                self.cache.evict(key)
            return
        self.cache.evict(key)
        self.model_evict(key)

    @rule(layer=st.integers(0, 2))
    def unprotect_layer(self, layer: int) -> None:
        self.cache.unprotect_layer(layer)
        for k, e in self.model.items():
            if k[0] == layer:
                e.protected = False

    @precondition(lambda self: any(e.state is ExpertState.RESIDENT for e in self.model.values()))
    @rule()
    def choose_victim_matches(self) -> None:
        assert self.cache.choose_victim(self.scores) == self.model_victim()

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def candidates_kept(self) -> None:
        """The cache's unprotected candidates are exactly its resident, unpinned,
        unprotected entries (it picks a general scorer's victim among them)."""
        want = {
            k
            for k, e in self.model.items()
            if e.state is ExpertState.RESIDENT and e.pins == 0 and not e.protected
        }
        assert set(self.cache._cands) == want
        assert all(self.cache._cands[k] is self.cache.entries[k] for k in want)

    @invariant()
    def within_capacity(self) -> None:
        assert self.cache.used <= self.capacity
        assert self.cache.free == self.capacity - self.cache.used

    @invariant()
    def matches_model(self) -> None:
        assert set(self.cache.entries) == set(self.model)
        for k, e in self.model.items():
            got = self.cache.entries[k]
            assert (got.state, got.pins, got.protected, got.uses, got.last_used) == (
                e.state,
                e.pins,
                e.protected,
                e.uses,
                e.last_used,
            )
            assert (got.by_prefetch, got.prefetch_used) == (e.by_prefetch, e.prefetch_used)

    @invariant()
    def counters_consistent(self) -> None:
        c = self.cache.counters
        assert c == self.n
        assert c.hits + c.misses == c.demands
        assert c.bytes_loaded == c.loads * self.eb
        assert c.loads == c.demand_loads + c.prefetches_issued
        assert c.prefetches_used == c.prefetches_timely + c.prefetches_late
        assert c.evictions_by_prefetch <= c.evictions
        now = c.as_dict()
        for name, value in now.items():
            assert value >= 0, name
            assert value >= getattr(self.prev, name), f"{name} decreased"
        self.prev = replace(c)


TestExpertCacheStateMachine = CacheMachine.TestCase
TestExpertCacheStateMachine.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None
)


def _general(scores):  # noqa: ANN001, ANN202
    """The same scorer without the by_recency mark: the cache scores every entry."""
    return lambda entries: scores(entries)


@pytest.mark.parametrize("back_in_time", [False, True])
def test_by_recency_matches_scoring(back_in_time: bool) -> None:
    """A by_recency scorer picks what scoring every entry picks: ties on last_used go to
    the lowest key, pinned and protected keys wait, and after a use back in time (the
    recency order no longer ascends) the cache scores entries again."""
    cache = ExpertCache(5, 1)
    cache.preload([(0, 3), (0, 1), (0, 2)], now=1.0)  # equal last_used, keys out of order
    cache.begin_load((1, 0), 1.0, prefetch=True)  # protected
    cache.finish_load((1, 0), 1.0)
    cache.preload([(1, 1)], now=2.0)
    if back_in_time:
        cache.use((1, 1), 0.5)
    expected = []
    for _ in range(5):
        victim = cache.choose_victim(lru_scores)
        assert victim == cache.choose_victim(_general(lru_scores))
        expected.append(victim)
        if victim is not None:
            cache.pin(victim)
    if back_in_time:
        assert expected == [(1, 1), (0, 1), (0, 2), (0, 3), (1, 0)]
    else:
        assert expected == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 0)]
    assert cache.choose_victim(lru_scores) is None
