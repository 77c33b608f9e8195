"""The layer-finish measurements of saving="finish" (policies/fmoe_finish.py): what one
demand load avoided or added is worth to a layer step that waits for its slowest device."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fmoe_finish import finish_added, finish_savings, finish_waits

ENDS = st.lists(st.floats(0.0, 5e-3), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None)
@given(ends=ENDS, copy=st.floats(1e-4, 2e-3))
def test_only_the_last_device_saves_and_never_more_than_a_copy(ends, copy):
    whole = [True] * len(ends)
    sav = finish_savings(ends, whole, copy)
    top = max(ends)
    for d, s in enumerate(sav):
        assert 0.0 <= s <= copy
        others = max((x for k, x in enumerate(ends) if k != d), default=0.0)
        if ends[d] < top or ends[d] <= others:  # another device finishes as late: no saving
            assert s == 0.0
        else:
            assert math.isclose(s, min(copy, ends[d] - others))
    assert finish_savings(ends, [False] * len(ends), copy) == [-1.0] * len(ends)


@settings(max_examples=25, deadline=None)
@given(ends=ENDS, copy=st.floats(1e-4, 2e-3))
def test_a_load_added_costs_what_it_pushes_past_the_others(ends, copy):
    add = finish_added(ends, [True] * len(ends), copy)
    for d, a in enumerate(add):
        others = max((x for k, x in enumerate(ends) if k != d), default=0.0)
        assert 0.0 <= a <= copy + 1e-15
        assert math.isclose(a, max(ends[d] + copy, others) - max(ends[d], others), abs_tol=1e-15)
    if len(ends) == 1:  # one link: a load added costs its whole copy
        assert math.isclose(add[0], copy)


def test_a_wait_counts_for_the_layer_only_past_the_other_devices():
    copy = 1e-3
    # device 0 waited 0.5 ms behind a copy and finished at 1.5 ms; device 1 at 1.2 ms:
    # the step waited 0.3 ms of the 0.5
    (w0, l0), (w1, l1) = finish_waits([1.5e-3, 1.2e-3], [1.5e-3, 1.2e-3], [True, False], copy)
    assert math.isclose(w0, 0.5e-3) and math.isclose(l0, 0.3e-3)
    assert (w1, l1) == (-1.0, 0.0)
