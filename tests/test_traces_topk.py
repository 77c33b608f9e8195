"""The numba kernels of the top-K, the synthetic sampler and the sparse encoder return
exactly what their numpy references return (the code before the kernels, frozen in
tests/reference_synth.py), ties included."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import traces.topk as topk
from specs.errors import InputError
from tests import reference_synth as ref
from tests.strategies import random_workload, small_spec
from traces import topk_jit
from traces import v2_format as fmt
from traces.synth_sampling import _sample_routing, _skeleton
from traces.v2_writer import TraceWriter


def _rows(rng: np.random.Generator, n: int, J: int, levels: int | None) -> np.ndarray:
    """Softmax-like rows; with ``levels``, values rounded to that many steps (many ties),
    and one all-zero and one constant row."""
    z = rng.standard_normal((n, J)) * 3
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if levels is not None:
        p = np.round(p * levels) / levels
        p[0] = 0.0
        p[-1] = 0.25
    return p.astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    J=st.integers(2, 300),
    k=st.integers(1, 40),
    n=st.integers(2, 60),
    levels=st.sampled_from([None, 2, 7, 60]),
    seed=st.integers(0, 2**32 - 1),
)
def test_top_k_kernels_equal_numpy_ties_included(
    J: int, k: int, n: int, levels: int | None, seed: int
) -> None:
    p = _rows(np.random.default_rng(seed), n, J, levels)
    want = topk.top_k_numpy(p, k)
    ids, vals = topk.top_k_values(p, k, jit=True)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(vals, np.take_along_axis(p, want, -1))
    np.testing.assert_array_equal(topk.top_k_values(p, k, jit=False)[0], want)


def test_both_kernels_run_and_agree() -> None:
    """Widths with a power-of-two lane count use the lane kernel, others the insertion
    kernel; both match numpy on the same rows."""
    assert topk._lanes(256, 8) == 32 and topk._lanes(384, 16) == 32 and topk._lanes(8, 2) == 8
    assert topk._lanes(60, 8) == 0 and topk._lanes(3, 1) == 0 and topk._lanes(256, 32) == 0
    rng = np.random.default_rng(3)
    p = _rows(rng, 500, 256, None)
    ids, vals, tied = (
        np.empty((500, 8), np.int64),
        np.empty((500, 8), np.float32),
        np.empty(500, bool),
    )
    topk_jit.topk_insert(p, 8, ids, vals, tied)
    ids2, vals2, tied2 = ids.copy(), vals.copy(), tied.copy()
    topk_jit.topk_lanes(p.reshape(500, 8, 32), 8, ids2, vals2, tied2)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_array_equal(tied, tied2)
    np.testing.assert_array_equal(ids[~tied], topk.top_k_numpy(p, 8)[~tied])


def test_use_jit_counts_work_until_the_kernels_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "traces.topk_jit", raising=False)
    monkeypatch.setattr(topk, "_numpy_entries", 0)
    assert not topk.use_jit(topk.JIT_MIN_ENTRIES // 2)
    assert topk.use_jit(topk.JIT_MIN_ENTRIES // 2)  # the process's work adds up


def _world(rng: np.random.Generator, L: int, J: int, N: int):
    f32 = np.float32
    pop = rng.standard_normal((L, J)).astype(f32)
    topic_logits = (0.5 * rng.standard_normal((3, L, J))).astype(f32)
    kind_logits = (3 * rng.standard_normal((5, L, J))).astype(f32)
    trans = (3 * rng.standard_normal((L, J, J))).astype(f32)
    return pop, topic_logits, kind_logits, trans, rng.integers(0, 3, N), rng.integers(0, 5, N)


@settings(max_examples=20, deadline=None)
@given(
    L=st.integers(1, 5),
    J=st.sampled_from([4, 6, 8, 33, 64]),
    K=st.integers(1, 6),
    noise=st.sampled_from([0.0, 1.0, 2.5]),
    reuse=st.floats(0, 1),
    normalize=st.booleans(),
    lookahead=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sampler_draws_exactly_what_the_reference_draws(
    L: int, J: int, K: int, noise: float, reuse: float, normalize: bool, lookahead: bool, seed: int
) -> None:
    K = min(K, J)
    spec = small_spec(layers=L, experts=J, top_k=K)
    rng = np.random.default_rng(seed)
    sk = _skeleton(rng.integers(1, 9, 6), rng.integers(1, 9, 6), np.zeros(6))
    pop, tl, kl, tr, topic, kind = _world(rng, L, J, sk.num_tokens)
    base = ref.base_logits(pop, tl, kl, tr, topic, kind)
    reuse_l = np.linspace(0, reuse, L)
    args = (reuse_l, noise, 1.5, normalize, 1.2, True, lookahead)
    want = ref.sample_routing(sk, spec, np.random.default_rng([seed, 1]), base, *args)
    for jit in (False, True):
        got = _sample_routing(sk, spec, np.random.default_rng([seed, 1]), base, *args, jit=jit)
        for w, g in zip(want, got, strict=True):
            if w is None:
                assert g is None
            else:
                np.testing.assert_array_equal(g, w)


@settings(max_examples=15, deadline=None)
@given(
    L=st.integers(1, 4),
    J=st.sampled_from([5, 8, 64]),
    K=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_base_logits_kernel_equals_numpy(L: int, J: int, K: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    N = 40
    pop, tl, kl, tr, topic, kind = _world(rng, L, J, N)
    base = ref.base_logits(pop, tl, kl, tr, topic, kind)
    prev = rng.integers(0, J, (N, K))
    for layer in range(L):
        out = np.empty((N, J), np.float32)
        topk_jit.base_logits(pop, tl, kl, tr, layer, topic, kind, prev, out)
        np.testing.assert_array_equal(out, base(layer, prev if K else None))


@settings(max_examples=20, deadline=None)
@given(
    J=st.sampled_from([6, 16, 64, 256]),
    n=st.sampled_from([8, 16]),
    levels=st.sampled_from([None, 5]),
    jit=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_sparse_encoding_equals_the_reference(
    J: int, n: int, levels: int | None, jit: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    rows = _rows(rng, 3 * 4, J, levels).reshape(3, 4, J)
    top_n = min(n, J - 1)
    ids_dt = fmt.id_dtype(J)
    old = topk.use_jit
    try:
        topk.use_jit = lambda entries: jit  # type: ignore[assignment]
        got = fmt.encode_probs(rows, top_n, ids_dt)
    finally:
        topk.use_jit = old  # type: ignore[assignment]
    want = ref.encode_probs(rows, top_n, ids_dt)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype


def test_writer_still_names_an_out_of_range_probability(tmp_path) -> None:
    spec = small_spec()
    w = random_workload(spec, num_requests=2, seed=4)
    bad = w.requests[1].routing.gate_probs.copy()
    bad[2, 1, 0] = 1.5
    w.requests[1].routing.gate_probs = bad
    with pytest.raises(InputError, match=r"request 'r1'.*gate_probs.*row 2.*outside \[0, 1\]"):
        with TraceWriter(tmp_path / "x.trace", spec) as tw:
            for r in w.requests:
                tw.add(r)
    assert not (tmp_path / "x.trace").exists()


def test_a_stream_reuses_row_memory_only_once_the_previous_chunk_is_gone() -> None:
    """A consumer that keeps every request (list) and one that drops each after use (the
    trace writer) see the same rows; the kept chunks never share memory."""
    from specs.presets import load_model
    from traces.synth import SynthConfig, generate_stream

    spec = load_model("mixtral-8x7b")
    cfg = SynthConfig(num_requests=12, seed=2, prompt_len_mean=20.0, output_len_mean=20.0)
    kept = generate_stream(spec, cfg, budget_bytes=300_000)
    reqs = list(kept.requests)
    assert kept.provenance["chunks"] > 2
    dropped = []
    for r in generate_stream(spec, cfg, budget_bytes=300_000).requests:
        dropped.append({n: getattr(r.routing, n).copy() for n in ("gate_probs", "lookahead")})
        del r
    for r, d in zip(reqs, dropped, strict=True):
        for n in ("gate_probs", "lookahead"):
            np.testing.assert_array_equal(getattr(r.routing, n), d[n])
    first, last = reqs[0].routing.gate_probs, reqs[-1].routing.gate_probs
    assert not np.shares_memory(first, last)
