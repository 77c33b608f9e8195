"""The candidate arrays a scorer's compiled victim choice reads (policies.cache_victims):
kept in step with the cache's candidates through every state change, and the victim
named through them is the one the scores name."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import policies.cache as cache_mod
from policies.cache import CacheEntry, CacheError, ExpertCache
from policies.cache_victims import CandidateArrays, victim_index_of, with_victim_index


class _Scorer:
    """A pure score per key (few values: many ties) plus recency, as fMoE's has, with
    the marked scorer's companion answering from the arrays."""

    def __init__(self, weight: dict[tuple[int, int], float], answer: bool = True) -> None:
        self.weight, self.answer, self.calls = weight, answer, 0

    def _score(self, key: tuple[int, int], last_used: float) -> float:
        return self.weight.get(key, 0.0) + 1e-3 * last_used

    @with_victim_index
    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return [self._score(e.key, e.last_used) for e in entries]

    def victim_index(self, arr: CandidateArrays) -> int:
        self.calls += 1
        if not self.answer:
            return -1
        n = arr.n
        sc = [
            (self._score((int(a), int(b)), float(c)), int(a), int(b))
            for a, b, c in zip(arr.layers[:n], arr.experts[:n], arr.last_used[:n], strict=True)
        ]
        return sc.index(min(sc))


class _Plain(_Scorer):
    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:  # unmarked
        return [self._score(e.key, e.last_used) for e in entries]


def _mirror_matches(cache: ExpertCache) -> None:
    arr = cache._arr
    if arr is None:
        return
    assert arr.src is cache._cands
    assert set(arr.slot) == set(cache._cands)
    for key, i in arr.slot.items():
        e = cache._cands[key]
        assert arr.entries[i] is e
        assert (arr.layers[i], arr.experts[i], arr.last_used[i]) == (key[0], key[1], e.last_used)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["demand", "prefetch", "finish", "use", "unpin", "cancel", "unprotect"]),
        st.integers(0, 3),
        st.integers(0, 9),
    ),
    max_size=120,
)


# the patch is the same for every example: no state carried between them
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, seed=st.integers(0, 10**6))
def test_arrays_follow_the_candidates_and_name_the_scores_victim(
    ops: list[tuple[str, int, int]], seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_mod, "VICTIM_INDEX_MIN", 0)  # the arrays on every choice
    rng = np.random.default_rng(seed)
    weight = {(a, b): float(rng.integers(0, 3)) for a in range(4) for b in range(10)}
    fast, plain = _Scorer(weight), _Plain(weight)
    caches = [ExpertCache(6, 1), ExpertCache(6, 1)]
    t = 0.0
    for op, lay, j in ops:
        key = (lay, j)
        t += 1.0
        got = []
        for cache, sc in zip(caches, (fast.eviction_scores, plain.eviction_scores), strict=True):
            try:
                if op in ("demand", "prefetch"):
                    if key in cache.entries:
                        got.append(None)
                        continue
                    got.append(cache.begin_load(key, t, prefetch=op == "prefetch", scores=sc))
                elif op == "finish":
                    cache.finish_load(key, t)
                    got.append(None)
                elif op == "use":
                    cache.demand_and_pin(key)
                    cache.use(key, t, unpin=True)
                    got.append(None)
                elif op == "unpin":
                    cache.pin(key)
                    cache.unpin(key)
                    got.append(None)
                elif op == "cancel":
                    cache.cancel_load(key)
                    got.append(None)
                else:
                    cache.unprotect_layer(lay)
                    got.append(None)
            except CacheError as err:
                got.append(type(err).__name__)
        assert got[0] == got[1]  # the same victims (and the same refusals)
        assert caches[0].entries.keys() == caches[1].entries.keys()
        _mirror_matches(caches[0])
    if any(op in ("demand", "prefetch") for op, _, _ in ops) and caches[0]._arr is not None:
        assert fast.calls > 0


def test_a_negative_answer_falls_back_to_the_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "VICTIM_INDEX_MIN", 0)
    sc = _Scorer({(0, 1): -5.0}, answer=False)
    cache = ExpertCache(2, 1)
    cache.preload([(0, 0), (0, 1)])
    assert cache.begin_load((0, 2), 1.0, prefetch=False, scores=sc.eviction_scores) == [(0, 1)]
    assert sc.calls == 1


def test_a_replaced_candidate_dict_gets_new_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """An executor that rebuilds the cache's state wholesale (the compiled engine) is
    seen by the arrays: they are rebuilt from the new dict, not read stale."""
    monkeypatch.setattr(cache_mod, "VICTIM_INDEX_MIN", 0)
    sc = _Scorer({(0, 0): 1.0, (0, 1): 0.0, (0, 2): 2.0})
    cache = ExpertCache(3, 1)
    cache.preload([(0, 0), (0, 1), (0, 2)])
    cache.begin_load((1, 0), 1.0, prefetch=False, scores=sc.eviction_scores)  # evicts (0, 1)
    # (0, 0) is no candidate any more (as if protected by the rebuilding executor): a stale
    # copy of the arrays would name it (score 1 < 2)
    cache._cands = {
        k: e
        for k, e in cache.entries.items()
        if k != (0, 0) and e.state is cache_mod.ExpertState.RESIDENT and not e.pins
    }
    assert cache.begin_load((1, 1), 2.0, prefetch=False, scores=sc.eviction_scores) == [(0, 2)]
    _mirror_matches(cache)


def test_unmarked_scorers_and_functions_have_no_companion() -> None:
    assert victim_index_of(_Plain({}).eviction_scores) is None
    assert victim_index_of(lambda entries: [0.0 for _ in entries]) is None
    assert victim_index_of(_Scorer({}).eviction_scores) is not None


def test_arrays_grow_past_their_first_size() -> None:
    arr = CandidateArrays({})
    entries = [CacheEntry((i, i), cache_mod.ExpertState.RESIDENT, 0.0, float(i)) for i in range(40)]
    for e in entries:
        arr.put(e.key, e)
    for e in entries[::2]:
        arr.drop(e.key)
    assert arr.n == 20
    assert sorted(arr.last_used[: arr.n].tolist()) == [float(i) for i in range(1, 40, 2)]
