"""ExpertCache's victim choice with a general (not by_recency) scorer, on caches of many
slots with many tied scores, against the rule written out: the lexicographic minimum of
(protected, score, key) over resident, unpinned entries."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cache import CacheEntry, ExpertCache, ExpertState

_STATES = [ExpertState.RESIDENT, ExpertState.LOADING]


@st.composite
def caches(draw: st.DrawFn) -> tuple[ExpertCache, dict[tuple[int, int], float]]:
    n = draw(st.integers(1, 60))
    keys = draw(
        st.lists(
            st.tuples(st.integers(0, 7), st.integers(0, 31)), min_size=n, max_size=n, unique=True
        )
    )
    entries, score = {}, {}
    for k in keys:
        t = float(draw(st.integers(0, 5)))
        entries[k] = CacheEntry(
            k,
            draw(st.sampled_from(_STATES)),
            t,
            t,
            pins=draw(st.sampled_from([0, 0, 0, 1])),
            protected=draw(st.booleans()),
        )
        score[k] = float(draw(st.integers(-2, 2)))  # few values: many ties
    return ExpertCache(capacity=n, expert_bytes=1, entries=entries), score


@settings(max_examples=40, deadline=None)
@given(caches())
def test_victim_is_the_lexicographic_minimum(case: tuple[ExpertCache, dict]) -> None:
    cache, score = case

    def scores(entries: list[CacheEntry]) -> list[float]:
        return [score[e.key] for e in entries]

    cands = [
        (e.protected, score[k], k)
        for k, e in cache.entries.items()
        if e.state is ExpertState.RESIDENT and not e.pins
    ]
    assert cache.choose_victim(scores) == (min(cands)[2] if cands else None)
