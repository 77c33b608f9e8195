"""fMoE's token-to-token transition estimate (policies/fmoe_transition.py,
policies/fmoe_trans_jit.py): a planted transition is learned, routing without structure
leaves the marginal, probabilities and bins stay in range, memory does not grow with the
tokens, and on real routing the transitions raise the hit rate."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
MIX_TRACE = ROOT / "tests" / "fixtures" / "tiny_byte_moe_decode.trace"
sys.path.insert(0, str(ROOT))


def _arrays(L: int, J: int, K: int, slots: int = 1) -> tuple[np.ndarray, ...]:
    """Empty counts (tc, tn, tm, tau, prev) as policies.fmoe_transition keeps them."""
    return (
        np.zeros((L, J, J), np.float32),
        np.zeros((L, J + 1)),
        np.zeros((L, J)),
        np.zeros(L),
        np.full((slots, L, K), -1, np.int64),
    )


def _count(seq: np.ndarray, J: int) -> tuple[np.ndarray, ...]:
    """Counts of one request's tokens ``seq`` [T, K] at one layer, token by token."""
    from policies import fmoe_trans_jit as tj

    K = seq.shape[1]
    tc, tn, tm, tau, prev = _arrays(1, J, K)
    for t in range(len(seq)):
        tj.transition_count(tc, tn, tm, prev, 0, seq[t : t + 1], np.zeros(1, np.int64))
    tj.shrinkage(tc, tn, tm, tau, K / J)
    return tc, tn, tm, tau, prev


def _planted(T: int, J: int, rng: np.random.Generator, p: float) -> np.ndarray:
    """One expert per token: with chance ``p`` the successor (i + 1) % J of the last
    token's expert, else uniform."""
    seq = np.zeros((T, 1), np.int64)
    seq[0, 0] = rng.integers(J)
    for t in range(1, T):
        seq[t, 0] = (seq[t - 1, 0] + 1) % J if rng.random() < p else rng.integers(J)
    return seq


def test_planted_transition_raises_the_successors_chance_above_the_marginal() -> None:
    from policies import fmoe_trans_jit as tj

    J = 8
    seq = _planted(4000, J, np.random.default_rng(0), 0.6)
    tc, tn, tm, tau, _ = _count(seq, J)
    assert tau[0] > 0  # the counts show structure
    base = 1 / J
    for i in range(J):
        prev = np.array([i], np.int64)
        succ = tj.transition_chance(tc, tn, tm, tau, 0, prev, (i + 1) % J, base)
        marg = (tm[0, (i + 1) % J] + base) / (tn[0, J] + 1)
        # the planted successor: 0.6 + 0.4 / 8 = 0.65 against a marginal near 1/8
        assert succ > 0.5 > 2 * marg
        other = tj.transition_chance(tc, tn, tm, tau, 0, prev, (i + 3) % J, base)
        assert other < marg


def test_no_structure_leaves_the_marginal_within_noise() -> None:
    from policies import fmoe_trans_jit as tj

    J, K, T = 8, 2, 4000
    rng = np.random.default_rng(1)
    seq = np.array([rng.choice(J, K, replace=False) for _ in range(T)], np.int64)
    tc, tn, tm, tau, _ = _count(seq, J)
    base = K / J
    for i in range(J):
        for j in range(J):
            m = (tm[0, j] + base) / (tn[0, J] + 1)
            c = tj.transition_chance(tc, tn, tm, tau, 0, np.array([i, -1]), j, base)
            # shrunk toward m: within the sampling error of one row's rate (n ~ T K / J)
            sd = np.sqrt(m * (1 - m) / max(tn[0, i], 1))
            assert abs(c - m) <= 3 * sd


def test_no_latest_token_or_no_structure_gives_the_plain_bins() -> None:
    from policies import fmoe_jit
    from policies import fmoe_trans_jit as tj

    L, J, K = 2, 6, 2
    rng = np.random.default_rng(2)
    rc = rng.integers(0, 5, (1, L, J)).astype(float)
    rn = np.full((1, L), 10.0)
    pop = np.zeros((0, 0))
    plain = np.zeros((4, L, J), np.int64)
    fmoe_jit.request_bins(plain, rc, rn, np.zeros(1, np.int64), K / J, 10, -1, pop)
    tc, tn, tm, tau, prev = _arrays(L, J, K)
    ist = np.zeros_like(plain)
    tj.transition_bins(
        ist, tc, tn, tm, tau, prev, rc, rn, np.zeros(1, np.int64), pop, K / J, 10, -1
    )
    assert np.array_equal(ist[3], plain[3])  # no latest token
    prev[:] = 1
    tj.transition_bins(
        ist, tc, tn, tm, tau, prev, rc, rn, np.zeros(1, np.int64), pop, K / J, 10, -1
    )
    assert np.array_equal(ist[3], plain[3])  # tau = 0: no structure shown


@settings(max_examples=25, deadline=None)
@given(
    J=st.integers(2, 12),
    K=st.integers(1, 3),
    T=st.integers(1, 60),
    requests=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_chances_and_bins_in_range_and_memory_fixed(
    J: int, K: int, T: int, requests: int, seed: int
) -> None:
    from policies import fmoe_trans_jit as tj

    K = min(K, J)
    L = 2
    rng = np.random.default_rng(seed)
    tc, tn, tm, tau, prev = _arrays(L, J, K, requests)
    shapes = [a.shape for a in (tc, tn, tm, tau, prev)]
    for _ in range(T):
        s = int(rng.integers(requests))
        for lay in range(L):
            ids = np.array([rng.choice(J, K, replace=False)], np.int64)
            tj.transition_count(tc, tn, tm, prev, lay, ids, np.array([s], np.int64))
    tj.shrinkage(tc, tn, tm, tau, K / J)
    assert [a.shape for a in (tc, tn, tm, tau, prev)] == shapes  # bounded: L x J x J
    assert float(tc.sum()) == K * K * (float(tn[:, :J].sum()) / K)  # each i gets K successors
    for lay in range(L):
        for s in range(requests):
            for j in range(J):
                c = tj.transition_chance(tc, tn, tm, tau, lay, prev[s, lay], j, K / J)
                assert 0.0 <= c <= 1.0
    rc = rng.integers(0, 4, (requests, L, J)).astype(float)
    rn = rc.sum(axis=2) / K + 1
    ist = np.zeros((4, L, J), np.int64)
    slots = np.arange(requests, dtype=np.int64)
    tj.transition_bins(ist, tc, tn, tm, tau, prev, rc, rn, slots, np.zeros((0, 0)), K / J, 10, -1)
    assert ist[3].min() >= 0 and ist[3].max() <= 9


@cache
def _routed_hit(share: float, **opts: object) -> tuple[float, bool]:
    from experiments.fmoe_vs_baselines import trace_workload
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware

    w = trace_workload(str(MIX_TRACE), "mixtral-8x7b")
    cfg = SimConfig(
        model=w.spec,
        hardware=load_hardware("a100-80gb-pcie4"),
        policy="fmoe",
        policy_options=dict(opts),
        cache_experts=int(w.spec.num_moe_layers * w.spec.num_experts * share),
        train_fraction=0.7,
    )
    res = simulate(w, cfg)
    meta = res.metrics["policy_metadata"]
    return float(res.metrics["hit_rate_routed"]), bool(meta["transitions"])


def test_transitions_on_real_routing_keep_the_next_tokens_experts() -> None:
    """The trained Mixtral-shaped trace, whose consecutive-token reuse is at chance but
    whose experts follow each other (docs/fmoe.md): the transitions raise the hit rate."""
    on, on_flag = _routed_hit(0.25, transitions=True)
    off, off_flag = _routed_hit(0.25, transitions=False)
    assert on_flag and not off_flag
    assert on > off
