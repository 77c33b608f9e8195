"""policies.fmoe_cands (issue 21, speed only) against the dict code it replaces: a hook's
candidates (layer, expert) -> p kept at the larger p at their first position, and
_admit's merge of the live pending candidates with them, in the dict's order, with
their lookahead chances."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.fmoe_cands import CandidateSet

L, J = 5, 7
_P = st.one_of(
    st.floats(-3.0, 3.0, allow_nan=False),
    st.sampled_from([-1.0, 0.0, math.nan, math.inf, 0.5]),
)
_KEY = st.tuples(st.integers(0, L - 1), st.integers(0, J - 1))
# a put of one key, or puts of one layer's distinct experts (as fmoe_jit.fresh_put makes)
_OP = st.one_of(
    st.tuples(st.just("one"), _KEY, _P),
    st.tuples(
        st.just("many"),
        st.integers(0, L - 1),
        st.lists(st.tuples(st.integers(0, J - 1), _P), max_size=J, unique_by=lambda t: t[0]),
    ),
)


def _dict_put(d: dict, key: tuple[int, int], p: float) -> None:
    # the replaced code: FmoeDeadline._candidate and _order's loop
    if p > d.get(key, -1.0):
        d[key] = p


def _fill(ops: list, cs: CandidateSet | None = None) -> tuple[dict, CandidateSet]:
    d: dict = {}
    cs = CandidateSet(L, J) if cs is None else cs
    for op in ops:
        if op[0] == "one":
            _, key, p = op
            _dict_put(d, key, p)
            cs.put(key[0], key[1], p)
        else:
            _, layer, items = op
            for j, p in items:
                _dict_put(d, (layer, j), p)
                cs.put(layer, j, p)
    return d, cs


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        ka == kb and (va == vb or (va != va and vb != vb))
        for (ka, va), (kb, vb) in zip(a, b, strict=True)
    )


@settings(max_examples=25, deadline=None)
@given(st.lists(_OP, max_size=12), st.lists(_OP, max_size=6))
def test_candidate_set_is_the_dict(ops: list, again: list) -> None:
    d, cs = _fill(ops)
    assert len(cs) == len(d)
    flat, p = cs.take()
    got = [((f // J, f % J), v) for f, v in zip(flat.tolist(), p.tolist(), strict=True)]
    assert _same(got, list(d.items()))
    # emptied: a second fill of the same set starts from nothing, as the dict's `= {}`
    assert len(cs) == 0 and (cs.p == -1.0).all()
    d2, _ = _fill(again, cs)
    f2, p2 = cs.take()
    got2 = [((f // J, f % J), v) for f, v in zip(f2.tolist(), p2.tolist(), strict=True)]
    assert _same(got2, list(d2.items()))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(_OP, max_size=10),
    st.dictionaries(_KEY, st.floats(0.0, 2.0), max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.integers(-1, L - 1),
    st.dictionaries(_KEY, st.floats(0.0, 1.0), max_size=4),
)
def test_take_merged_is_the_dict_merge(
    ops: list, old: dict, started: list, g: int, look_q: dict
) -> None:
    d, cs = _fill(ops)
    # the pending ones not started whose layer is ahead (what _admit's comprehensions keep)
    live = [kp for kp, s in zip(old.items(), started, strict=False) if not s and kp[0][0] > g]
    # the replaced code: _admit's merge into a dict
    cands = dict(live)
    for key, p in d.items():
        if key[0] > g and p > cands.get(key, -1.0):
            cands[key] = p
    lay, jj, pv, was, look = cs.take_merged(live, old, g, look_q)
    got = list(zip(zip(lay.tolist(), jj.tolist(), strict=True), pv.tolist(), strict=True))
    assert _same(got, list(cands.items()))
    assert was.tolist() == [k in old for k in cands]
    assert look is not None and look.tolist() == [look_q.get(k, -1.0) for k in cands]
    assert lay.dtype == jj.dtype == np.int64 and pv.dtype == np.float64
    assert len(cs) == 0 and (cs.p == -1.0).all() and (cs._pos == -1).all()  # emptied
