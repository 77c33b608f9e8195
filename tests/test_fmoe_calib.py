"""fMoE's admission chance for map candidates measured on the candidates
(``candidate_chance="measured"``, policies/fmoe_calib.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_fmoe_deadline import FakeView, J, L, _bound, _busy, _start


@pytest.mark.parametrize("kernel", [True, False])
def test_a_late_copy_follows_the_measured_rate_of_its_cells_candidates(monkeypatch, kernel):
    """A copy 1/20 done at its layer on a link demand loads half fill: at the table's
    prior chance (1/4) its unused rest outweighs its saving, so the table rule refuses it.
    Where the candidates of its cell were measured always used, the measured rule sends
    it; never used, it refuses it (the Python pass and the admission kernel alike)."""
    if not kernel:
        monkeypatch.setattr("policies.fmoe_deadline._KERNEL_MIN", 10**9)
    view = FakeView(copy_s=1e-2, layer_s=1e-3)
    sent = {}
    for name, used in (("table", None), ("always", 50.0), ("never", 0.0)):
        opt = "table" if used is None else "measured"
        pol, _ = _bound(view, prefetch_distance=2, candidate_chance=opt)
        _busy(pol, 1e-3, 5e-4)
        if used is not None:
            pol._cal_n[:] = 50.0
            pol._cal_h[:] = used
        _start(pol)
        sent[name] = [(o.layer, o.expert) for o in pol.decide_prefetch().enqueue]
    assert sent["table"] == [] and sent["never"] == []
    assert (0, 0) in sent["always"]


@settings(max_examples=25, deadline=None)
@given(
    iterations=st.lists(
        st.tuples(
            # noted candidates: (layer, expert, a lookahead pick), possibly repeated
            st.lists(
                st.tuples(st.integers(1, L - 1), st.integers(0, J - 1), st.booleans()),
                max_size=8,
            ),
            st.lists(st.integers(0, J - 1), min_size=L, max_size=L),  # each gate's choice
            st.integers(0, L),  # gates that run before the next iteration starts
        ),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**16),
)
def test_candidates_are_counted_once_per_iteration_at_their_layer(iterations, seed):
    """Each map candidate noted in an iteration counts once (its last note's cell) when
    its layer's gate runs in that iteration, as used when the gate chose it; lookahead
    picks and candidates whose gate did not run are not counted; the chance is the
    cell's measured rate with one pseudo-observation at the table's chance."""
    rng = np.random.default_rng(seed)
    pol, _ = _bound(FakeView(copy_s=1e-3, layer_s=1e-3), prefetch_distance=2)
    n_want = np.zeros_like(pol._cal_n)
    h_want = np.zeros_like(pol._cal_h)
    for it, (notes, choice, gates) in enumerate(iterations):
        pol._cur_it = it
        pol._calib_reset()  # as an iteration start does
        last: dict[tuple[int, int], tuple[int, int]] = {}
        for layer, j, look in notes:
            # a random cell: the expert's last choice, forecast row and request bin
            pol._ist[0, layer, j] = it - int(rng.integers(0, 40))
            pol._ist[1, layer, j] = int(rng.integers(0, pol._cal_n.shape[0]))
            pol._ist[3, layer, j] = int(rng.integers(0, pol._cal_n.shape[0]))
            pol._ist[2, layer, 0] = it if rng.random() < 0.5 else it - 1
            one = (np.array([layer]), np.array([j]), np.array([0.5 if look else -1.0]))
            pol._calib_note(*one)
            if not look:
                last[(layer, j)] = pol._calib_cell(layer, j)
        for layer in range(gates):
            pol._calib_gate(layer, [choice[layer]])
            for (lay, j), cell in last.items():
                if lay == layer:
                    n_want[cell] += 1.0
                    h_want[cell] += float(choice[layer] == j)
    np.testing.assert_array_equal(pol._cal_n, n_want)
    np.testing.assert_array_equal(pol._cal_h, h_want)
    assert np.all(pol._cal_h <= pol._cal_n)
    tab = pol._chance()
    q = (pol._cal_h + tab) / (pol._cal_n + 1.0)
    rate = np.divide(pol._cal_h, pol._cal_n, out=tab.copy(), where=pol._cal_n > 0)
    lo, hi = np.minimum(tab, rate), np.maximum(tab, rate)
    assert np.all(q >= lo - 1e-12) and np.all(q <= hi + 1e-12)
    for layer in range(1, L):
        for j in range(J):
            row, b = pol._calib_cell(layer, j)
            assert pol._calib_chance(layer, j) == q[row, b]
