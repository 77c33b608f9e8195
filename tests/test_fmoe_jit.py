"""fMoE's numba kernels (policies/fmoe_jit.py) against the numpy code they replace.

Each reference below is the numpy form the policy used before the kernels; every kernel
must give bitwise the same values (the simulator's results may not move by a bit)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from policies import fmoe_jit
from policies.fmoe_eviction import _NEVER, AGE_BUCKETS, CAL_BINS, age_bucket
from policies.fmoe_select import select_rows

ROWS = 1 + 2 * CAL_BINS


# -- numpy references (the policy's code before the kernels) ------------------------------
def ref_decreasing_rows(hits: np.ndarray, n: np.ndarray) -> np.ndarray:
    out = np.empty_like(hits)
    for r in range(hits.shape[0]):
        blocks: list[list[float]] = []
        for h, w in zip(hits[r].tolist(), n[r].tolist(), strict=True):
            blocks.append([h, w, 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
                h2, w2, c2 = blocks.pop()
                blocks[-1][0] += h2
                blocks[-1][1] += w2
                blocks[-1][2] += c2
        i = 0
        for h, w, c in blocks:
            out[r, i : i + c] = h / w
            i += c
    return out


def ref_observe(last, fc_it, fc_row, tab_n, tab_hit, protect, layer, it, topk) -> None:
    ids = np.unique(topk)
    lst = last[layer]
    if not np.any(lst == it):
        ages = age_bucket(it - lst)
        np.add.at(tab_n[0], ages, 1.0)
        np.add.at(tab_hit[0], ages[ids], 1.0)
        if fc_it[layer] == it:
            rows = fc_row[layer]
            np.add.at(tab_n, (rows, ages), 1.0)
            np.add.at(tab_hit, (rows[ids], ages[ids]), 1.0)
    lst[ids] = it
    protect[: layer + 1] = False


def ref_expected_next_use(last, fc_it, fc_row, tab, protect, g, it) -> np.ndarray:
    L = last.shape[0]
    lay = np.arange(L)[:, None]
    ahead = lay > g
    age = it - last
    rows = np.where((fc_it == it)[:, None], fc_row, 0)
    nxt = (L - g + lay).astype(float)
    p_now = tab[rows, age_bucket(age)]
    p_next = tab[0, age_bucket(age + 1)]
    wait = nxt + L * (1.0 / p_next - 1.0)
    e_ahead = p_now * (lay - g) + (1.0 - p_now) * wait
    p_pass = tab[0, age_bucket(np.maximum(age, 0) + 1)]
    e_pass = nxt + L * (1.0 / p_pass - 1.0)
    e = np.where(ahead, e_ahead, e_pass)
    e[protect] = 0.0
    return e


@njit
def _buckets_of(ages):  # noqa: ANN001, ANN202
    out = np.empty(ages.size, np.int64)
    for i in range(ages.size):
        out[i] = fmoe_jit.age_bucket1(ages[i])
    return out


# -- tests -----------------------------------------------------------------------------------
def test_age_buckets_match_the_log2_form_for_every_age() -> None:
    ages = np.arange(-3, 1 << 22, dtype=np.int64)
    assert np.array_equal(_buckets_of(ages), age_bucket(ages))
    never = 5 - np.full(64, _NEVER, np.int64) + np.arange(64)  # ages of never-chosen experts
    assert np.array_equal(_buckets_of(never), age_bucket(never))
    assert (age_bucket(never) == AGE_BUCKETS - 1).all()


def _state(seed: int, L: int, J: int, it: int):
    rng = np.random.default_rng(seed)
    ist = np.zeros((3, L, J), np.int64)
    ist[0] = rng.integers(it - 300, it + 1, (L, J))
    ist[0][rng.random((L, J)) < 0.2] = _NEVER
    ist[1] = rng.integers(0, ROWS, (L, J))
    ist[2] = rng.choice([it, it - 1], L)[:, None]
    fl = np.zeros((3, ROWS, AGE_BUCKETS))
    fl[1] = rng.integers(0, 50, (ROWS, AGE_BUCKETS))
    fl[0] = np.floor(fl[1] * rng.random((ROWS, AGE_BUCKETS)))
    prot = rng.random((L, J)) < 0.1
    return ist, fl, prot


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), L=st.integers(1, 9), J=st.integers(1, 12), K=st.integers(1, 4))
def test_observe_choice_counts_as_the_numpy_form(seed: int, L: int, J: int, K: int) -> None:
    it = 400
    ist, fl, prot = _state(seed, L, J, it)
    rng = np.random.default_rng(seed + 1)
    layer = int(rng.integers(0, L))
    topk = rng.integers(0, J, (int(rng.integers(1, 4)), K)).astype(rng.choice([np.int64, np.int16]))
    ref = [a.copy() for a in (ist[0], ist[2, :, 0], ist[1], fl[1], fl[0], prot)]
    ref_observe(*ref, layer, it, topk)
    assert fmoe_jit.observe_choice(ist, fl, prot, layer, it, topk)
    for got, want in zip((ist[0], ist[2, :, 0], ist[1], fl[1], fl[0], prot), ref, strict=True):
        assert np.array_equal(got, want)


def test_observe_choice_refuses_ids_outside_the_layer_and_changes_nothing() -> None:
    ist, fl, prot = _state(0, 3, 4, 10)
    before = (ist.copy(), fl.copy(), prot.copy())
    assert not fmoe_jit.observe_choice(ist, fl, prot, 1, 10, np.array([[1, 4]]))
    assert not fmoe_jit.observe_choice(ist, fl, prot, 1, 10, np.array([[-1, 2]]))
    for got, want in zip((ist, fl, prot), before, strict=True):
        assert np.array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), base=st.floats(0.01, 1.0))
def test_decreasing_rows_pools_as_the_python_form(seed: int, base: float) -> None:
    _, fl, _ = _state(seed, 2, 2, 10)
    want = ref_decreasing_rows(fl[0] + base, fl[1] + 1.0)
    fmoe_jit.decreasing_rows(fl, base)
    assert np.array_equal(fl[2], want)
    assert (np.diff(fl[2], axis=1) <= 0).all()  # non-increasing in age


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), L=st.integers(1, 9), J=st.integers(1, 12), g=st.integers(-1, 8))
def test_expected_next_use_is_the_numpy_form_bit_for_bit(seed: int, L: int, J: int, g: int) -> None:
    it = 400
    g = min(g, L - 1)
    ist, fl, prot = _state(seed, L, J, it)
    fmoe_jit.decreasing_rows(fl, 0.25)
    out = np.empty((L, J))
    fmoe_jit.expected_next_use(ist, fl, prot, out, g, it)
    want = ref_expected_next_use(ist[0], ist[2, :, 0], ist[1], fl[2], prot, g, it)
    assert np.array_equal(-out, want)
    assert np.array_equal(np.signbit(out), np.ones_like(prot))  # scores hold -E, -0.0 if protected


def test_gate_step_is_observe_then_forecast_then_the_table() -> None:
    L, J, it = 6, 5, 50
    ist, fl, prot = _state(3, L, J, it)
    fmoe_jit.decreasing_rows(fl, 0.4)
    fc_rows = np.arange(4 * J).reshape(4, J) % ROWS
    ids = np.array([[4, 1]])
    a_ist, a_fl, a_prot = ist.copy(), fl.copy(), prot.copy()
    out = np.empty((L, J))
    assert fmoe_jit.gate_step(ist, fl, prot, out, 2, it, ids, fc_rows, 5, True)
    assert fmoe_jit.observe_choice(a_ist, a_fl, a_prot, 2, it, ids)
    a_ist[2, 5, 0] = it
    a_ist[1, 5] = fc_rows[2]
    want = np.empty((L, J))
    fmoe_jit.expected_next_use(a_ist, a_fl, a_prot, want, 2, it)
    assert np.array_equal(ist, a_ist) and np.array_equal(fl, a_fl) and np.array_equal(out, want)


def _near_threshold_rows(rng: np.random.Generator, R: int, J: int, k: int):
    """Softmax-like float32 rows and scores whose threshold 1 - score sits on, just
    above or just below a running sum of the sorted row (the exact rule's edge cases)."""
    rows = rng.dirichlet(np.full(J, 0.5), R).astype(np.float32)
    rows[rng.random((R, J)) < 0.2] = 0.0  # zeros beyond the top-k are skipped
    if J > 1:
        rows[0, 1] = rows[0, 0]  # a tie: the lower id first
    scores = np.empty(R, np.float32)
    for r in range(R):
        cum = np.cumsum(np.sort(rows[r])[::-1])
        at = cum[int(rng.integers(0, J))]
        nudge = rng.choice([0.0, 1e-6, -1e-6, 1e-7, 3e-5, -3e-5, 0.5, -0.5])
        scores[r] = np.float32(1.0 - (float(at) + 1e-6 + nudge))
    return rows, scores


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), J=st.integers(1, 64), k=st.integers(1, 8), delta=st.booleans())
def test_select_rows_kernel_picks_as_select_rows(seed: int, J: int, k: int, delta: bool) -> None:
    rng = np.random.default_rng(seed)
    R = 12
    k = min(k, J)
    rows, scores = _near_threshold_rows(rng, R, J, k)
    order = np.argsort(-rows, axis=1, kind="stable")
    want = select_rows(rows, scores, k, delta, order)
    picks = np.empty((R, J), np.int64)
    counts = np.empty(R, np.int64)
    fmoe_jit.select_rows(rows, scores, k, delta, picks, counts)
    got = [picks[r, : counts[r]].tolist() for r in range(R)]
    assert got == want


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), L=st.integers(1, 8), B=st.integers(1, 3), n=st.integers(1, 40))
def test_running_sums_are_the_layer_by_layer_adds(seed: int, L: int, B: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    cum_dots = rng.random((L, B, n)).astype(np.float32)
    want = cum_dots.copy()
    layers = iter(want)
    prev = next(layers)
    for cur in layers:
        cur += prev
        prev = cur
    fmoe_jit.running_sums(cum_dots)
    assert np.array_equal(cum_dots, want)
