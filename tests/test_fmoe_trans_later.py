"""The chance of the visits after an expert's next one (``transitions_later``,
policies/fmoe_trans_jit.py and policies/fmoe_jit.py): a planted two-step pattern is
learned, no structure gives the plain bins, the expected time to next use separates the
next visit's chance from the later visits' and is the earlier rule when they agree."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies import fmoe_jit  # noqa: E402
from policies.fmoe_eviction import _NEVER, AGE_BUCKETS, CAL_BINS  # noqa: E402

ROWS = 3 * CAL_BINS


def _arrays(L: int, J: int, K: int) -> tuple[np.ndarray, ...]:
    """Empty counts (tc, tn, tm, tau, prev, prev2) as policies.fmoe_transition keeps them."""
    return (
        np.zeros((L, J, J), np.float32),
        np.zeros((L, J + 1)),
        np.zeros((L, J)),
        np.zeros(L),
        np.full((1, L, K), -1, np.int64),
        np.full((1, L, K), -1, np.int64),
    )


def _count_both(seq: np.ndarray, J: int, rows_per_call: int = 1) -> tuple[tuple, tuple]:
    """One- and two-step counts of one request's tokens ``seq`` [T, K] at one layer,
    ``rows_per_call`` tokens per gate (a prompt's rows come together)."""
    from policies import fmoe_trans_jit as tj

    K = seq.shape[1]
    tc, tn, tm, tau, prev, prev2 = _arrays(1, J, K)
    tc2, tn2, tm2, tau2 = (np.zeros_like(a) for a in (tc, tn, tm, tau))
    for t in range(0, len(seq), rows_per_call):
        ids = seq[t : t + rows_per_call]
        slot = np.zeros(len(ids), np.int64)
        tj.transition_count2(tc2, tn2, tm2, prev, prev2, 0, ids, slot)
        tj.transition_count(tc, tn, tm, prev, 0, ids, slot)
    tj.shrinkage(tc, tn, tm, tau, K / J)
    tj.shrinkage(tc2, tn2, tm2, tau2, K / J)
    return (tc, tn, tm, tau, prev), (tc2, tn2, tm2, tau2, prev2)


def _two_step(T: int, J: int, rng: np.random.Generator, p: float) -> np.ndarray:
    """One expert per token: with chance ``p`` the token two back's expert + 1 (mod J),
    else uniform: i -> x -> i + 1 with x unrelated to i."""
    seq = rng.integers(J, size=(T, 1)).astype(np.int64)
    for t in range(2, T):
        if rng.random() < p:
            seq[t, 0] = (seq[t - 2, 0] + 1) % J
    return seq


def test_planted_two_step_pattern_raises_the_chance_two_tokens_after() -> None:
    from policies import fmoe_trans_jit as tj

    J = 8
    seq = _two_step(6000, J, np.random.default_rng(0), 0.6)
    one, two = _count_both(seq, J)
    tc2, tn2, tm2, tau2, _ = two
    assert tau2[0] > 0  # the two-step counts show structure
    base = 1 / J
    for i in range(J):
        m = (tm2[0, (i + 1) % J] + base) / (tn2[0, J] + 1)
        c = tj.transition_chance(tc2, tn2, tm2, tau2, 0, np.array([i]), (i + 1) % J, base)
        assert c > m + 0.3  # planted 0.6 + 0.4 / J against the marginal ~ 1 / J
        # and the one-step chance of the same expert stays near the marginal
        tc, tn, tm, tau, _ = one
        m1 = (tm[0, (i + 1) % J] + base) / (tn[0, J] + 1)
        c1 = tj.transition_chance(tc, tn, tm, tau, 0, np.array([i]), (i + 1) % J, base)
        assert abs(c1 - m1) < 0.1


def test_two_step_counts_are_the_same_whether_rows_come_one_by_one_or_together() -> None:
    """A prompt's rows arrive in one gate: counted as the same tokens one by one."""
    J = 6
    seq = np.random.default_rng(3).integers(J, size=(50, 2)).astype(np.int64)
    _, a = _count_both(seq, J, 1)
    _, b = _count_both(seq, J, 7)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    # the counts hold the pairs two tokens apart, exactly
    want = np.zeros((J, J))
    for t in range(2, len(seq)):
        for i in seq[t - 2]:
            for j in seq[t]:
                want[i, j] += 1
    assert np.array_equal(a[0][0], want)


def test_no_two_step_structure_gives_the_plain_bins() -> None:
    from policies import fmoe_trans_jit as tj

    L, J, K = 2, 6, 2
    rng = np.random.default_rng(2)
    rc = rng.integers(0, 5, (1, L, J)).astype(float)
    rn = np.full((1, L), 10.0)
    pop = np.zeros((0, 0))
    plain = np.zeros((5, L, J), np.int64)
    fmoe_jit.request_bins(plain, rc, rn, np.zeros(1, np.int64), K / J, CAL_BINS, -1, pop)
    assert np.array_equal(plain[4], plain[3])  # request_bins keeps row 4 the plain bin
    tc, tn, tm, tau, prev, _ = _arrays(L, J, K)
    prev[:] = 1
    ist = plain.copy()
    ist[4] = -1
    tj.transition_bins_into(
        ist, 4, tc, tn, tm, tau, prev, rc, rn, np.zeros(1, np.int64), pop, K / J, CAL_BINS, -1
    )
    assert np.array_equal(ist[4], plain[3])  # tau = 0: the plain bins


def _state(seed: int, L: int, J: int, it: int, later: bool):
    rng = np.random.default_rng(seed)
    ist = np.zeros((5 if later else 4, L, J), np.int64)
    ist[0] = rng.integers(it - 300, it + 1, (L, J))
    ist[0][rng.random((L, J)) < 0.2] = _NEVER
    ist[1] = rng.integers(CAL_BINS, ROWS, (L, J))
    ist[2] = rng.choice([it, it - 1], L)[:, None]
    ist[3] = rng.integers(0, CAL_BINS, (L, J))
    if later:
        ist[4] = rng.integers(0, CAL_BINS, (L, J))
    fl = np.zeros((3, ROWS, AGE_BUCKETS))
    fl[1] = rng.integers(0, 50, (ROWS, AGE_BUCKETS))
    fl[0] = np.floor(fl[1] * rng.random((ROWS, AGE_BUCKETS)))
    fmoe_jit.decreasing_rows(fl, 0.25, CAL_BINS)
    prot = rng.random((L, J)) < 0.1
    return ist, fl, prot


def _b(age: int) -> int:
    return int(fmoe_jit.age_bucket1.py_func(age))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    L=st.integers(1, 8),
    J=st.integers(1, 10),
    g=st.integers(-1, 7),
    rows=st.sampled_from([1, 3]),
)
def test_expected_time_separates_the_next_visit_from_the_later_ones(
    seed: int, L: int, J: int, g: int, rows: int
) -> None:
    """With a later-visit row: a passed layer waits nxt + L (1 - p1) / p2 (p1 the next
    visit's cell, p2 the later visits'), a layer ahead p_now (l - g) + (1 - p_now) (nxt +
    L (1 / p2 - 1)); every expected time is >= the protected value (0) and chances lie
    in (0, 1]; the victims kernel gives the same values; with the later row equal to the
    next one, bit for bit the 4-row (earlier) rule."""
    it = 400
    g = min(g, L - 1)
    ist, fl, prot = _state(seed, L, J, it, True)
    tab = fl[2]
    assert np.all((tab > 0) & (tab <= 1))
    out = np.empty((L, J))
    fmoe_jit.expected_next_use(ist, fl, prot, out, g, it, CAL_BINS, rows)
    assert np.all(-out >= 0.0)
    for lay in range(L):
        nxt = float(L - g + lay)
        for j in range(J):
            if prot[lay, j]:
                assert -out[lay, j] == 0.0
                continue
            age = it - int(ist[0, lay, j])
            p2 = tab[ist[4, lay, j], _b(age + 1)]
            if lay > g:
                row = ist[1, lay, j] if ist[2, lay, 0] == it else ist[3, lay, j]
                p_now = tab[row, _b(age)]
                p_now = 1.0 - (1.0 - p_now) ** rows
                want = p_now * (lay - g) + (1 - p_now) * (nxt + L * (1 / p2 - 1))
            else:
                p1 = tab[ist[3, lay, j], _b(max(age, 0) + 1)]
                want = nxt + L * (1 - p1) / p2
            assert np.isclose(-out[lay, j], want, rtol=1e-12, atol=1e-9)
            assert -out[lay, j] >= 1.0  # an unprotected expert waits at least one step
    # the victims kernel's per-candidate values are the table's, bit for bit
    flat = np.arange(L * J)
    n = len(flat)
    vo, vs, ve = np.empty(n, np.int64), np.empty(n), np.empty(n)
    c = fmoe_jit.victims(
        ist, fl, prot, g, it, flat // J, flat % J, np.zeros(n), n, 0.0, vo, vs, ve, rows
    )
    assert c == n
    assert sorted(ve.tolist()) == sorted(out.ravel().tolist())
    # the later row equal to the next one: the earlier (4-row) rule, bit for bit
    same = ist.copy()
    same[4] = same[3]
    a, b = np.empty((L, J)), np.empty((L, J))
    fmoe_jit.expected_next_use(same, fl, prot, a, g, it, CAL_BINS, rows)
    fmoe_jit.expected_next_use(same[:4].copy(), fl, prot, b, g, it, CAL_BINS, rows)
    assert np.array_equal(a, b) and np.array_equal(np.signbit(a), np.signbit(b))


def test_a_likelier_next_visit_shortens_the_wait_only_once() -> None:
    """Same later-visit cell, a likelier next visit: the expected time of a passed layer
    drops by L (p1' - p1) / p2, not to the geometric wait of the likelier cell."""
    it, L, J = 400, 3, 2
    ist, fl, prot = _state(5, L, J, it, True)
    prot[:] = False
    ist[0] = it - 1  # age 1: the next visit's bucket b(2)
    ist[3] = [[2, 8]] * L  # expert 1's next visit is likelier
    ist[4] = 2  # both wait alike after it
    tab = fl[2]
    out = np.empty((L, J))
    fmoe_jit.expected_next_use(ist, fl, prot, out, L - 1, it, CAL_BINS, 1)
    b = _b(2)
    p1, p1b, p2 = tab[2, b], tab[8, b], tab[2, b]
    assert p1b >= p1
    got = -out[0, 0] - (-out[0, 1])
    assert np.isclose(got, L * (p1b - p1) / p2)


def _trace_run(trace: str, dims: str, share: float, **opts: object) -> tuple[float, dict]:
    from experiments.fmoe_vs_baselines import trace_workload
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware

    w = trace_workload(str(ROOT / "tests" / "fixtures" / trace), dims)
    cfg = SimConfig(
        model=w.spec,
        hardware=load_hardware("a100-80gb-pcie4"),
        policy="fmoe",
        policy_options=dict(opts),
        cache_experts=int(w.spec.num_moe_layers * w.spec.num_experts * share),
        train_fraction=0.7,
    )
    res = simulate(w, cfg)
    return float(res.metrics["hit_rate_routed"]), res.metrics["policy_metadata"]


def test_two_step_later_visits_raise_the_hit_on_the_qwen_shaped_trace_at_half() -> None:
    """End to end on the trained Qwen-shaped trace at a 50% cache, where the two-step
    chances measured better than the next visit's (docs/fmoe.md): the option is carried
    into the metadata, ``same`` is the default, and ``two`` raises the routed hit."""
    trace, dims = "tiny_byte_qwen_moe_decode.trace", "qwen1.5-moe-a2.7b"
    default, meta_d = _trace_run(trace, dims, 0.5)
    same, _ = _trace_run(trace, dims, 0.5, transitions_later="same")
    two, meta_t = _trace_run(trace, dims, 0.5, transitions_later="two")
    assert meta_d["transitions_later"] == "same" and meta_t["transitions_later"] == "two"
    assert default == same
    assert two > same
