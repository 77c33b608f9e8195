"""fMoE's numba kernels (policies/fmoe_jit.py) against the numpy code they replace.

Each reference below is the numpy form the policy used before the kernels; every kernel
must give bitwise the same values (the simulator's results may not move by a bit)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from policies import fmoe_jit, fmoe_uses_jit
from policies.fmoe_eviction import _NEVER, AGE_BUCKETS, CAL_BINS, age_bucket
from policies.fmoe_select import select_rows

ROWS = 3 * CAL_BINS  # request-frequency bins, then semantic and trajectory forecast bins


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


def ref_bins(rc, rn, slots, base, lay, pop=None) -> np.ndarray:
    J = rc.shape[2]
    q = np.full(J, base) if pop is None else (pop[lay, :J] + base) / (pop[lay, J] + 1.0)
    f = (
        q
        if len(slots) == 0
        else 1.0 - np.prod([1.0 - (rc[s, lay] + q) / (rn[s, lay] + 1.0) for s in slots], axis=0)
    )
    return np.minimum((f / (f + base) * CAL_BINS).astype(np.int64), CAL_BINS - 1)


def ref_observe(
    ist, tab_n, tab_hit, protect, layer, it, topk, rc, rn, row_slot, slots, base, pop=None
):
    last, fc_it, fc_row, freq = ist[0], ist[2, :, 0], ist[1], ist[3]
    ids = np.unique(topk)
    lst = last[layer]
    if not np.any(lst == it):
        ages = age_bucket(it - lst)
        fr = freq[layer]
        np.add.at(tab_n, (fr, ages), 1.0)
        np.add.at(tab_hit, (fr[ids], ages[ids]), 1.0)
        if fc_it[layer] == it:
            rows = fc_row[layer]
            np.add.at(tab_n, (rows, ages), 1.0)
            np.add.at(tab_hit, (rows[ids], ages[ids]), 1.0)
        if pop is not None:
            pop[layer, -1] += len(topk)
            np.add.at(pop[layer], topk.ravel(), 1.0)
        if len(row_slot) == len(topk):
            for r, s in enumerate(row_slot):
                rn[s, layer] += 1.0
                np.add.at(rc[s, layer], topk[r], 1.0)
        if len(row_slot) == len(topk) or pop is not None:
            freq[layer] = ref_bins(rc, rn, slots, base, layer, pop)
    lst[ids] = it
    protect[: layer + 1] = False


def ref_expected_next_use(ist, tab, protect, g, it, rows=1) -> np.ndarray:
    last, fc_it, fc_row, freq = ist[0], ist[2, :, 0], ist[1], ist[3]
    R = rows
    L = last.shape[0]
    lay = np.arange(L)[:, None]
    ahead = lay > g
    age = it - last
    rows = np.where((fc_it == it)[:, None], fc_row, freq)
    nxt = (L - g + lay).astype(float)
    p_now = tab[rows, age_bucket(age)]
    if R > 1:  # any of an iteration's R rows uses a layer still ahead
        p_now = 1.0 - np.vectorize(fmoe_jit.pow_rows.py_func)(1.0 - p_now, R)
    p_next = tab[freq, age_bucket(age + 1)]
    wait = nxt + L * (1.0 / p_next - 1.0)
    e_ahead = p_now * (lay - g) + (1.0 - p_now) * wait
    p_pass = tab[freq, age_bucket(np.maximum(age, 0) + 1)]
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
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = rng.integers(it - 300, it + 1, (L, J))
    ist[0][rng.random((L, J)) < 0.2] = _NEVER
    ist[1] = rng.integers(CAL_BINS, ROWS, (L, J))
    ist[2] = rng.choice([it, it - 1], L)[:, None]
    ist[3] = rng.integers(0, CAL_BINS, (L, J))
    fl = np.zeros((3, ROWS, AGE_BUCKETS))
    fl[1] = rng.integers(0, 50, (ROWS, AGE_BUCKETS))
    fl[0] = np.floor(fl[1] * rng.random((ROWS, AGE_BUCKETS)))
    prot = rng.random((L, J)) < 0.1
    return ist, fl, prot


def _requests(seed: int, L: int, J: int, B: int):
    """Counts of 3 request slots and the rows' slots (B rows; none when B is 0)."""
    rng = np.random.default_rng(seed + 7)
    rn = rng.integers(0, 40, (3, L)).astype(float)
    rc = np.floor(rn[:, :, None] * rng.random((3, L, J)))
    row_slot = rng.integers(0, 3, B).astype(np.int64)
    return rc, rn, row_slot, np.unique(row_slot)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 9),
    J=st.integers(1, 12),
    K=st.integers(1, 4),
    known=st.booleans(),
    population=st.booleans(),
)
def test_observe_choice_counts_as_the_numpy_form(
    seed: int, L: int, J: int, K: int, known: bool, population: bool
) -> None:
    it, base = 400, 0.25
    ist, fl, prot = _state(seed, L, J, it)
    rng = np.random.default_rng(seed + 1)
    layer = int(rng.integers(0, L))
    B = int(rng.integers(1, 4))
    topk = rng.integers(0, J, (B, K)).astype(rng.choice([np.int64, np.int16]))
    rc, rn, row_slot, slots = _requests(seed, L, J, B if known else 0)
    pop = _population(seed, L, J) if population else np.zeros((0, 0))
    ref = [a.copy() for a in (ist, fl[1], fl[0], prot, rc, rn)]
    ref_pop = pop.copy() if population else None
    ref_observe(*ref[:4], layer, it, topk, *ref[4:], row_slot, slots, base, ref_pop)
    assert fmoe_jit.observe_choice(
        ist, fl, prot, layer, it, topk, rc, rn, row_slot, slots, base, CAL_BINS, pop
    )
    for got, want in zip((ist, fl[1], fl[0], prot, rc, rn), ref, strict=True):
        assert np.array_equal(got, want)
    if population:
        assert np.array_equal(pop, ref_pop)


def _population(seed: int, L: int, J: int) -> np.ndarray:
    """Population counts [L, J + 1]: choices per expert, rows per layer in the last column."""
    rng = np.random.default_rng(seed + 11)
    pop = np.zeros((L, J + 1))
    pop[:, J] = rng.integers(0, 200, L)
    pop[:, :J] = np.floor(pop[:, J:] * rng.random((L, J)))
    return pop


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 6),
    J=st.integers(1, 12),
    B=st.integers(0, 4),
    population=st.booleans(),
)
def test_request_bins_are_the_batch_chance_binned(
    seed: int, L: int, J: int, B: int, population: bool
) -> None:
    ist, _, _ = _state(seed, L, J, 10)
    rc, rn, _, slots = _requests(seed, L, J, B)
    pop = _population(seed, L, J) if population else np.zeros((0, 0))
    fmoe_jit.request_bins(ist, rc, rn, slots, 0.125, CAL_BINS, -1, pop)
    for lay in range(L):
        assert np.array_equal(
            ist[3, lay], ref_bins(rc, rn, slots, 0.125, lay, pop if population else None)
        )
    if B == 0 and not population:  # no request, no population: the uninformed rate's bin
        assert (ist[3] == CAL_BINS // 2).all()  # the middle bin: f / (f + base) = 1/2


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), J=st.integers(2, 64), K=st.integers(1, 8))
def test_frequency_bins_are_monotone_and_centred_on_the_uninformed_rate(
    seed: int, J: int, K: int
) -> None:
    """More choices of an expert, by its request or the population, never give it a lower
    bin; an expert at the uninformed rate K/J sits in the middle bin whatever J and K."""
    K = min(K, J)
    base = K / J
    rng = np.random.default_rng(seed)
    rows = int(rng.integers(1, 500))
    pop = np.zeros((1, J + 1))
    pop[0, J] = rows
    pop[0, :J] = np.sort(np.floor(rows * rng.random(J)))  # non-decreasing in j
    rc = np.zeros((1, 1, J))
    rn = np.full((1, 1), float(rng.integers(0, 50)))
    rc[0, 0] = np.sort(np.floor(rn[0, 0] * rng.random(J)))
    ist = np.zeros((4, 1, J), np.int64)
    fmoe_jit.request_bins(ist, rc, rn, np.array([0]), base, CAL_BINS, -1, pop)
    assert (np.diff(ist[3, 0]) >= 0).all()
    fmoe_jit.request_bins(ist, rc, rn, np.zeros(0, np.int64), base, CAL_BINS, -1, np.zeros((0, 0)))
    assert (ist[3, 0] == CAL_BINS // 2).all()


def test_observe_choice_refuses_ids_outside_the_layer_and_changes_nothing() -> None:
    ist, fl, prot = _state(0, 3, 4, 10)
    rc, rn, row_slot, slots = _requests(0, 3, 4, 1)
    before = (ist.copy(), fl.copy(), prot.copy())
    for bad in ([[1, 4]], [[-1, 2]]):
        ids = np.array(bad)
        assert not fmoe_jit.observe_choice(
            ist, fl, prot, 1, 10, ids, rc, rn, row_slot, slots, 0.25, CAL_BINS, np.zeros((3, 5))
        )
    for got, want in zip((ist, fl, prot), before, strict=True):
        assert np.array_equal(got, want)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), base=st.floats(0.01, 1.0))
def test_chance_table_forecast_rows_pool_as_the_python_form(seed: int, base: float) -> None:
    _, fl, _ = _state(seed, 2, 2, 10)
    want = ref_decreasing_rows(fl[0] + base, fl[1] + 1.0)
    fmoe_jit.decreasing_rows(fl, base, CAL_BINS)
    assert np.array_equal(fl[2, CAL_BINS:], want[CAL_BINS:])
    assert (np.diff(fl[2], axis=1) <= 1e-15).all()  # every row non-increasing in age


def test_request_rows_pool_when_they_tell_nothing_and_keep_what_they_tell() -> None:
    fl = np.zeros((3, ROWS, AGE_BUCKETS))
    fl[1, :CAL_BINS, :4] = 100.0  # every bin: 100 visits at ages 1..8, 25 choices
    fl[0, :CAL_BINS, :4] = 25.0
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    assert (fl[2, :CAL_BINS] == fl[2, 0]).all()  # no difference between bins: pooled
    fl[0, CAL_BINS - 1, :4] = 90.0  # the top bin's experts come back far more often
    fl[0, 0, :4] = 2.0
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    assert (fl[2, CAL_BINS - 1, :4] > fl[2, 0, :4] + 0.3).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 9),
    J=st.integers(1, 12),
    g=st.integers(-1, 8),
    rows=st.sampled_from([1, 1, 2, 64]),
)
def test_expected_next_use_is_the_numpy_form_bit_for_bit(
    seed: int, L: int, J: int, g: int, rows: int
) -> None:
    it = 400
    g = min(g, L - 1)
    ist, fl, prot = _state(seed, L, J, it)
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    out = np.empty((L, J))
    fmoe_jit.expected_next_use(ist, fl, prot, out, g, it, CAL_BINS, rows)
    want = ref_expected_next_use(ist, fl[2], prot, g, it, rows)
    assert np.array_equal(-out, want)
    assert np.array_equal(np.signbit(out), np.ones_like(prot))  # scores hold -E, -0.0 if protected


def test_gate_step_is_observe_then_forecast_then_the_table() -> None:
    L, J, it = 6, 5, 50
    ist, fl, prot = _state(3, L, J, it)
    rc, rn, row_slot, slots = _requests(3, L, J, 1)
    fmoe_jit.decreasing_rows(fl, 0.4, CAL_BINS)
    fc_rows = CAL_BINS + np.arange(4 * J).reshape(4, J) % (2 * CAL_BINS)
    ids = np.array([[4, 1]])
    a = [x.copy() for x in (ist, fl, prot, rc, rn)]
    out = np.empty((L, J))
    args = (row_slot, slots, 0.25, CAL_BINS)
    pop, pop_ref = _population(3, L, J), _population(3, L, J)
    assert fmoe_jit.gate_step(
        ist, fl, prot, out, 2, it, ids, fc_rows, 5, True, rc, rn, *args, pop, 1
    )
    assert fmoe_jit.observe_choice(a[0], a[1], a[2], 2, it, ids, a[3], a[4], *args, pop_ref)
    assert np.array_equal(pop, pop_ref)
    a[0][2, 5, 0] = it
    a[0][1, 5] = fc_rows[2]
    want = np.empty((L, J))
    fmoe_jit.expected_next_use(a[0], a[1], a[2], want, 2, it, CAL_BINS, 1)
    for got, exp in zip((ist, fl, prot, rc, rn, out), (*a, want), strict=True):
        assert np.array_equal(got, exp)


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


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), J=st.integers(1, 64), k=st.integers(1, 8), delta=st.booleans())
def test_select_rows_flat_packs_the_picks_and_numpys_quotients(
    seed: int, J: int, k: int, delta: bool
) -> None:
    """select_rows_flat's packed picks and priorities are select_rows' picks row after
    row and numpy's float64 ``take_along_axis(rows, picks) / dist`` of them, bit for bit
    (what FmoeOrders._row_orders computed before)."""
    rng = np.random.default_rng(seed)
    R = 12
    k = min(k, J)
    rows, scores = _near_threshold_rows(rng, R, J, k)
    dist = rng.choice(np.array([1.0, 2.0, 3.0, 7.0]), (R, 1))
    picks = np.zeros((R, J), np.int64)
    counts = np.empty(R, np.int64)
    fmoe_jit.select_rows(rows, scores, k, delta, picks, counts)
    vals = np.take_along_axis(rows, picks, axis=1) / dist
    want_j = [j for r in range(R) for j in picks[r, : counts[r]].tolist()]
    want_v = np.array([v for r in range(R) for v in vals[r, : counts[r]].tolist()])
    p2, c2 = np.empty((R, J), np.int64), np.empty(R, np.int64)
    fj, fv = np.empty(R * J, np.int64), np.empty(R * J)
    t = fmoe_jit.select_rows_flat(rows, scores, k, delta, dist, p2, c2, fj, fv)
    assert c2.tolist() == counts.tolist()
    assert fj[:t].tolist() == want_j
    assert fv[:t].tobytes() == want_v.tobytes()


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


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 9),
    J=st.integers(1, 12),
    g=st.integers(-1, 8),
    n=st.integers(0, 40),
    now=st.sampled_from([0.0, 0.5, 1e3]),
    rows=st.sampled_from([1, 1, 3, 64]),
)
def test_victims_are_the_table_scores_ranked_then_by_key(
    seed: int, L: int, J: int, g: int, n: int, now: float, rows: int
) -> None:
    """The kernel's victims are the entries eviction_scores ranks first, in order: lowest
    ``table + tie * last_used`` from expected_next_use's table, ties to the lowest key
    (last_used drawn from few values, so scores tie)."""
    it = 400
    g = min(g, L - 1)
    ist, fl, prot = _state(seed, L, J, it)
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    tab = np.empty((L, J))
    fmoe_jit.expected_next_use(ist, fl, prot, tab, g, it, CAL_BINS, rows)
    rng = np.random.default_rng(seed + 11)
    flat = rng.permutation(L * J)[: min(n, L * J)]
    layers, experts = flat // J, flat % J
    last_used = rng.choice([0.0, 1.0, 2.5], len(flat))
    tie = 1e-9 / (abs(now) + 1.0)
    out = np.empty(5, np.int64)
    s_out, e_out = np.empty(5), np.empty(5)
    c = fmoe_jit.victims(
        ist, fl, prot, g, it, layers, experts, last_used, len(flat), tie, out, s_out, e_out, rows
    )
    assert c == min(len(flat), 5)
    ranked = sorted(
        (tab[lay, j] + tie * lu, lay, j)
        for lay, j, lu in zip(layers.tolist(), experts.tolist(), last_used.tolist(), strict=True)
    )
    got = [(int(layers[i]), int(experts[i])) for i in out[:c]]
    assert got == [(lay, j) for _, lay, j in ranked[:c]]
    # and each listed victim's score and table value, bit for bit
    assert s_out[:c].tolist() == [s for s, _, _ in ranked[:c]]
    assert e_out[:c].tolist() == [tab[lay, j] for _, lay, j in ranked[:c]]
    assert np.signbit(e_out[:c]).tolist() == [np.signbit(tab[lay, j]) for _, lay, j in ranked[:c]]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 5),
    J=st.integers(1, 12),
    n=st.integers(0, 20),
)
def test_fresh_put_is_the_loop_and_the_candidate_sets_put(
    seed: int, L: int, J: int, n: int
) -> None:
    """fresh_put marks, in order, the experts _order's loop makes candidates (neither
    ordered this iteration nor cached, a repeated id once) and puts each at p = val x
    ahead by CandidateSet.put's rule (larger p kept, first position kept, new appended)
    over a set already holding some candidates: the same arrays as the Python."""
    from policies.fmoe_cands import CandidateSet

    rng = np.random.default_rng(seed)
    layer = int(rng.integers(L))
    issued = rng.random((L, J)) < 0.3
    experts = rng.integers(0, J, n)  # repeats allowed
    cached = rng.random(n) < 0.3
    vals = rng.choice(np.array([0.0, -0.0, 0.25, 1.0, 3.0, -2.0]), n)
    ahead = float(rng.integers(1, 4))
    want_set, got_set = CandidateSet(L, J), CandidateSet(L, J)
    for _ in range(int(rng.integers(0, 6))):  # candidates already held, same in both
        ll, jj, pp = int(rng.integers(L)), int(rng.integers(J)), float(rng.random() * 3)
        want_set.put(ll, jj, pp)
        got_set.put(ll, jj, pp)
    want_issued = issued.copy()
    for i, j in enumerate(experts.tolist()):  # the loop (cached: by position, as the keys)
        if want_issued[layer, j] or cached[i]:
            continue
        want_issued[layer, j] = True
        want_set.put(layer, j, float(vals[i]) * ahead)
    got_set.cnt = fmoe_jit.fresh_put(
        issued, layer, experts.astype(np.int64), cached, vals, ahead,
        got_set.p, got_set.idx, got_set.cnt,
    )  # fmt: skip
    assert np.array_equal(issued, want_issued)
    assert got_set.cnt == want_set.cnt
    assert got_set.idx[: got_set.cnt].tolist() == want_set.idx[: want_set.cnt].tolist()
    assert got_set.p.tobytes() == want_set.p.tobytes()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    J=st.integers(1, 40),
    k=st.integers(1, 8),
    pool=st.sampled_from([[0.0, -0.0, 0.5, 1.0], [0.1, 0.2], [np.inf, -np.inf, 0.0, 3.0]]),
    continuous=st.booleans(),
)
def test_topk_row_is_the_stable_argsorts_head(
    seed: int, J: int, k: int, pool: list[float], continuous: bool
) -> None:
    """topk_row gives np.argsort(-row, kind="stable")[:k] (ties, -0.0 and infinities
    included: values drawn from a small pool), and refuses a row with a NaN."""
    from policies import fmoe_look_jit

    rng = np.random.default_rng(seed)
    row = rng.random(J) if continuous else rng.choice(np.array(pool), J)
    k = min(k, J)
    out = np.empty(k, np.int64)
    assert fmoe_look_jit.topk_row(row, k, out)
    assert out.tolist() == np.argsort(-row, kind="stable")[:k].tolist()
    rows = np.stack([row, row[::-1].copy()]).astype(np.float32)  # and float32 rows
    outs = np.empty((2, k), np.int64)
    assert fmoe_look_jit.topk_rows(rows, k, outs)
    assert outs.tolist() == np.argsort(-rows, axis=1, kind="stable")[:, :k].tolist()
    row[rng.integers(J)] = np.nan
    assert not fmoe_look_jit.topk_row(row, k, out)


@settings(max_examples=25, deadline=None)
@given(x=st.floats(0.0, 1.0), n=st.integers(1, 4096))
def test_pow_rows_is_the_power_within_rounding(x: float, n: int) -> None:
    """pow_rows (squaring in a fixed order, bit-equal between Python and the kernels) is
    x ** n up to the rounding of its ~2 log2(n) products."""
    got = fmoe_jit.pow_rows(x, n)
    assert got == fmoe_jit.pow_rows.py_func(x, n)
    assert abs(got - x**n) <= 1e-13 * max(x**n, 1e-300) * (2 * n.bit_length()) + 1e-300


def ref_expected_uses(ist, tab, protect, g, it, rows, horizon) -> np.ndarray:
    """expected_uses in numpy: exp(-t1 / H) (P1 + p r / (1 - r)), r = exp(-L / H)."""
    last, fc_it, fc_row, freq = ist[0], ist[2, :, 0], ist[1], ist[3]
    L = last.shape[0]
    lay = np.arange(L)[:, None]
    ahead = np.broadcast_to(lay > g, last.shape)
    age = it - last
    row = np.where((fc_it == it)[:, None], fc_row, freq)
    p_now = tab[row, age_bucket(age)]
    if rows > 1:
        p_now = 1.0 - np.vectorize(fmoe_jit.pow_rows.py_func)(1.0 - p_now, rows)
    p_ahead = tab[freq, age_bucket(age + 1)]
    p_pass = tab[freq, age_bucket(np.maximum(age, 0) + 1)]
    t1 = np.where(ahead, (lay - g).astype(float), (L - g + lay).astype(float))
    p1 = np.where(ahead, p_now, p_pass)
    p = np.where(ahead, p_ahead, p_pass)
    r = np.exp(-L / horizon)
    geo = r / (1.0 - r)
    u = np.exp(-t1 / horizon) * (p1 + p * geo)
    u[protect] = np.inf
    return u


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 9),
    J=st.integers(1, 12),
    g=st.integers(-1, 8),
    rows=st.sampled_from([1, 3, 64]),
    horizon=st.floats(0.5, 1e4),
)
def test_expected_uses_is_the_numpy_form(seed, L, J, g, rows, horizon) -> None:
    """The kernel against its numpy form (the same operations; exp may differ in the last
    bit between numba and numpy, so within 1e-12 relative); protected experts +inf."""
    it = 400
    g = min(g, L - 1)
    ist, fl, prot = _state(seed, L, J, it)
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    out = np.empty((L, J))
    fmoe_uses_jit.expected_uses(ist, fl, prot, out, g, it, rows, horizon)
    want = ref_expected_uses(ist, fl[2], prot, g, it, rows, horizon)
    assert np.array_equal(np.isinf(out), prot)
    assert np.allclose(out[~prot], want[~prot], rtol=1e-12, atol=0.0)


def test_expected_uses_follows_the_next_visit_at_short_stays_and_the_rate_at_long_ones():
    """Two layers: (1, 0) ahead by one step, chance 0.3 now but 0.01 afterwards; (0, 0)
    passed, chance 0.2 at every visit. A short residency (H = 2 steps) keeps the one used
    soon; a long one (H = 10^4) keeps the one used often (LFU's order, the long run)."""
    L, J, it = 2, 1, 10
    ist = np.zeros((4, L, J), np.int64)
    ist[0] = it - 1  # both chosen last iteration: age 1 now, 2 at the next visit
    ist[2, 1, 0] = it  # layer 1 forecast this iteration, in table row 20
    ist[1, 1, 0] = 20
    ist[3, 0, 0], ist[3, 1, 0] = 0, 1  # request-frequency rows
    fl = np.zeros((3, 3 * CAL_BINS, 16))
    fl[2, 20, 0] = 0.3  # (1, 0) now
    fl[2, 1, 1] = 0.01  # (1, 0) at later visits
    fl[2, 0, 1] = 0.2  # (0, 0) at every later visit
    prot = np.zeros((L, J), np.bool_)
    out = np.empty((L, J))
    fmoe_uses_jit.expected_uses(ist, fl, prot, out, 0, it, 1, 2.0)
    assert out[1, 0] > out[0, 0]
    fmoe_uses_jit.expected_uses(ist, fl, prot, out, 0, it, 1, 1e4)
    assert out[1, 0] < out[0, 0]
