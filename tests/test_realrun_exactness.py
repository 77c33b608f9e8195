"""Exactness: with eager experts, an offloaded model generates the same tokens and the same
logits (bit for bit, torch.equal) as the unmodified model, for every architecture, policy,
cache size from top-K up to all experts, device count, prompt and static batch (the
unmodified model runs the same padded batch through realrun.generate, whose pad rows
route to no expert in both runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, Policy
from policies.cache import CacheEntry
from policies.registry import make_policy, policy_class, policy_names
from realrun.copy_engine import LinkEmulation
from realrun.generate import generate_batch, greedy_generate
from realrun.models import load
from realrun.offload import offload_model
from realrun.prompting import Prompt
from realrun.session import RunSession, SessionOptions
from specs.errors import InputError

ARCH_PRESETS = [
    "tiny-mixtral",
    "tiny-qwen2-moe",
    "tiny-phimoe",
    "tiny-olmoe",
    "tiny-qwen3-moe",
    "tiny-deepseek-v3",
    "tiny-glm4-moe",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- small policies that exercise every executor path ---------------------------------------------
class Plain(Policy):
    """No prefetch; LRU eviction."""

    name = "test-plain"


class NextLayerGuess(Policy):
    """Prefetches layer l+1's likely experts from layer l's row, cancels stale orders,
    evicts by a frequency score: prefetch, cancel, protection and custom scores all run."""

    name = "test-next-layer"

    def bind(self, ctx):
        super().bind(ctx)
        self.last: list[tuple[int, int]] = []

    def on_gate(self, ev: GateOutput) -> None:
        for key in self.last:
            self.cancel(*key)
        L, K = self.ctx.spec.num_moe_layers, self.ctx.spec.top_k
        self.last = []
        if ev.probs is not None and ev.layer + 1 < L:
            row = ev.probs.mean(axis=0)
            for rank, e in enumerate(np.argsort(-row, kind="stable")[: K + 1]):
                self.prefetch(ev.layer + 1, int(e), priority=float(row[e]) + (K - rank))
                self.last.append((ev.layer + 1, int(e)))

    def eviction_score(self, entry: CacheEntry) -> float:
        return entry.uses + 1e-3 * entry.last_used


class LookaheadGuess(Policy):
    """Prefetches from the lookahead rows (mixtral-offloading's speculation)."""

    name = "test-lookahead"
    wants_lookahead = True

    def on_gate(self, ev: GateOutput) -> None:
        if ev.lookahead is not None and ev.layer + 1 < self.ctx.spec.num_moe_layers:
            for e in np.argsort(-ev.lookahead.mean(axis=0), kind="stable")[: self.ctx.spec.top_k]:
                self.prefetch(ev.layer + 1, int(e), 1.0)


class AsyncGuess(NextLayerGuess):
    name = "test-async"
    async_search = True


TEST_POLICIES = {cls.name: cls for cls in (Plain, NextLayerGuess, LookaheadGuess, AsyncGuess)}


def registered_policies() -> list[str]:
    """Every registered exact policy the real executor runs (lossy ones change outputs)."""
    return [
        n
        for n in policy_names()
        if not policy_class(n).reads_future and not getattr(policy_class(n), "lossy", False)
    ]


def _make(name: str) -> Policy:
    return TEST_POLICIES[name]() if name in TEST_POLICIES else make_policy(name)


# -- models are built once per module --------------------------------------------------------------
_REF: dict[str, object] = {}
_OFF: dict[str, object] = {}
_OUT: dict[tuple, object] = {}


def _ref(arch: str):
    if arch not in _REF:
        _REF[arch] = load(arch)
    return _REF[arch]


def _off(arch: str):
    if arch not in _OFF:
        # alternate the two stores over architectures so both are covered
        _OFF[arch] = offload_model(
            load(arch), store="file" if ARCH_PRESETS.index(arch) % 2 else "ram"
        )
    return _OFF[arch]


def _reference(arch: str, prompt: list[int], new: int):
    key = (arch, tuple(prompt), new)
    if key not in _OUT:
        _OUT[key] = greedy_generate(_ref(arch).model, "ref", prompt, new, keep_logits=True)
    return _OUT[key]


def assert_exact(
    arch, policy_name, cache, prompt, new, num_devices=1, chunk_bytes=1 << 20, link=None
):
    ref = _reference(arch, prompt, new)
    om = _off(arch)
    opts = SessionOptions(cache, [torch.device("cpu")] * num_devices, link, chunk_bytes)
    with RunSession(om, _make(policy_name), opts) as s:
        got = s.generate("r", prompt, new, keep_logits=True)
        m = s.metrics()
    assert got.output_ids == ref.output_ids, (arch, policy_name, cache)
    assert len(got.logits) == len(ref.logits)
    for a, b in zip(got.logits, ref.logits, strict=True):
        assert torch.equal(a, b), (arch, policy_name, cache, (a - b).abs().max())
    assert m["hits"] + m["misses"] == m["demands"]
    return m


def _reference_batch(arch: str, prompts: list[list[int]], new: int):
    key = (arch, tuple(tuple(p) for p in prompts), new, "batch")
    if key not in _OUT:
        ref = _ref(arch)
        _OUT[key] = generate_batch(
            ref.model,
            [Prompt(f"r{i}", p) for i, p in enumerate(prompts)],
            new,
            experts=[b.experts for b in ref.blocks],
            keep_logits=True,
        )
    return _OUT[key]


def assert_batch_exact(arch, policy_name, cache, prompts, new, num_devices=1, link=None):
    """Every row of a static batch: tokens and every forward's last-position logits equal."""
    refs = _reference_batch(arch, prompts, new)
    opts = SessionOptions(cache, [torch.device("cpu")] * num_devices, link)
    reqs = [Prompt(f"r{i}", p) for i, p in enumerate(prompts)]
    with RunSession(_off(arch), _make(policy_name), opts) as s:
        got = s.generate_batch(reqs, new, keep_logits=True)
        m = s.metrics()
    for g, ref in zip(got, refs, strict=True):
        assert g.output_ids == ref.output_ids, (arch, policy_name, cache)
        assert len(g.logits) == len(ref.logits) == new
        for a, b in zip(g.logits, ref.logits, strict=True):
            assert torch.equal(a, b), (arch, policy_name, cache, (a - b).abs().max())
    assert m["batch_size"] == len(prompts) and m["iterations"] == new
    return m


@st.composite
def setups(draw):
    """(architecture, devices, cache size in experts, policy): every policy, every size
    from one that fits top-K on each device up to all experts."""
    arch = draw(st.sampled_from(ARCH_PRESETS))
    spec = _ref(arch).spec
    ndev = draw(st.sampled_from([1, 1, 2]))
    cache = draw(st.integers(max(spec.top_k, ndev), spec.total_experts))
    policy = draw(st.sampled_from(sorted(TEST_POLICIES) + registered_policies()))
    if policy not in TEST_POLICIES and policy_class(policy).preload_all:
        cache = spec.total_experts
    return arch, ndev, cache, policy


@st.composite
def cases(draw):
    arch, ndev, cache, policy = draw(setups())
    text = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8))
    prompt = _ref(arch).tokenizer.encode(text)
    new = draw(st.integers(1, 3))
    chunk = draw(st.sampled_from([1 << 20, 4096]))
    link = draw(st.sampled_from([None, LinkEmulation(2.0, 20.0)]))
    return arch, policy, cache, prompt, new, ndev, chunk, link


@settings(max_examples=15, deadline=None)
@given(cases())
def test_offloaded_logits_equal_the_unmodified_model(case):
    arch, policy, cache, prompt, new, ndev, chunk, link = case
    assert_exact(arch, policy, cache, prompt, new, ndev, chunk, link)


@st.composite
def prompt_ids(draw, arch: str, n: int) -> list[list[int]]:
    """``n`` short random texts, encoded by ``arch``'s tokenizer."""
    text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10)
    texts = draw(st.lists(text, min_size=n, max_size=n))
    return [_ref(arch).tokenizer.encode(t) for t in texts]


@st.composite
def batch_cases(draw):
    arch, ndev, cache, policy = draw(setups())
    B = draw(st.integers(1, 3))
    prompts = draw(prompt_ids(arch, B))
    new = draw(st.integers(1, 3))
    link = draw(st.sampled_from([None, LinkEmulation(2.0, 20.0)]))
    return arch, policy, cache, prompts, new, ndev, link


@settings(max_examples=12, deadline=None)
@given(batch_cases())
def test_offloaded_batches_equal_the_unmodified_model_row_by_row(case):
    arch, policy, cache, prompts, new, ndev, link = case
    assert_batch_exact(arch, policy, cache, prompts, new, ndev, link)


def test_a_padded_batch_of_every_architecture_is_exact():
    """Lengths 1, 9 and 4: two rows padded, every arch, a small cache and the fmoe policy."""
    for arch in ARCH_PRESETS:
        tok = _ref(arch).tokenizer
        prompts = [tok.encode("a"), tok.encode("the river"), tok.encode("2+2?")]
        spec = _ref(arch).spec
        assert_batch_exact(arch, "test-next-layer", spec.top_k, prompts, 3)
        assert_batch_exact(arch, "fmoe", spec.total_experts // 2, prompts, 2)


@pytest.mark.parametrize("arch", ARCH_PRESETS)
def test_every_registered_policy_is_exact_at_the_smallest_and_a_middle_cache(arch):
    spec = _ref(arch).spec
    prompt = _ref(arch).tokenizer.encode("Why is the sky blue?")
    names = registered_policies() + sorted(TEST_POLICIES)
    for name in names:
        preload = name not in TEST_POLICIES and policy_class(name).preload_all
        caches = [spec.total_experts] if preload else [spec.top_k, spec.total_experts // 2]
        for cache in caches:
            assert_exact(arch, name, cache, prompt, 3)


def test_both_compute_paths_and_waves_are_exercised():
    """K = 4 (OLMoE): a small cache runs prefill in waves one expert at a time; a full cache
    takes the single-call path whenever slots ascend with expert ids."""
    prompt = _ref("tiny-olmoe").tokenizer.encode("an ordinary prompt of some length")
    small = assert_exact("tiny-olmoe", "test-plain", 4, prompt, 3)
    assert small["layer_calls_multi_wave"] > 0 and small["layer_calls_per_expert"] > 0
    full = assert_exact("tiny-olmoe", "test-plain", 64, prompt, 3)
    assert full["layer_calls_single_call"] + full["layer_calls_per_expert"] == full["layer_steps"]
    mixtral = assert_exact("tiny-mixtral", "test-plain", 32, prompt, 3)  # K = 2: one call per wave
    assert mixtral["layer_calls_single_call"] == mixtral["layer_steps"]


def test_the_oracle_is_refused():
    future = [n for n in policy_names() if policy_class(n).reads_future]

    class Peeker(Policy):
        name = "test-peeker"
        reads_future = True

    for cls in [Peeker] + [policy_class(n) for n in future]:
        with pytest.raises(
            InputError,
            match=f"policy '{cls.name}' reads the trace's future; it runs only in the simulator",
        ):
            RunSession(_off("tiny-mixtral"), cls(), SessionOptions(4))
    assert all(m.runner is None for m in _off("tiny-mixtral").modules)
