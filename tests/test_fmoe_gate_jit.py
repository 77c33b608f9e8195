"""policies.fmoe_admit_jit.admit_gate (the one-row admission's lookahead terms and admit_rows in one
call) against the Python glue it replaces in FmoeAdmitKernel._admit_kernel, on random
states: the lookahead's recall per layer (FmoeLookahead._look_recall), each candidate's
saving the lookahead makes anyway (sv), the map-only picks' (hits, picks)
(FmoeLookahead._map_only) and admit_rows' decisions, bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import fmoe_admit_jit as K
from policies.base import GateOutput, IterationStart
from policies.fmoe_lookahead import FmoeLookahead
from tests.strategies import small_spec
from tests.test_fmoe_lookahead_fit import _bound, _routing, _workload


def _python_terms(s: SimpleNamespace, lay, jj, g, dev_of, copy, avail, marginal):  # noqa: ANN001, ANN202
    """The glue as _admit_kernel wrote it before the kernel: numpy and the mixins' methods."""
    n = lay.shape[0]
    sv = np.zeros(n)
    if marginal:
        cand_dev = dev_of[lay, jj]
        far = np.flatnonzero(lay >= g + 2)
        if far.size:
            far_lay = lay[far]
            for layer in np.unique(far_lay).tolist():
                r = FmoeLookahead._look_recall(s, layer)
                if r:
                    at = far[far_lay == layer]
                    c, av = copy[cand_dev[at]], avail[cand_dev[at]]
                    sv[at] = r * np.where(c < av, c, av)
    ch0 = np.zeros(n)
    cn0 = np.full(n, -1.0)
    named = s._look_named
    if marginal and named is not None and named[0] == s._cur_it:
        for i in np.flatnonzero(lay == named[1]).tolist():
            if int(jj[i]) not in named[2]:
                ch0[i], cn0[i] = FmoeLookahead._map_only(s, named[1], int(jj[i]))
    return sv, ch0, cn0


@st.composite
def states(draw):  # noqa: ANN001, ANN201
    L = draw(st.integers(3, 7))
    J = draw(st.integers(2, 6))
    k = draw(st.integers(1, min(3, J)))
    nd = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    g = draw(st.integers(-1, L - 2))
    flat = rng.permutation(np.arange((g + 1) * J, L * J))[: draw(st.integers(1, 12))]
    lay, jj = flat // J, flat % J
    n = len(flat)
    mode = draw(st.sampled_from([False, True, "auto"]))
    on = rng.random((L, k)) < 0.5
    # counts as the measurement keeps them: whole numbers, some layers never named
    map_h = rng.integers(0, 4, L).astype(np.float64)
    cat_h = rng.integers(0, 5, (2, L, k)).astype(np.float64)
    mcat_h = rng.integers(0, 5, (2, L)).astype(np.float64)
    mcat_n = mcat_h + rng.integers(0, 5, (2, L))
    cur_it = 7
    named = None
    if draw(st.booleans()):
        nl = int(draw(st.integers(0, L - 1)))
        ids = frozenset(rng.choice(J, size=int(rng.integers(0, J + 1)), replace=False).tolist())
        named = (cur_it if draw(st.booleans()) else cur_it - 1, nl, ids)
    s = SimpleNamespace(
        _la_mode=mode, _la_on=on.tolist(), _map_h=map_h, _la_cat_h=cat_h, _look_named=named,
        _cur_it=cur_it, _mcat_h=mcat_h, _mcat_n=mcat_n,
    )  # fmt: skip
    copy = rng.choice([0.5, 1.0, 2.0], nd)
    avail = rng.choice([0.0, 0.3, 1.0, 3.0], nd)
    dev_of = rng.integers(0, nd, (L, J))
    ctx = dict(
        s=s, on=on, lay=lay, jj=jj, n=n, g=g, L=L, J=J, nd=nd, dev_of=dev_of, copy=copy,
        avail=avail, marginal=draw(st.booleans()), rng=rng, cur_it=cur_it,
    )  # fmt: skip
    return ctx


@settings(max_examples=30, deadline=None)
@given(states())
def test_admit_gate_is_the_python_glue_then_admit_rows(c: dict) -> None:
    s, lay, jj, n, g, L, J, nd = c["s"], c["lay"], c["jj"], c["n"], c["g"], c["L"], c["J"], c["nd"]
    rng = c["rng"]
    sv, ch0, cn0 = _python_terms(s, lay, jj, g, c["dev_of"], c["copy"], c["avail"], c["marginal"])
    # the rest of the pass's inputs, random
    p = rng.random(n)
    was = rng.random(n) < 0.3
    look = np.where(rng.random(n) < 0.3, rng.random(n), -1.0)
    committed = rng.random(nd)
    demand = rng.random(nd) * 0.5
    it = c["cur_it"]
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = rng.integers(0, it + 1, (L, J))
    ist[1] = rng.integers(0, 3, (L, J))
    ist[3] = rng.integers(0, 3, (L, J))
    ist[2, :, 0] = rng.choice([it, it - 1], L)
    tab = rng.random((3, 8))
    rank_chance = bool(rng.integers(0, 2))
    beta = rng.choice([0.0, 0.1], nd)
    resid = np.array([0.0, 2.0])
    kap = np.ones(nd)
    # candidate_chance="measured" (policies.fmoe_calib): per table cell, used and judged
    cal_h = rng.integers(0, 3, tab.shape).astype(np.float64)
    cal_n = cal_h + rng.integers(0, 3, tab.shape)
    vfree = rng.integers(0, 2, nd)
    v_e = rng.random((nd, 4)) * 5
    v_len = np.full(nd, 4)
    v_loaded = np.ones(nd, np.bool_)
    price = bool(rng.integers(0, 2))
    common = (g, c["dev_of"], committed, c["copy"], c["avail"], demand, 1.0, False, ist, tab,
              True, it)  # fmt: skip
    vict = (price, 0.5, vfree, v_e, v_len, v_loaded, rank_chance, beta, resid)
    act_py, counts_py = np.zeros((n, 2), np.int64), np.zeros(7, np.int64)
    p_py = p.copy()
    na_py = K.admit_rows(lay, jj, p_py, was, look, *common, act_py, counts_py, *vict, sv, ch0,
                         cn0, kap, cal_h, cal_n)  # fmt: skip
    # the kernel, on buffers longer than the candidates (as _admit_kernel keeps them)
    size = L * J
    pad = size - n

    def padded(a: np.ndarray, fill: float | bool = 0) -> np.ndarray:
        return np.concatenate([a, np.full(pad, fill, a.dtype)])

    bufs = [np.full(size, 9.0) for _ in range(4)]  # sv, ch0, cn0, p: stale values
    rec = np.full(L, np.nan)
    act, counts = np.zeros((size, 2), np.int64), np.zeros(7, np.int64)
    named = s._look_named
    nl, nids, mh0, mn0 = -1, np.zeros(0, np.int64), 0.0, -1.0
    if named is not None and named[0] == it:
        nl = named[1]
        nids = np.array(sorted(named[2]), np.int64)
        mh0, mn0 = float(s._mcat_h[0, nl]), float(s._mcat_n[0, nl])
    mode = s._la_mode
    mode_i = 0 if mode is False else (2 if mode is True else 1)
    p_in = padded(p)
    na = K.admit_gate(
        padded(lay), padded(jj), p_in, padded(was, False), padded(look, -1.0), n, *common,
        act, counts, *vict, kap, cal_h, cal_n, c["marginal"], mode_i, s._map_h, s._la_cat_h[1], c["on"], rec,
        nl, nids, mh0, mn0, *bufs,
    )  # fmt: skip
    assert na == na_py
    np.testing.assert_array_equal(bufs[0][:n], sv)
    np.testing.assert_array_equal(bufs[1][:n], ch0)
    np.testing.assert_array_equal(bufs[2][:n], cn0)
    assert np.isnan(rec).all()  # the scratch is left unset
    np.testing.assert_array_equal(p_in[:n], p)  # the merged p is never written
    if na >= 0:
        np.testing.assert_array_equal(act[:na], act_py[:na])
        np.testing.assert_array_equal(counts, counts_py)
        if rank_chance:
            np.testing.assert_array_equal(bufs[3][:n], p_py)


@settings(max_examples=20, deadline=None)
@given(states())
def test_look_recall_is_the_mixins(c: dict) -> None:
    s = c["s"]
    mode = s._la_mode
    mode_i = 0 if mode is False else (2 if mode is True else 1)
    for layer in range(-1, c["L"] + 1):
        want = FmoeLookahead._look_recall(s, layer)
        got = K.look_recall(layer, mode_i, s._map_h, s._la_cat_h[1], c["on"])
        assert got == want


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), right=st.booleans())
def test_the_cells_array_follows_the_lists(seed: int, right: bool) -> None:
    """``_la_on_arr`` (what the admission kernel reads) equals ``_la_on`` after a fit
    (cells set wholesale) and after gates (a layer's row at a time)."""
    L, J, K = 4, 6, 2
    spec = small_spec(layers=L, experts=J, top_k=K, hidden=3)
    rng = np.random.default_rng(seed)
    routings = [_routing(rng, 30, L, J, K, right) for _ in range(2)]
    pol = _bound(spec)
    pol.fit(_workload(spec, routings))
    np.testing.assert_array_equal(pol._la_on_arr, np.array(pol._la_on, np.bool_))
    r = routings[0]
    for t in range(r.num_tokens):  # one row an iteration: the kernel path of the gates
        pol.on_iteration_start(IterationStart(t, ("q",), np.arange(1), np.zeros(1, bool)))
        for lay in range(L):
            pol.on_gate(
                GateOutput(
                    t, lay, r.topk_ids[t : t + 1, lay], r.topk_weights[t : t + 1, lay],
                    r.gate_probs[t : t + 1, lay], r.lookahead[t : t + 1, lay],
                )
            )  # fmt: skip
        np.testing.assert_array_equal(pol._la_on_arr, np.array(pol._la_on, np.bool_))
