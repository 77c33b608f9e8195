"""Fitting the synthetic generator to a real trace, and generating from the fit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from specs.errors import InputError
from specs.limits import require_memory
from specs.model_spec import ModelSpec
from traces.synth_config import MAX_REQUESTS
from traces.synth_memory import token_row_bytes
from traces.synth_sampling import (
    _arrivals,
    _assemble,
    _sample_routing,
    _skeleton,
    _sub_skeleton,
    chunk_bounds,
    chunk_rng,
    chunk_tokens,
)
from traces.types import Request, Workload


@dataclass
class FittedModel:
    """Statistics estimated from a real workload, and a generator that reproduces them.

    ``popularity`` [L, J]: share of selections per expert; ``transitions`` [L-1, J, J]:
    P(expert j chosen at l+1 | expert i chosen at l) over the K x K pairs of each token
    (the target); ``transition_logits`` [L-1, J, J]: what generation adds to layer l+1's
    logits for each expert chosen at l (averaged over the K), calibrated so that the
    generated pairs reproduce ``transitions``;
    ``reuse`` [L]: probability a token copies the previous token's routing row;
    ``prompt_lens``/``output_lens``: the real requests' lengths, resampled;
    ``arrival_rate``: requests per second (0 when all arrive together).
    """

    spec: ModelSpec
    popularity: np.ndarray
    transitions: np.ndarray
    transition_logits: np.ndarray
    reuse: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrival_rate: float
    source: dict[str, Any]

    def generate(
        self,
        num_requests: int,
        seed: int = 0,
        with_gate_probs: bool = True,
        with_lookahead: bool = True,
        lookahead_noise: float = 1.2,
        normalize_topk: bool = True,
    ) -> Workload:
        """Draw a workload whose popularity, transitions, re-use and lengths match the fit."""
        prov, reqs = self.generate_stream(
            num_requests, seed, with_gate_probs, with_lookahead, lookahead_noise,
            normalize_topk, budget_bytes=None,
        )  # fmt: skip
        return Workload(self.spec, list(reqs), prov)

    def generate_stream(
        self,
        num_requests: int,
        seed: int = 0,
        with_gate_probs: bool = True,
        with_lookahead: bool = True,
        lookahead_noise: float = 1.2,
        normalize_topk: bool = True,
        budget_bytes: int | None = 256 * 2**20,
    ) -> tuple[dict[str, Any], Iterator[Request]]:
        """(provenance, requests drawn a chunk at a time); ``budget_bytes=None``: one chunk,
        what :meth:`generate` draws. Chunks after the first draw from seed (seed, 2, c)."""
        if not 1 <= num_requests <= MAX_REQUESTS:
            raise InputError(f"num_requests must be in [1, {MAX_REQUESTS}], got {num_requests}")
        if budget_bytes is None:  # one chunk: the whole workload is held at once
            mean_len = float(np.mean(self.prompt_lens) + np.mean(self.output_lens))
            require_memory(
                f"fitted workload of {num_requests} requests",
                num_requests * max(mean_len - 1, 1) * token_row_bytes(self.spec, 0),
                "lower the number of requests",
            )
        rng = np.random.default_rng([seed, 2])
        pick = rng.integers(0, len(self.prompt_lens), num_requests)
        whole = _skeleton(
            self.prompt_lens[pick].astype(np.int64),
            self.output_lens[pick].astype(np.int64),
            _arrivals(rng, num_requests, "poisson", self.arrival_rate),
        )
        log_pop = np.log(self.popularity)
        trans = self.transition_logits
        counts = whole.prompt_len + whole.output_len - 1
        per = (
            whole.num_tokens
            if budget_bytes is None
            else chunk_tokens(self.spec, with_gate_probs, with_lookahead, budget_bytes)
        )
        bounds = chunk_bounds(counts, max(per, 1))

        def part(c: int, a: int, b: int) -> list[Request]:
            sk = _sub_skeleton(whole, a, b)

            def base(layer: int, prev: np.ndarray | None) -> np.ndarray:
                if prev is None:
                    return np.broadcast_to(log_pop[0], (sk.num_tokens, log_pop.shape[1]))
                return trans[layer - 1][prev.astype(np.int64)].mean(axis=1)

            # Gumbel noise of scale 1 on log-probabilities = sampling without replacement
            routing = _sample_routing(
                sk, self.spec, chunk_rng(rng, [seed, 2], c), base, self.reuse, 1.0, 1.0,
                normalize_topk, lookahead_noise, with_gate_probs, with_lookahead,
            )  # fmt: skip
            return _assemble(sk, routing, None, [{} for _ in range(b - a)], "fit", first=a)

        def requests() -> Iterator[Request]:
            for c, (a, b) in enumerate(bounds):
                yield from part(c, a, b)

        prov = {
            "source": "synthetic-fit",
            "generator": "traces.synth.FittedModel.generate",
            "model": self.spec.name,
            "fitted_from": self.source,
            "seed": seed,
        }
        if len(bounds) > 1:
            prov["chunks"] = len(bounds)
        return prov, requests()


def _share_rate(ids: np.ndarray, other: np.ndarray) -> np.ndarray:
    """[L] share of rows whose expert set overlaps the other array's row at that layer."""
    return (ids[..., :, None] == other[..., None, :]).any(axis=(-1, -2)).mean(axis=0)


def _pair_transitions(ids: np.ndarray, popularity: np.ndarray, smoothing: float) -> np.ndarray:
    """[L-1, J, J] smoothed P(j at l+1 | i at l) over the K x K pairs of each token."""
    _, L, K = ids.shape
    J = popularity.shape[1]
    trans = np.zeros((max(L - 1, 0), J, J))
    for layer in range(L - 1):
        a = np.repeat(ids[:, layer], K, axis=1).ravel()
        b = np.tile(ids[:, layer + 1], (1, K)).ravel()
        c = np.bincount(a * J + b, minlength=J * J).reshape(J, J).astype(float)
        trans[layer] = c + smoothing * popularity[layer + 1]
    return trans / trans.sum(axis=2, keepdims=True) if L > 1 else trans


def fit(
    real: Workload,
    smoothing: float = 0.5,
    seed: int = 0,
    calibration_rounds: int = 6,
    calibration_tokens: int = 20_000,
) -> FittedModel:
    """Estimate popularity, cross-layer transitions, temporal re-use, lengths and arrivals.

    ``smoothing`` adds that many pseudo-counts per transition row, spread by the next
    layer's popularity (rows never seen in the real trace fall back to popularity).
    The re-use probability is set so that the share of tokens overlapping the previous
    token's experts matches the real trace: observed overlap minus chance overlap
    (tokens paired at random), over one minus chance. It absorbs any within-request
    similarity of the real trace (e.g. topics), which the fitted model has no other
    way to express.

    Drawing K experts from the average of the previous experts' rows blurs the pair
    statistics, so the transition logits start at log(transitions) and are corrected
    ``calibration_rounds`` times: generate about ``calibration_tokens`` token rows, and
    add log(target) - log(generated) (and the re-use gap) to the parameters.
    """
    if not real.requests:
        raise InputError("cannot fit an empty workload")
    spec = real.spec
    L, J = spec.num_moe_layers, spec.num_experts
    ids = np.concatenate([r.routing.topk_ids for r in real.requests]).astype(np.int64)
    N = len(ids)
    first = np.zeros(N, dtype=bool)
    first[np.cumsum([0] + [r.routing.num_tokens for r in real.requests[:-1]])] = True

    counts = np.zeros((L, J))
    for layer in range(L):
        counts[layer] = np.bincount(ids[:, layer].ravel(), minlength=J)
    popularity = (counts + 0.5) / (counts + 0.5).sum(axis=1, keepdims=True)

    trans = _pair_transitions(ids, popularity, smoothing)

    # re-use: share of tokens overlapping the previous token, minus chance overlap
    keep = np.flatnonzero(~first)
    observed = _share_rate(ids[keep], ids[keep - 1]) if len(keep) else np.zeros(L)
    perm = np.random.default_rng(seed).permutation(N)
    chance = _share_rate(ids, ids[perm])
    reuse = np.clip((observed - chance) / np.maximum(1 - chance, 1e-9), 0.0, 1.0)

    arr = np.sort([r.arrival_s for r in real.requests])
    span = float(arr[-1] - arr[0]) if len(arr) > 1 else 0.0
    rate = (len(arr) - 1) / span if span > 0 else 0.0
    model = FittedModel(
        spec=spec,
        popularity=popularity,
        transitions=trans,
        transition_logits=np.log(trans),
        reuse=reuse,
        prompt_lens=np.array([r.prompt_len for r in real.requests]),
        output_lens=np.array([r.output_len for r in real.requests]),
        arrival_rate=rate,
        source={
            k: real.provenance.get(k) for k in ("source", "file", "model") if k in real.provenance
        },
    )
    per_request = max(N / len(real.requests), 1.0)
    n_cal = int(np.clip(np.ceil(calibration_tokens / per_request), 20, 5000))
    for round_ in range(calibration_rounds if L > 1 else 0):
        sample = model.generate(
            n_cal, seed=seed + 1000 + round_, with_gate_probs=False, with_lookahead=False
        )
        got = np.concatenate([r.routing.topk_ids for r in sample.requests]).astype(np.int64)
        model.transition_logits += np.log(trans) - np.log(
            _pair_transitions(got, popularity, smoothing)
        )
        starts = np.cumsum([0] + [r.routing.num_tokens for r in sample.requests[:-1]])
        later = np.setdiff1d(np.arange(len(got)), starts)
        model.reuse = np.clip(
            model.reuse + observed - _share_rate(got[later], got[later - 1]), 0.0, 1.0
        )
    return model
