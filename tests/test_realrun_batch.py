"""Static batches in the real executor: padding and positions, rows leaving the batch,
pad rows demanding no experts (policy, caches, recorder and compute see real tokens
only), batch size 1 as before, and batched capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.base import GateOutput, IterationEnd, IterationStart, RequestArrival
from realrun.capture import CaptureConfig, capture
from realrun.generate import IterationRows, generate_batch, greedy_generate
from realrun.models import load
from realrun.offload import OffloadedExperts, offload_model
from realrun.prompting import Prompt
from realrun.session import RunSession, SessionOptions
from tests.recording_policy import EventRecorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_MODELS: dict[str, object] = {}


def _ref(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = load(arch)
    return _MODELS[arch]


def _off(arch: str):
    key = arch + "/offloaded"
    if key not in _MODELS:
        _MODELS[key] = offload_model(load(arch), store="ram")
    return _MODELS[key]


def _experts(loaded) -> list:
    return [b.experts for b in loaded.blocks]


def _prompts(arch: str, texts: list[str]) -> list[Prompt]:
    tok = _ref(arch).tokenizer
    return [Prompt(f"q{i}", tok.encode(t)) for i, t in enumerate(texts)]


TEXTS = ["Why is the sky blue?", "Hi", "Name three rivers"]  # 20, 2 and 17 tokens


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-olmoe"])
def test_a_batch_of_one_runs_exactly_the_plain_loop(arch):
    """B = 1: the logits of the loop before batching (no mask, no position ids), bit for bit,
    for the unmodified model and the offloaded one."""
    from transformers import DynamicCache

    model = _ref(arch).model
    prompt = _ref(arch).tokenizer.encode("an ordinary prompt")
    want, tokens = [], torch.tensor([prompt])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1).logits
            want.append(logits[0, -1])
            tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
    got = greedy_generate(model, "r", prompt, 4, keep_logits=True)
    with RunSession(_off(arch), EventRecorder(), SessionOptions(_ref(arch).spec.top_k)) as s:
        off = s.generate("r", prompt, 4, keep_logits=True)
        m = s.metrics()
    for g in (got, off):
        assert len(g.logits) == 4 and all(
            torch.equal(a, b) for a, b in zip(g.logits, want, strict=True)
        )
        assert g.output_ids == [int(w.argmax()) for w in want]
    assert m["batch_size"] == 1 and m["iterations"] == 4 and m["tokens_generated"] == 4


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-deepseek-v3"])
def test_a_padded_row_sees_its_own_positions(arch):
    """Left padding with the mask and position ids: each row's logits are its solo run's up
    to float rounding (different matmul shapes), and so are its tokens."""
    loaded = _ref(arch)
    prompts = _prompts(arch, TEXTS)
    batch = generate_batch(loaded.model, prompts, 4, experts=_experts(loaded), keep_logits=True)
    for p, g in zip(prompts, batch, strict=True):
        solo = greedy_generate(loaded.model, p.request_id, p.ids, 4, keep_logits=True)
        assert g.output_ids == solo.output_ids
        for a, b in zip(g.logits, solo.logits, strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
        assert g.ttft_s == batch[0].ttft_s and g.batch_size == 3


def test_finished_rows_leave_the_batch():
    """A row that produces EOS stops; later forwards run only the live rows."""
    loaded = _ref("tiny-mixtral")
    prompts = _prompts("tiny-mixtral", TEXTS)
    first = generate_batch(loaded.model, prompts, 4, experts=_experts(loaded))
    eos = first[1].output_ids[0]  # row 1 stops at its first token
    assert all(eos not in g.output_ids for g in (first[0], first[2])), "pick other prompts"

    class Seen:
        def __init__(self):
            self.batches, self.finished = [], []

        def begin_iteration(self, rows: IterationRows) -> None:
            self.batches.append(rows.batch)

        def end_iteration(self, finished):
            self.finished.append(finished)

    seen = Seen()
    got = generate_batch(
        loaded.model, prompts, 4, experts=_experts(loaded), observer=seen, eos_token_id=eos
    )
    assert got[1].output_ids == [eos] and got[1].decode_s == []
    assert [g.output_ids for g in (got[0], got[2])] == [first[0].output_ids, first[2].output_ids]
    assert seen.batches == [("q0", "q1", "q2")] + [("q0", "q2")] * 3
    assert seen.finished == [("q1",), (), (), ("q0", "q2")]
    assert len(got[0].decode_s) == 3


def test_a_padded_batch_needs_the_experts_modules():
    loaded = _ref("tiny-mixtral")
    with pytest.raises(ValueError, match="needs the experts modules"):
        generate_batch(loaded.model, _prompts("tiny-mixtral", TEXTS), 2)
    same = _prompts("tiny-mixtral", ["abc", "xyz"])  # equal lengths: nothing to pad
    assert len(generate_batch(loaded.model, same, 2)) == 2


def count_expert_rows(monkeypatch) -> list[int]:
    """A counter (its one entry) of the (token, expert) pairs the offloaded experts compute."""
    computed = [0]
    orig = OffloadedExperts.call_on_view

    def counting(self, views, num_slots, hidden, index, weights):
        computed[0] += int((index < num_slots).sum())
        return orig(self, views, num_slots, hidden, index, weights)

    monkeypatch.setattr(OffloadedExperts, "call_on_view", counting)
    return computed


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-olmoe"])
def test_pad_rows_demand_no_experts(arch, monkeypatch):
    """Policy events, cache demands and expert compute cover the real tokens only: every
    gate event has one row per real token, the library computes exactly real tokens x
    top-K (token, expert) pairs per MoE layer, and demands are the real rows' experts."""
    spec = _ref(arch).spec
    om = _off(arch)
    computed = count_expert_rows(monkeypatch)
    prompts = _prompts(arch, TEXTS)
    lens = [len(p.ids) for p in prompts]
    new = 3
    policy = EventRecorder()
    opts = SessionOptions(spec.total_experts // 2, record=True)
    with RunSession(om, policy, opts) as s:
        gens = s.generate_batch(prompts, new)
        m = s.metrics()
        trace = s.recorder.requests
    real_tokens = sum(lens) + len(prompts) * (new - 1)  # prefill rows, then one per decode row
    L, K, E = spec.num_moe_layers, spec.top_k, spec.num_experts
    assert computed[0] == real_tokens * K * L
    starts = [e for e in policy.events if isinstance(e, IterationStart)]
    gates = [e for e in policy.events if isinstance(e, GateOutput)]
    ends = [e for e in policy.events if isinstance(e, IterationEnd)]
    arrivals = [e for e in policy.events if isinstance(e, RequestArrival)]
    assert [a.request_id for a in arrivals] == ["q0", "q1", "q2"]
    assert [a.prompt_len for a in arrivals] == lens
    assert len(starts) == len(ends) == new and len(gates) == new * L
    pre = starts[0]
    assert pre.request_ids == tuple(r for p in prompts for r in [p.request_id] * len(p.ids))
    assert pre.positions.tolist() == [i for n in lens for i in range(n)] and pre.prefill.all()
    assert pre.embeddings.shape == (sum(lens), spec.hidden_size)
    for i, st in enumerate(starts[1:], start=1):
        assert st.request_ids == ("q0", "q1", "q2") and not st.prefill.any()
        assert st.positions.tolist() == [n + i - 1 for n in lens]
    for g in gates:
        rows = sum(lens) if g.iteration == 0 else len(prompts)
        assert g.topk_ids.shape == (rows, K) and g.probs.shape == (rows, E)
        assert (g.topk_ids < E).all() and (g.topk_ids >= 0).all()
    assert ends[-1].finished == ("q0", "q1", "q2") and ends[0].request_ids == ("q0", "q1", "q2")
    assert m["demands"] == sum(len(np.unique(g.topk_ids)) for g in gates)
    # the recorded trace: each request's own real rows, in order
    for p, g, r in zip(prompts, gens, trace, strict=True):
        assert r.request_id == p.request_id and r.prompt_len == len(p.ids)
        assert r.output_len == len(g.output_ids) == new
        assert r.routing.topk_ids.shape == (len(p.ids) + new - 1, L, K)
        assert r.routing.embeddings.shape == (len(p.ids) + new - 1, spec.hidden_size)
    i = list(pre.request_ids).index("q1")  # q1's prefill rows in the batch's gate rows
    for lay in range(L):
        got = trace[1].routing.topk_ids[: lens[1], lay]
        assert np.array_equal(got, gates[lay].topk_ids[i : i + lens[1]])


def test_batched_capture_has_the_structure_of_one_at_a_time(tmp_path):
    """Capture at B = 2 vs B = 1: same requests, lengths and shapes (routing may differ by
    float rounding); an offloaded recorded run at B = 2 routes exactly as the B = 2 capture."""
    texts = ["Why is the sky blue?", "Hi", "Name three rivers"]
    cfgs = {
        b: CaptureConfig(
            model="tiny-mixtral",
            out=str(tmp_path / f"b{b}.trace"),
            prompts=None,
            prompt_texts=texts,
            num_prompts=3,
            max_new_tokens=3,
            batch_size=b,
        )
        for b in (1, 2)
    }
    w1, w2 = (capture(cfgs[b], progress=lambda m: None) for b in (1, 2))
    assert w2.provenance["batch_size"] == 2
    assert [r.request_id for r in w1.requests] == [r.request_id for r in w2.requests]
    for a, b in zip(w1.requests, w2.requests, strict=True):
        assert (a.prompt_len, a.output_len) == (b.prompt_len, b.output_len)
        for f in ("topk_ids", "topk_weights", "gate_probs", "embeddings", "lookahead"):
            assert getattr(a.routing, f).shape == getattr(b.routing, f).shape, f
    tok = _ref("tiny-mixtral").tokenizer
    reqs = [Prompt(r.request_id, tok.encode(t), t) for r, t in zip(w2.requests, texts, strict=True)]
    with RunSession(_off("tiny-mixtral"), EventRecorder(), SessionOptions(4, record=True)) as s:
        for batch in (reqs[:2], reqs[2:]):
            s.generate_batch(batch, 3)
        rec = s.recorder.requests
    for a, b in zip(rec, w2.requests, strict=True):
        assert np.array_equal(a.routing.topk_ids, b.routing.topk_ids)
        assert np.array_equal(a.routing.topk_weights, b.routing.topk_weights)
