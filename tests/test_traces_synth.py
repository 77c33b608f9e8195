"""The synthetic generator: validity, determinism, every knob moving its statistic, and fit."""

from __future__ import annotations

import numpy as np
import pytest

from specs.errors import InputError
from specs.presets import load_model
from tests.strategies import small_spec
from traces import stats
from traces.importers import import_trace
from traces.synth import SynthConfig, fit, generate
from traces.types import Workload

SPEC = load_model("mixtral-8x7b").model_copy(update={"num_layers": 6})
SHORT = {"num_requests": 80, "prompt_len_mean": 10.0, "output_len_mean": 20.0, "seed": 5}


def gen(**knobs) -> Workload:
    return generate(SPEC, SynthConfig(**{**SHORT, **knobs}))


def flat(w: Workload, name: str) -> np.ndarray:
    return np.concatenate([getattr(r.routing, name) for r in w.requests])


def test_default_workload_is_valid_and_complete() -> None:
    w = gen()
    w.validate()
    info = w.info()
    assert info["has_gate_probs"] and info["has_embeddings"] and info["has_lookahead"]
    assert all(0 <= r.tags["topic"] < 8 for r in w.requests)
    assert flat(w, "embeddings").shape[1] == 64


def test_deterministic_in_seed() -> None:
    a, b, c = gen(), gen(), gen(seed=6)
    np.testing.assert_array_equal(flat(a, "topk_ids"), flat(b, "topk_ids"))
    np.testing.assert_array_equal(flat(a, "embeddings"), flat(b, "embeddings"))
    assert [r.prompt_len for r in a.requests] != [r.prompt_len for r in c.requests]


def test_world_seed_keeps_structure_across_token_seeds() -> None:
    """Two draws of one world share expert popularity; another world does not."""
    a = gen(seed=1, world_seed=42, num_requests=150)
    b = gen(seed=2, world_seed=42, num_requests=150)
    c = gen(seed=2, world_seed=43, num_requests=150)
    pa, pb, pc = stats.popularity(a), stats.popularity(b), stats.popularity(c)
    assert np.abs(pa - pb).sum(axis=1).mean() < 0.5 * np.abs(pa - pc).sum(axis=1).mean()


def test_gate_rows_are_softmax_whose_top_k_are_the_ids() -> None:
    w = gen(normalize_topk=True)
    probs, ids, wts = flat(w, "gate_probs"), flat(w, "topk_ids"), flat(w, "topk_weights")
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    top = np.argsort(-probs, axis=-1, kind="stable")[..., : SPEC.top_k]
    np.testing.assert_array_equal(np.sort(top, -1), np.sort(ids, -1))
    np.testing.assert_allclose(wts.sum(-1), 1.0, rtol=1e-5)
    raw = gen(normalize_topk=False)
    rp, ri, rw = flat(raw, "gate_probs"), flat(raw, "topk_ids"), flat(raw, "topk_weights")
    np.testing.assert_allclose(rw, np.take_along_axis(rp, ri.astype(np.int64), -1), rtol=1e-6)
    assert (rw.sum(-1) < 1).all()


def _lookahead_agreement(w: Workload) -> float:
    look, ids = flat(w, "lookahead"), flat(w, "topk_ids")
    assert (look[:, -1] == 0).all()  # the last layer has no next gate
    return float((look[:, :-1].argmax(-1) == ids[:, 1:, 0]).mean())


def test_lookahead_agrees_with_next_layer_above_chance_and_noise_lowers_it() -> None:
    # how often a real model's lookahead rows agree is not measured (docs/workloads.md);
    # what the knob must do: agree far above chance (1/J), less with more noise
    agree = {n: _lookahead_agreement(gen(lookahead_noise=n)) for n in (0.0, 0.3, 3.0)}
    default = _lookahead_agreement(gen())
    assert agree[0.0] == 1.0  # no noise: the next layer's own logits
    assert default > 3 / SPEC.num_experts
    assert agree[0.3] > default > agree[3.0]


def test_optional_fields_can_be_switched_off() -> None:
    w = gen(with_gate_probs=False, with_embeddings=False, with_lookahead=False)
    info = w.info()
    assert not (info["has_gate_probs"] or info["has_embeddings"] or info["has_lookahead"])
    w.validate()


# -- every knob moves its statistic ----------------------------------------------------------------
def test_more_skew_gives_higher_top_expert_share() -> None:
    shares = [stats.top_expert_share(gen(popularity_skew=s)).mean() for s in (0.0, 1.5, 3.0)]
    assert shares[0] < shares[1] < shares[2]


def test_per_layer_skew() -> None:
    w = gen(
        popularity_skew=[0.0, 0.0, 0.0, 4.0, 4.0, 4.0],
        topic_strength=0.0,
        kind_strength=0.0,
        affinity=0.0,
    )
    share = stats.top_expert_share(w)
    assert share[3:].min() > share[:3].max()
    with pytest.raises(InputError, match="popularity_skew has 2 values but the model has 6"):
        gen(popularity_skew=[1.0, 2.0])


def test_more_affinity_gives_more_cross_layer_information() -> None:
    mi = [stats.affinity_mi(gen(affinity=a)).mean() for a in (0.0, 2.0, 5.0)]
    assert mi[0] < mi[1] < mi[2]


def test_more_temporal_locality_gives_more_reuse_and_shorter_distances() -> None:
    ws = [gen(temporal_locality=t, temporal_locality_mid=None) for t in (0.0, 0.4, 0.8)]
    rates = [stats.reuse_rate(w).mean() for w in ws]
    dists = [stats.reuse_distances(w).mean() for w in ws]
    assert rates[0] < rates[1] < rates[2]
    assert dists[0] > dists[1] > dists[2]


def test_temporal_locality_rises_with_depth_from_temporal_locality_first() -> None:
    straight = {"temporal_locality_mid": None}
    ramp = stats.reuse_rate(gen(temporal_locality=0.6, temporal_locality_first=0.0, **straight))
    flat_rate = stats.reuse_rate(
        gen(temporal_locality=0.6, temporal_locality_first=None, **straight)
    )
    assert ramp[-1] > ramp[0] + 0.3  # layer 0 routes by the token itself, deep layers by context
    assert flat_rate.max() - flat_rate.min() < 0.15


def test_temporal_locality_mid_peaks_the_profile_in_the_middle() -> None:
    """first -> mid -> last: the Mixtral paper's Table 5 shape (layer 15 above 0 and 31)."""
    knobs = {"temporal_locality_first": 0.0, "temporal_locality": 0.1, "affinity": 0.0}
    peak = stats.first_choice_repeat_rate(gen(temporal_locality_mid=0.7, **knobs))
    straight = stats.first_choice_repeat_rate(gen(temporal_locality_mid=None, **knobs))
    mid = len(peak) // 2
    assert peak[mid] > max(peak[0], peak[-1]) + 0.3
    assert peak[mid] > straight[mid] + 0.3


def test_locality_profile_passes_through_its_three_points() -> None:
    from traces.synth import locality_profile

    prof = locality_profile(0.1, 0.5, 0.2, 5)
    np.testing.assert_allclose(prof, [0.1, 0.3, 0.5, 0.35, 0.2])
    np.testing.assert_allclose(locality_profile(0.1, None, 0.5, 3), [0.1, 0.3, 0.5])
    np.testing.assert_allclose(locality_profile(0.1, 0.9, 0.5, 1), [0.5])


def test_shared_kinds_route_alike_across_topics() -> None:
    """With a shared kind vocabulary, a token's embedding nearest neighbour in *another*
    topic still routes like it; with per-topic kinds it does not."""

    def cross_topic_overlap(w: Workload) -> float:
        emb, ids = flat(w, "embeddings"), flat(w, "topk_ids")[:, 0]  # layer 0: no copies
        topic = np.concatenate([[r.tags["topic"]] * r.routing.num_tokens for r in w.requests])
        rng = np.random.default_rng(2)
        pick = rng.choice(len(emb), 1500, replace=False)
        e = emb[pick] / np.linalg.norm(emb[pick], axis=1, keepdims=True)
        sim = e @ e.T
        sim[topic[pick][:, None] == topic[pick][None, :]] = -np.inf  # other topics only
        nn = sim.argmax(axis=1)
        i = ids[pick]
        return float((i[:, :, None] == i[nn][:, None, :]).any(-1).mean())

    routed = {"kind_strength": 3.0, "kind_embedding_scale": 2.0}  # kinds that route, apart
    shared = cross_topic_overlap(gen(num_kinds=16, kinds_per_topic=8, **routed))
    own = cross_topic_overlap(gen(num_kinds=None, kinds_per_topic=8, **routed))
    assert shared > own + 0.1
    with pytest.raises(InputError, match="kinds_per_topic"):
        gen(num_kinds=4, kinds_per_topic=8)


def _topic_separation(w: Workload, vectors: list[np.ndarray]) -> float:
    """Mean cosine of same-topic request pairs minus that of different-topic pairs."""
    v = np.array(vectors, dtype=float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    t = np.array([r.tags["topic"] for r in w.requests])
    same = t[:, None] == t[None, :]
    off_diag = ~np.eye(len(t), dtype=bool)
    return float(sim[same & off_diag].mean() - sim[~same].mean())


def _activation(w: Workload) -> list[np.ndarray]:
    J = w.spec.num_experts
    return [
        np.stack(
            [
                np.bincount(r.routing.topk_ids[:, layer].ravel(), minlength=J)
                for layer in range(w.spec.num_moe_layers)
            ]
        ).ravel()
        for r in w.requests
    ]


def test_requests_of_a_topic_route_alike_more_with_topic_strength() -> None:
    seps = [
        _topic_separation(w, _activation(w))
        for w in (gen(topic_strength=s) for s in (0.0, 1.0, 3.0))
    ]
    assert seps[0] < seps[1] < seps[2]
    assert seps[1] > 0.05


def test_requests_of_a_topic_carry_nearby_embeddings() -> None:
    def mean_emb(w: Workload) -> list[np.ndarray]:
        return [r.routing.embeddings.mean(axis=0) for r in w.requests]

    w = gen()
    assert _topic_separation(w, mean_emb(w)) > 0.5


def _token_cosine_same_topic(w: Workload) -> float:
    emb = flat(w, "embeddings")
    topic = np.repeat(
        [r.tags["topic"] for r in w.requests], [r.routing.num_tokens for r in w.requests]
    )
    rng = np.random.default_rng(0)
    i = rng.integers(0, len(emb), 4000)
    j = rng.integers(0, len(emb), 4000)
    keep = (topic[i] == topic[j]) & (i != j)
    a, b = emb[i[keep]], emb[j[keep]]
    return float((np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_more_embedding_noise_spreads_a_topic() -> None:
    cos = [_token_cosine_same_topic(gen(embedding_noise=n)) for n in (0.1, 1.0, 3.0)]
    assert cos[0] > cos[1] > cos[2]


def _nearest_neighbour_overlap(w: Workload, n: int = 2500) -> tuple[float, float]:
    """Expert overlap of each token with its embedding nearest neighbour, and with a random token."""
    emb, ids = flat(w, "embeddings"), flat(w, "topk_ids")
    rng = np.random.default_rng(1)
    pick = rng.choice(len(emb), min(n, len(emb)), replace=False)
    e = emb[pick] / np.linalg.norm(emb[pick], axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    nn = sim.argmax(axis=1)
    i = ids[pick]

    def overlap(a: np.ndarray, b: np.ndarray) -> float:
        return float((a[..., :, None] == b[..., None, :]).any(-1).mean())

    return overlap(i, i[nn]), overlap(i, i[rng.permutation(len(pick))])


def test_semantically_similar_tokens_route_alike_more_with_kind_strength() -> None:
    weak_nn, weak_rand = _nearest_neighbour_overlap(gen(kind_strength=0.0))
    strong_nn, strong_rand = _nearest_neighbour_overlap(gen(kind_strength=3.0))
    assert strong_nn - strong_rand > weak_nn - weak_rand
    assert strong_nn > strong_rand + 0.1


def test_topic_count_and_skew() -> None:
    many = gen(num_topics=3, num_requests=120)
    assert {r.tags["topic"] for r in many.requests} == {0, 1, 2}
    top_share = []
    for skew in (0.0, 2.0):
        w = gen(
            num_topics=6,
            topic_skew=skew,
            num_requests=300,
            with_gate_probs=False,
            with_lookahead=False,
        )
        counts = np.bincount([r.tags["topic"] for r in w.requests], minlength=6)
        top_share.append(counts.max() / counts.sum())
    assert top_share[1] > top_share[0] + 0.2


@pytest.mark.parametrize(("preset", "means"), [("lmsys", (37, 127)), ("sharegpt", (43, 122))])
def test_length_presets_match_paper_means(preset: str, means: tuple[int, int]) -> None:
    cfg = SynthConfig(
        num_requests=3000,
        preset=preset,
        with_gate_probs=False,
        with_embeddings=False,
        with_lookahead=False,
    )
    w = generate(small_spec(layers=1, experts=4, top_k=1), cfg)
    p = np.mean([r.prompt_len for r in w.requests])
    o = np.mean([r.output_len for r in w.requests])
    assert abs(p - means[0]) / means[0] < 0.08
    assert abs(o - means[1]) / means[1] < 0.08


def test_fixed_lengths_and_arrivals() -> None:
    w = gen(length_sigma=0.0, arrival="fixed", arrival_rate=4.0)
    assert {(r.prompt_len, r.output_len) for r in w.requests} == {(10, 20)}
    np.testing.assert_allclose([r.arrival_s for r in w.requests], np.arange(80) / 4.0)
    w0 = gen(arrival_rate=0.0)
    assert all(r.arrival_s == 0 for r in w0.requests)


def test_poisson_arrivals_have_the_rate() -> None:
    cfg = SynthConfig(
        num_requests=2000,
        arrival="poisson",
        arrival_rate=2.91,
        with_gate_probs=False,
        with_embeddings=False,
        with_lookahead=False,
        prompt_len_mean=2,
        output_len_mean=2,
    )
    w = generate(small_spec(layers=1, experts=4, top_k=1), cfg)
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / 2.91) / (1 / 2.91) < 0.08
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.1  # exponential gaps: coefficient of variation 1


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="temporal_locality"):
        SynthConfig(temporal_locality=1.5)
    with pytest.raises(ValueError, match="popularity_skew"):
        SynthConfig(popularity_skew=-1.0)
    with pytest.raises(ValueError, match="extra"):
        SynthConfig(unknown_knob=1)


# -- fit ---------------------------------------------------------------------------------
def _tv(a: np.ndarray, b: np.ndarray) -> float:
    """Mean total-variation distance between matching rows."""
    return float(0.5 * np.abs(a - b).sum(axis=-1).mean())


def _weighted_transition_tv(real: Workload, other: Workload) -> float:
    ar, ao = stats.cross_layer_affinity(real), stats.cross_layer_affinity(other)
    pop = stats.popularity(real)[:-1]
    return float((pop * 0.5 * np.abs(ar - ao).sum(axis=-1)).sum(axis=1).mean())


def test_fit_to_real_switch_trace_matches_its_statistics() -> None:
    real = import_trace("switch-json", "tests/fixtures/switch_base_8_router_trace.json")
    fitted = fit(real)
    synth = fitted.generate(num_requests=400, seed=1)
    synth.validate()
    baseline = generate(
        real.spec,
        SynthConfig(
            num_requests=400, seed=1, prompt_len_mean=21.5, output_len_mean=1.0, length_sigma=0.2
        ),
    )
    pop_fit = _tv(stats.popularity(real), stats.popularity(synth))
    pop_base = _tv(stats.popularity(real), stats.popularity(baseline))
    tr_fit = _weighted_transition_tv(real, synth)
    tr_base = _weighted_transition_tv(real, baseline)
    assert pop_fit < 0.06 and pop_fit < pop_base / 2
    assert tr_fit < 0.15 and tr_fit < tr_base / 1.5
    # lengths are resampled from the real requests
    assert {r.prompt_len for r in synth.requests} <= {r.prompt_len for r in real.requests}
    assert all(r.output_len == 1 for r in synth.requests)


def test_fit_reproduces_reuse_popularity_and_affinity_of_a_synthetic_trace() -> None:
    src = gen(num_requests=200, temporal_locality=0.5, temporal_locality_first=None,
        temporal_locality_mid=None, affinity=4.0)  # fmt: skip
    fitted = fit(src)
    assert (fitted.reuse >= 0.4).all()  # the copies, plus the topic similarity it absorbs
    again = fitted.generate(num_requests=200, seed=3)
    assert _tv(stats.popularity(src), stats.popularity(again)) < 0.05
    np.testing.assert_allclose(stats.reuse_rate(again), stats.reuse_rate(src), atol=0.04)
    low = fit(
        gen(
            num_requests=200,
            temporal_locality=0.0,
            temporal_locality_first=None,
            temporal_locality_mid=None,
            affinity=4.0,
        )  # fmt: skip
    )
    assert (low.reuse < fitted.reuse).all()
    assert (
        abs(stats.affinity_mi(src).mean() - stats.affinity_mi(again).mean())
        < 0.5 * stats.affinity_mi(src).mean()
    )


def test_fit_refuses_an_empty_workload() -> None:
    with pytest.raises(InputError, match="empty"):
        fit(Workload(SPEC, []))
