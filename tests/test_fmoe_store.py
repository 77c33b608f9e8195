"""Expert Map Store: search primitives, RDY replacement (step 6), save/load, invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.expert_map_store import ExpertMapStore, safe_cosine, unit_rows
from specs.errors import InputError


def _onehot_map(L: int, J: int, experts: list[int]) -> np.ndarray:
    m = np.zeros((L, J), np.float32)
    m[np.arange(L), experts] = 1.0
    return m


def _random_rows(
    rng: np.random.Generator, n: int, L: int, J: int, H: int
) -> tuple[np.ndarray, np.ndarray]:
    logits = rng.normal(size=(n, L, J)) * 2
    maps = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return maps.astype(np.float32), rng.normal(size=(n, H)).astype(np.float32)


def test_semantic_cosine_picks_the_row_pointing_the_same_way():
    store = ExpertMapStore(4, num_layers=2, num_experts=3)
    emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], np.float32)
    store.add_batch(np.stack([_onehot_map(2, 3, [i % 3, 0]) for i in range(4)]), emb)
    # long vector along row 2's direction plus a little of row 0's: cosine ignores length
    q = store.prepare(np.array([[0.2, 0.0, 5.0]]))
    scores = store.semantic_scores(q)
    assert scores.shape == (1, 4)
    assert int(np.argmax(scores[0])) == 2
    np.testing.assert_allclose(scores[0, 2], 5.0 / np.hypot(0.2, 5.0), rtol=1e-5)


def test_trajectory_prefix_cosine_picks_the_row_with_the_same_prefix():
    L, J = 3, 4
    maps = np.stack(
        [_onehot_map(L, J, [0, 1, 2]), _onehot_map(L, J, [0, 2, 3]), _onehot_map(L, J, [1, 2, 3])]
    )
    store = ExpertMapStore(3, L, J)
    store.add_batch(maps)
    observed = np.zeros((1, L, J), np.float32)
    observed[0, 0, 0] = observed[0, 1, 2] = 1.0  # prefix (0, 2): row 1
    dots = store.layer_dots(0, observed[:, 0]) + store.layer_dots(1, observed[:, 1])
    sims = safe_cosine(
        dots, np.linalg.norm(observed[:, :2].reshape(1, -1), axis=1), store.prefix_norms(1)
    )
    np.testing.assert_allclose(sims[0], [0.5, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(store.prefix_dots(np.arange(3), observed, 2), dots, atol=1e-6)


def test_rdy_replaces_the_most_redundant_row():
    L, J = 2, 4
    store = ExpertMapStore(3, L, J, prefetch_distance=1)
    maps = np.stack(
        [_onehot_map(L, J, [0, 1]), _onehot_map(L, J, [2, 3]), _onehot_map(L, J, [1, 0])]
    )
    emb = np.eye(3, dtype=np.float32)
    store.add_batch(maps, emb)
    slots = store.add_batch(_onehot_map(L, J, [2, 3])[None], np.array([[0.0, 1.0, 0.1]]))
    assert slots.tolist() == [1]
    np.testing.assert_array_equal(store.maps[:, 1], _onehot_map(L, J, [2, 3]))
    assert store.size == 3


def test_rdy_weights_follow_the_prefetch_distance():
    """Row 0 matches the new row's embedding, row 1 its map: d/L decides which goes."""
    L, J = 4, 4
    maps = np.stack([_onehot_map(L, J, [0, 0, 0, 0]), _onehot_map(L, J, [1, 1, 1, 1])])
    emb = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    new_map, new_emb = _onehot_map(L, J, [1, 1, 1, 1])[None], np.array([[1.0, 0.0]], np.float32)
    for d, expected in [(1, 1), (3, 0)]:  # RDY weights 1/4 sem + 3/4 traj, then 3/4 sem + 1/4 traj
        store = ExpertMapStore(2, L, J, prefetch_distance=d)
        store.add_batch(maps, emb)
        assert store.add_batch(new_map, new_emb).tolist() == [expected]


def test_batch_insert_equals_one_at_a_time_and_precomputed_sims_agree():
    rng = np.random.default_rng(3)
    L, J, H, C = 3, 5, 6, 7
    maps, emb = _random_rows(rng, 20, L, J, H)
    one = ExpertMapStore(C, L, J, prefetch_distance=2)
    for i in range(20):
        one.add_batch(maps[i : i + 1], emb[i : i + 1])
    batch = ExpertMapStore(C, L, J, prefetch_distance=2)
    batch.add_batch(maps[:4], emb[:4])
    batch.add_batch(maps[4:], emb[4:])
    pre = ExpertMapStore(C, L, J, prefetch_distance=2)
    pre.add_batch(maps[:7], emb[:7])
    q = pre.prepare(emb[7:])
    flat = maps[7:].reshape(13, -1)
    stored = pre.stored_maps().reshape(C, -1)
    traj = safe_cosine(
        flat @ stored.T, np.linalg.norm(flat, axis=1), np.linalg.norm(stored, axis=1)
    )
    pre.add_batch(maps[7:], q, sem=pre.semantic_scores(q), traj=traj, prepared=True)
    for other in (batch, pre):
        np.testing.assert_allclose(other.maps, one.maps, atol=1e-6)
        np.testing.assert_allclose(other.emb, one.emb, atol=1e-6)
    assert one.size == C and one.version == 20


def test_changed_since_names_rows_written_after_a_version():
    store = ExpertMapStore(2, 1, 2)
    store.add_batch(np.ones((2, 1, 2), np.float32))
    v = store.version
    assert store.changed_since(v).tolist() == []
    store.add_batch(np.array([[[1.0, 0.0]]], np.float32))
    assert len(store.changed_since(v)) == 1 and store.version == v + 1


def test_rows_without_embeddings_score_zero_semantically():
    store = ExpertMapStore(3, 1, 2)
    store.add_batch(np.ones((1, 1, 2), np.float32))  # no embedding yet
    store.add_batch(np.ones((1, 1, 2), np.float32), np.array([[3.0, 4.0]]))
    scores = store.semantic_scores(store.prepare(np.array([[3.0, 4.0]])))
    np.testing.assert_allclose(scores, [[0.0, 1.0]], atol=1e-6)


def test_projection_shrinks_embeddings_and_keeps_the_nearest_row():
    rng = np.random.default_rng(0)
    maps, emb = _random_rows(rng, 50, 2, 4, 512)
    full = ExpertMapStore(50, 2, 4)
    small = ExpertMapStore(50, 2, 4, project_dim=64)
    full.add_batch(maps, emb)
    small.add_batch(maps, emb)
    assert small.embed_width == 64 and full.embed_width == 512
    assert small.emb.nbytes * 8 == full.emb.nbytes  # the projection matrix itself is fixed-size
    q = emb[17:18] + 0.05 * rng.normal(size=(1, 512))
    assert int(np.argmax(small.semantic_scores(small.prepare(q)))) == 17
    with pytest.raises(InputError, match="width"):
        small.prepare(np.ones((1, 7)))


def test_nbytes_counts_the_preallocated_arrays():
    store = ExpertMapStore(10, 4, 8)
    store.add_batch(np.ones((1, 4, 8), np.float32), np.ones((1, 16)))
    assert store.nbytes == 10 * 4 * 8 * 4 + 2 * 10 * 4 * 4 + 10 * 16 * 4 + 10 * 8


def test_bad_maps_are_input_errors():
    store = ExpertMapStore(2, 2, 3)
    with pytest.raises(InputError, match="shape"):
        store.add_batch(np.ones((1, 3, 3)))
    with pytest.raises(InputError, match="non-finite"):
        store.add_batch(np.full((1, 2, 3), np.nan))
    with pytest.raises(InputError, match="capacity"):
        ExpertMapStore(0, 2, 3)


def test_save_load_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    maps, emb = _random_rows(rng, 6, 3, 4, 8)
    store = ExpertMapStore(5, 3, 4, prefetch_distance=2, project_dim=4, project_seed=9)
    store.add_batch(maps, emb)
    path = tmp_path / "s" / "store.npz"
    store.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["store.npz"]  # no temp file left
    back = ExpertMapStore.load(path)
    assert (back.size, back.capacity, back.prefetch_distance, back.embed_width) == (5, 5, 2, 4)
    np.testing.assert_allclose(back.stored_maps(), store.stored_maps())
    np.testing.assert_allclose(back.emb[:5], store.emb[:5])
    np.testing.assert_allclose(back.cumsq[:, :5], store.cumsq[:, :5], rtol=1e-6)
    # same projection after load: a query lands on the same scores
    np.testing.assert_allclose(
        back.semantic_scores(back.prepare(emb[:1])),
        store.semantic_scores(store.prepare(emb[:1])),
        atol=1e-6,
    )
    assert ExpertMapStore.load(path, capacity=9).capacity == 9
    with pytest.raises(InputError, match="exceed capacity"):
        ExpertMapStore.load(path, capacity=3)
    with pytest.raises(InputError, match="no such file"):
        ExpertMapStore.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not an expert map store"):
        ExpertMapStore.load(bad)
    np.savez(tmp_path / "other.npz", maps=np.ones(3))
    with pytest.raises(InputError, match="missing field"):
        ExpertMapStore.load(tmp_path / "other.npz")


@settings(max_examples=20)
@given(
    capacity=st.integers(1, 6),
    batches=st.lists(st.integers(0, 5), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
    with_emb=st.booleans(),
)
def test_store_never_exceeds_capacity_and_slots_are_valid(capacity, batches, seed, with_emb):
    rng = np.random.default_rng(seed)
    store = ExpertMapStore(capacity, 2, 3, prefetch_distance=1)
    offered = 0
    for n in batches:
        maps, emb = _random_rows(rng, n, 2, 3, 4)
        slots = store.add_batch(maps, emb if with_emb else None)
        offered += n
        assert store.size == min(capacity, offered) <= capacity
        assert ((0 <= slots) & (slots < store.size)).all()
        if n:  # the last row offered is always kept where it was written
            np.testing.assert_allclose(store.maps[:, slots[-1]], maps[-1], atol=1e-7)
    # prefix norms agree with the stored maps
    sq = (store.stored_maps() ** 2).sum((1, 2))
    np.testing.assert_allclose(store.cumsq[-1, : store.size], sq, rtol=1e-5)
    np.testing.assert_allclose(store.inv_prefix[-1, : store.size], 1 / np.sqrt(sq), rtol=1e-5)
    q = store.prepare(rng.normal(size=(3, 4)))
    s = store.semantic_scores(q)
    assert s.shape == (3, store.size) and (np.abs(s) <= 1 + 1e-5).all()


def test_unit_rows_keeps_zero_rows_zero():
    out = unit_rows(np.array([[0.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(out, [[0, 0], [0.6, 0.8]])
