"""fMoE's victim priced over an unused copy's measured residence (``victim="residence"``,
policies/fmoe_residence.py) and a map pick valued at what the lookahead would not save
anyway (``map_value="marginal"``)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cache import CacheEntry, ExpertState
from policies.fmoe_residence import FmoeResidence
from tests.test_fmoe_deadline import FakeView, _bound
from tests.test_fmoe_victim import _fill

L = 4


class _Host(FmoeResidence):
    """What FmoeResidence reads from the policy: the iteration, the gate, the caches'
    entries dicts per [layer][expert], this gate's lookahead chances."""

    def __init__(self, experts: int) -> None:
        self._cur_it, self._g = 0, -1
        self.ents: dict = {}
        self._ents_of = [[self.ents] * experts for _ in range(L)]
        self._look_q: dict = {}
        self._setup_residence(True, L)

    def gate(self, it: int, layer: int, ids: list[int]) -> None:
        self._cur_it, self._g = it, layer
        self._residence_gate(layer, ids)


def _prefetched(key):  # noqa: ANN001, ANN202
    return CacheEntry(key, ExpertState.RESIDENT, 0.0, 0.0, by_prefetch=True)


@settings(max_examples=30, deadline=None)
@given(
    stays=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 20), st.booleans()), min_size=1, max_size=6
    ),
    now_it=st.integers(13, 16),
)
def test_the_residence_is_exposure_over_departures(stays, now_it):
    """Copies admitted for layer l, unused at its gate in iteration 0, leave after a
    number of iterations (evicted, or used at a later visit) or stay: the estimate is
    (completed stays + ages of those still resident) / copies that left, in layer steps
    from their layer's gate (the maximum-likelihood mean of memoryless stays)."""
    h = _Host(experts=len(stays))
    for j, (layer, _, _) in enumerate(stays):
        key = (layer, j)
        h.ents[key] = _prefetched(key)
        h._residence_admitted({key: 0.5})
    for layer in range(L):
        h.gate(0, layer, [])  # nothing chosen: every admitted copy is unused
    done = age = left = used = 0
    for it in range(1, now_it + 1):
        for layer in range(L):
            for j, (lay, after, by_use) in enumerate(stays):
                if lay == layer and it == after:  # leaves at this visit of its layer
                    if by_use:
                        h.ents[(lay, j)].uses += 1
                    else:
                        del h.ents[(lay, j)]
            h.gate(it, layer, [])
    now_step = now_it * L + L - 1  # the estimate's clock: the last gate run
    for lay, after, by_use in stays:
        start = lay  # its layer's gate in iteration 0
        if after <= now_it:  # it left before the gate of its layer's visit `after`
            done += after * L + lay - start
            left += 1
            used += by_use
        else:  # still resident: it has stayed at least its age
            age += now_step - start
    assert h._res_left == [left, 0] and h._res_used_later == [used, 0]
    assert h._residence_steps(0) == ((done + age) / left if left else 0.0)
    assert h._residence_steps(1) == 0.0
    # the admission's read of both (one call) gives the same two values, to the bit
    h._res_left[1], h._res_n[1], h._res_sum_t0[1], h._res_exposure[1] = left + 1, 2, 3, done
    both = h._residence_both()
    assert both == (h._residence_steps(0), h._residence_steps(1))
    assert both[1] > 0.0


def test_a_copy_chosen_at_its_layer_is_not_followed_and_none_left_means_no_measurement():
    h = _Host(experts=2)
    for j in range(2):
        h.ents[(1, j)] = _prefetched((1, j))
    h._look_q = {(1, 1): 0.7}  # (1, 1) is a lookahead pick
    h._residence_admitted({(1, 0): 0.2, (1, 1): 0.7})
    h.gate(0, 1, [0])  # (1, 0) used at its layer: not an unused copy
    assert list(h._res_track) == [(1, 1)] and h._res_track[(1, 1)][2] == 1
    assert h._residence_steps(1) == 0.0  # none has left yet: W alone (the priced rule)
    h.gate(1, 0, [])
    assert h._residence_steps(1) == 0.0


def test_the_victim_of_an_unused_copy_is_priced_over_its_stay():
    """The price is (q P(use within W) + (1 - q) P(use within W + R)) x copy with R a
    memoryless stay of the measured mean: at q = 1 the priced rule's, below it more the
    longer the stay, never above one copy."""
    pol, cache = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), capacity=2)
    _fill(cache, [(4, 0), (4, 1)])
    pol._victims_reset()
    base = pol._victim_price(0, 0.0, 1e-3, 2, 1e-3)
    pol._res_left[0], pol._res_exposure[0] = 1, 40  # one copy left after 40 steps
    pol._victims_reset()
    assert pol._victim_price(0, 0.0, 1e-3, 2, 1e-3, q=1.0) == base
    half = pol._victim_price(0, 0.0, 1e-3, 2, 1e-3, q=0.5)
    none = pol._victim_price(0, 0.0, 1e-3, 2, 1e-3, q=0.0)
    assert base < half < none <= 1e-3
    e = pol.expected_next_use(*pol._vq[0][-1][1].key)
    w = 2.0  # the copy lands in a step, its layer is two away
    assert math.isclose(none, (1.0 - math.exp(-w / e) * e / (e + 40.0)) * 1e-3, rel_tol=1e-12)


def test_a_map_pick_the_lookahead_would_save_anyway_is_worth_only_the_rest():
    """The recall that discounts a map pick: of the chosen experts the map's top-K named,
    the share the lookahead also ordered (cells on); and a map pick the lookahead passed
    over at this gate gets the measured precision of such picks, not the map's cell."""
    pol, _ = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), lookahead="auto")
    layer = 2
    pol._map_h[layer] = 10.0
    pol._la_cat_h[1, layer] = 6.0  # rank 0's hits where the map agreed
    pol._la_on[layer] = [True] + [False] * (len(pol._la_on[layer]) - 1)
    assert pol._look_recall(layer) == 0.6
    pol._la_on[layer] = [False] * len(pol._la_on[layer])
    assert pol._look_recall(layer) == 0.0
    pol._mcat_h[0, layer], pol._mcat_n[0, layer] = 1.0, 19.0
    pol._look_named = (pol._cur_it, layer, frozenset({0}))
    assert pol._map_only(layer, 0) is None  # the lookahead ordered it
    assert pol._map_only(layer, 1) == (1.0, 19.0)
    q = pol._candidate_chance(layer, 1)
    assert pol._iteration_chance(layer, 1) == (1.0 + q) / 20.0
    whole, _ = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), lookahead="auto", map_value="whole")
    whole._mcat_h[0, layer], whole._mcat_n[0, layer] = 1.0, 19.0
    whole._look_named = (whole._cur_it, layer, frozenset({0}))
    assert whole._iteration_chance(layer, 1) == whole._candidate_chance(layer, 1)
    assert np.isfinite(q)
