"""policies/fmoe_calib_jit's kernels against the dict-of-dicts bookkeeping they replace
(policies/fmoe_calib.py before issue 21's speed work), written out here as the reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_calib_jit as K

L, J, ROWS, BUCKETS = 4, 6, 30, 16


def _ref_cell(ist: np.ndarray, it: int, layer: int, j: int) -> tuple[int, int]:
    age = it - int(ist[0, layer, j])
    row = int(ist[1, layer, j]) if ist[2, layer, 0] == it else int(ist[3, layer, j])
    return row, 0 if age <= 1 else min((age - 1).bit_length(), BUCKETS - 1)


@settings(max_examples=30, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            # a pass's candidates: (layer, expert, lookahead pick)
            st.tuples(
                st.just("note"),
                st.lists(
                    st.tuples(st.integers(0, L - 1), st.integers(0, J - 1), st.booleans()),
                    max_size=10,
                ),
            ),
            # a gate: its layer and chosen ids (repeats and ids outside 0..J-1 included)
            st.tuples(
                st.just("gate"),
                st.tuples(st.integers(0, L - 1), st.lists(st.integers(-1, J), max_size=4)),
            ),
            st.tuples(st.just("state"), st.integers(0, 2**16)),  # new cells for the notes
        ),
        max_size=25,
    ),
    it=st.integers(0, 10**6),
)
def test_note_and_gate_count_as_the_dict_bookkeeping(steps, it):
    """Every judged map candidate counts once, in the cell of its last note before its
    layer's gate, as used where the gate chose it; the kernels' counts and pending cells
    equal the dict reference's after every step (ages up to "never chosen" included)."""
    ist = np.zeros((4, L, J), np.int64)
    pend = np.full((L, J), -1, np.int64)
    noted = np.zeros(L, np.bool_)
    h, n = np.zeros((ROWS, BUCKETS)), np.zeros((ROWS, BUCKETS))
    ref: dict[int, dict[int, tuple[int, int]]] = {}
    h_ref, n_ref = np.zeros_like(h), np.zeros_like(n)
    for kind, arg in steps:
        if kind == "state":
            rng = np.random.default_rng(arg)
            ist[0] = it - rng.choice([0, 1, 2, 3, 5, 9, 100, 2**20, 2**40], size=(L, J))
            ist[1] = rng.integers(0, ROWS, size=(L, J))
            ist[3] = rng.integers(0, ROWS, size=(L, J))
            ist[2, :, 0] = np.where(rng.random(L) < 0.5, it, it - 1)
        elif kind == "note":
            lay = np.array([c[0] for c in arg], np.int64)
            jj = np.array([c[1] for c in arg], np.int64)
            look = np.array([0.5 if c[2] else -1.0 for c in arg])
            K.calib_note(lay, jj, look, len(arg), ist, it, pend, noted)
            for layer, j, lk in arg:
                if not lk:
                    ref.setdefault(layer, {})[j] = _ref_cell(ist, it, layer, j)
        else:
            layer, ids = arg
            if noted[layer]:
                K.calib_gate(layer, np.array(ids, np.int64), pend, noted, h, n)
            chosen = set(ids)
            for j, cell in ref.pop(layer, {}).items():
                n_ref[cell] += 1.0
                h_ref[cell] += float(j in chosen)
        np.testing.assert_array_equal(h, h_ref)
        np.testing.assert_array_equal(n, n_ref)
        want = np.full((L, J), -1, np.int64)
        for layer, cells in ref.items():
            for j, (row, b) in cells.items():
                want[layer, j] = row * BUCKETS + b
        np.testing.assert_array_equal(pend, want)
        assert noted.tolist() == [bool(ref.get(layer)) for layer in range(L)]
