"""Shared test builders: small random workloads and hypothesis strategies for them.

``random_workload`` is deterministic in its seed; ``workloads()`` draws small ones.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from specs.model_spec import ModelSpec
from traces.types import Request, Routing, Workload


def small_spec(layers: int = 3, experts: int = 6, top_k: int = 2, hidden: int = 8) -> ModelSpec:
    """A made-up ModelSpec small enough for property tests (not a runnable model)."""
    return ModelSpec(
        name=f"test-{layers}x{experts}k{top_k}",
        family="test",
        num_layers=layers,
        num_experts=experts,
        top_k=top_k,
        hidden_size=hidden,
        expert_intermediate_size=16,
        vocab_size=32,
        num_attention_heads=2,
        num_kv_heads=2,
        head_dim=4,
        dtype="fp32",
    )


def random_workload(
    spec: ModelSpec,
    num_requests: int = 4,
    seed: int = 0,
    max_prompt: int = 5,
    max_output: int = 5,
    with_probs: bool = True,
    with_embeddings: bool = True,
    with_lookahead: bool = False,
    arrival_gap_s: float = 0.0,
) -> Workload:
    """Random routing with softmax gate rows whose top-K are the chosen experts."""
    rng = np.random.default_rng(seed)
    L, J, K, H = spec.num_moe_layers, spec.num_experts, spec.top_k, spec.hidden_size
    reqs = []
    for i in range(num_requests):
        p = int(rng.integers(1, max_prompt + 1))
        o = int(rng.integers(1, max_output + 1))
        T = p + o - 1
        logits = rng.normal(size=(T, L, J)) * 2.0
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1, kind="stable")[..., :K]
        w = np.take_along_axis(probs, ids, axis=-1)
        w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
        look = None
        if with_lookahead:
            look = np.zeros_like(probs, dtype=np.float32)
            look[:, :-1] = probs[:, 1:]
        reqs.append(
            Request(
                request_id=f"r{i}",
                arrival_s=i * arrival_gap_s,
                prompt_len=p,
                output_len=o,
                routing=Routing(
                    topk_ids=ids.astype(np.int16),
                    topk_weights=w,
                    gate_probs=probs.astype(np.float32) if with_probs else None,
                    embeddings=rng.normal(size=(T, H)).astype(np.float32)
                    if with_embeddings
                    else None,
                    lookahead=look,
                ),
            )
        )
    return Workload(spec, reqs, {"source": "tests.strategies.random_workload", "seed": seed})


@st.composite
def specs(draw: st.DrawFn) -> ModelSpec:
    experts = draw(st.integers(2, 8))
    return small_spec(
        layers=draw(st.integers(1, 4)), experts=experts, top_k=draw(st.integers(1, min(3, experts)))
    )


@st.composite
def fitted_costs(draw: st.DrawFn) -> dict[str, float]:
    """Keyword arguments of ``tests.test_sim_kit.exact_profile`` for fitted linear costs
    (monotone in tokens and tokens x context) and a per-copy latency; the caller draws
    the link's bandwidth, concurrency and GPUs for what it tests."""
    f = st.floats(1e-5, 1e-3)
    return {
        "expert_s": draw(f),
        "expert_per_token_s": draw(st.sampled_from([0.0, 1e-5])),
        "dense_s": draw(f),
        "dense_per_token_s": draw(st.sampled_from([0.0, 1e-5])),
        "dense_per_token_context_s": draw(st.sampled_from([0.0, 1e-7])),
        "head_s": draw(f),
        "latency_s": draw(st.sampled_from([0.0, 1e-5, 1e-4])),
    }


@st.composite
def workloads(draw: st.DrawFn, spec: ModelSpec | None = None, **kwargs) -> Workload:
    spec = spec or draw(specs())
    return random_workload(
        spec,
        num_requests=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        with_probs=draw(st.booleans()),
        with_embeddings=draw(st.booleans()),
        with_lookahead=draw(st.booleans()),
        **kwargs,
    )
