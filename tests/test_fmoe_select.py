"""fMoE steps 3-4: the similarity-aware threshold and prefetch priorities."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.fmoe_select import (
    merge_priorities,
    select_experts,
    select_row,
    select_rows,
    topk_rows,
)

ROW = np.array([[0.1, 0.5, 0.1, 0.3]], np.float32)  # sorted: e1 .5, e3 .3, e0 .1, e2 .1


@pytest.mark.parametrize(
    "score, k, expected",
    [
        (1.0, 1, {1}),  # confident: delta 0 -> just top-K
        (0.5, 1, {1}),  # delta .5 reached by e1 alone
        (0.3, 1, {1, 3}),  # delta .7 needs .5 + .3
        (0.15, 1, {0, 1, 3}),  # delta .85 needs a third (tie .1/.1 -> lower id)
        (0.0, 1, {0, 1, 2, 3}),  # delta 1 needs all
        (-0.4, 1, {0, 1, 2, 3}),  # negative cosine clips to delta 1
        (1.0, 2, {1, 3}),  # never fewer than K
    ],
)
def test_delta_threshold_selects_the_right_count(score, k, expected):
    mask = select_experts(ROW, np.array([score]), top_k=k)
    assert set(np.flatnonzero(mask[0]).tolist()) == expected


def test_fixed_top_k_ignores_the_score():
    for score in (0.0, 0.5, 1.0):
        mask = select_experts(ROW, np.array([score]), top_k=2, use_delta=False)
        assert set(np.flatnonzero(mask[0])) == {1, 3}


def test_zero_probability_experts_beyond_k_are_not_fetched():
    row = np.array([[0.0, 0.7, 0.0, 0.3]], np.float32)  # a top-K row with zeros elsewhere
    mask = select_experts(row, np.array([0.0]), top_k=1)
    assert set(np.flatnonzero(mask[0])) == {1, 3}


@given(
    probs=st.lists(st.floats(0, 1, width=32), min_size=2, max_size=9),
    score=st.floats(-1, 1, width=32),
    k=st.integers(1, 9),
)
def test_selection_count_is_between_k_and_j_and_takes_the_most_likely(probs, score, k):
    p = np.array([probs], np.float32)
    J = p.shape[1]
    mask = select_experts(p, np.array([score]), top_k=k)
    n = int(mask.sum())
    assert min(k, J) <= n <= J
    # everything chosen is at least as likely as everything left out
    if n < J:
        assert p[0][mask[0]].min() >= p[0][~mask[0]].max()
    np.testing.assert_array_equal(
        mask, select_experts(p, np.array([score]), top_k=k)
    )  # deterministic


def test_priorities_are_p_over_layer_distance_and_merge_by_max():
    probs = np.array([[0.6, 0.4, 0.0], [0.1, 0.2, 0.7]], np.float32)
    mask = np.array([[True, True, False], [False, False, True]])
    pri = merge_priorities(probs, mask, layer=5, now_layer=3)
    assert pri == pytest.approx({0: 0.3, 1: 0.2, 2: 0.35})
    both = np.array([[True, False, False], [True, False, False]])
    assert merge_priorities(probs, both, layer=1, now_layer=0) == pytest.approx({0: 0.6})
    # a nearer layer outranks a farther one at equal probability
    near = merge_priorities(probs[:1], mask[:1], layer=2, now_layer=1)[0]
    far = merge_priorities(probs[:1], mask[:1], layer=4, now_layer=1)[0]
    assert near > far
    with pytest.raises(ValueError):
        merge_priorities(probs, mask, layer=2, now_layer=2)


def test_topk_rows_scatter_weights():
    rows = topk_rows(np.array([[2, 0], [1, 3]]), np.array([[0.7, 0.3], [0.6, 0.4]]), 4)
    np.testing.assert_allclose(rows, [[0.3, 0, 0.7, 0], [0, 0.6, 0, 0.4]])


@given(
    rows=st.lists(
        st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5]), min_size=5, max_size=5),
        min_size=2,
        max_size=4,
    ),
    scores=st.lists(st.floats(-1, 1, width=32), min_size=4, max_size=4),
    k=st.integers(1, 5),
    use_delta=st.booleans(),
)
def test_one_row_path_agrees_with_the_batch_path(rows, scores, k, use_delta):
    p = np.array(rows, np.float32)
    s = np.array(scores[: len(rows)], np.float32)
    batch = select_experts(p, s, top_k=k, use_delta=use_delta)
    for b in range(len(rows)):
        np.testing.assert_array_equal(
            batch[b], select_experts(p[b : b + 1], s[b : b + 1], top_k=k, use_delta=use_delta)[0]
        )


@given(
    logits=st.lists(st.floats(-6, 6, width=32), min_size=2, max_size=12),
    score=st.floats(-1, 1, width=32),
    k=st.integers(1, 4),
    use_delta=st.booleans(),
)
def test_select_row_fast_path_equals_select_experts(logits, score, k, use_delta):
    z = np.array(logits, np.float32)
    p = (np.exp(z - z.max()) / np.exp(z - z.max()).sum()).astype(np.float32)
    mask = select_experts(p[None, :], np.array([score], np.float32), top_k=k, use_delta=use_delta)
    got = select_row(p, float(np.float32(score)), k, use_delta=use_delta)
    assert got == np.flatnonzero(mask[0]).tolist()
    assert select_row(p.tolist(), float(np.float32(score)), k, use_delta) == got  # as a list


@given(
    logits=st.lists(
        st.lists(
            st.sampled_from([-2.0, 0.0, 0.5, 3.0]) | st.floats(-6, 6, width=32),
            min_size=5,
            max_size=5,
        ),
        min_size=1,
        max_size=6,
    ),
    scores=st.lists(st.floats(-1, 1, width=32) | st.just(1.0), min_size=6, max_size=6),
    k=st.integers(1, 4),
    use_delta=st.booleans(),
    zero_last=st.booleans(),
)
def test_select_rows_equals_select_row_per_row_best_first(logits, scores, k, use_delta, zero_last):
    z = np.array(logits, np.float32)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    if zero_last:  # a probability of exactly 0: skipped beyond the top-K
        p[:, -1] = 0.0
    s = np.array(scores[: len(p)], np.float32)
    got = select_rows(p, s, k, use_delta, np.argsort(-p, axis=1, kind="stable"))
    for r in range(len(p)):
        want = select_row(p[r], float(s[r]), k, use_delta)
        assert got[r] == sorted(want, key=lambda j: (-p[r, j], j))


@pytest.mark.parametrize("score, k", [(1.0, 1), (0.5, 1), (0.3, 1), (0.15, 1), (0.0, 1), (1.0, 2)])
def test_select_row_matches_the_hand_made_cases(score, k):
    mask = select_experts(ROW, np.array([score]), top_k=k)
    assert select_row(ROW[0], score, k) == np.flatnonzero(mask[0]).tolist()
    # a threshold right at the top-K mass takes the exact path and still agrees
    edge = 1.0 - float(ROW[0].max()) + 1e-6
    assert (
        select_row(ROW[0], edge, 1)
        == np.flatnonzero(select_experts(ROW, np.array([edge]), top_k=1)[0]).tolist()
    )
