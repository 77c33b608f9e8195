"""realrun.api: offloaded experts under the library's own ``generate``.

Exactness: for every architecture, policy and cache size, ``model.generate`` of the
offloaded model returns the same sequences and the same per-step scores (torch.equal) as
the unmodified model's ``generate`` (eager experts) on the same left-padded batch, greedy
or sampled under the same seed. The policy sees real rows only, requests per batch row,
and each request's tokens stop at its first EOS.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationStart, RequestArrival
from policies.registry import policy_class, policy_names
from realrun.api import offload
from realrun.models import load
from realrun.offload import OffloadedExperts
from specs.errors import InputError
from tests.recording_policy import EventRecorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCHS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-deepseek-v3"]
_REF: dict[str, object] = {}


def _ref(arch: str):
    if arch not in _REF:
        _REF[arch] = load(arch)
    return _REF[arch]


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids (pad 0) and attention mask."""
    S = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _generate(model, ids, mask, new, sample_seed=None, **kw):
    kw = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        min_new_tokens=new,  # no early stop: both runs take every step
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
        **kw,
    )
    if sample_seed is None:
        return model.generate(do_sample=False, **kw)
    torch.manual_seed(sample_seed)
    return model.generate(do_sample=True, top_k=0, **kw)


def _assert_same(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores)
    for a, b in zip(got.scores, want.scores, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def runnable_policies() -> list[str]:
    # lossy policies change what the model computes by design (their own tests)
    return [
        n
        for n in policy_names()
        if not policy_class(n).reads_future and not getattr(policy_class(n), "lossy", False)
    ]


@st.composite
def cases(draw):
    arch = draw(st.sampled_from(ARCHS))
    spec = _ref(arch).spec
    policy = draw(st.sampled_from(runnable_policies()))
    ndev = draw(st.sampled_from([1, 1, 2]))
    cache = draw(st.integers(max(spec.top_k, ndev), spec.total_experts))
    if policy_class(policy).preload_all:
        cache = spec.total_experts
    vocab = _ref(arch).model.config.vocab_size
    prompts = draw(
        st.lists(
            st.lists(st.integers(3, vocab - 1), min_size=1, max_size=6), min_size=1, max_size=3
        )
    )
    new = draw(st.integers(1, 3))
    sample = draw(st.sampled_from([None, 7]))
    link = draw(st.sampled_from([None, 2.0]))
    return arch, policy, cache, ndev, prompts, new, sample, link


@settings(max_examples=12, deadline=None)
@given(cases())
def test_generate_equals_the_unmodified_model(case) -> None:
    arch, policy, cache, ndev, prompts, new, sample, link = case
    ids, mask = _batch(prompts)
    want = _generate(_ref(arch).model, ids, mask, new, sample)
    with offload(arch, policy=policy, cache_experts=cache, num_devices=ndev, link_gbps=link) as lm:
        got = _generate(lm.model, ids, mask, new, sample)
        m = lm.metrics()
    _assert_same(got, want)
    assert m["requests"] == len(prompts)
    assert m["tokens_generated"] == len(prompts) * new
    assert m["iterations"] == new
    assert m["hits"] + m["misses"] == m["demands"] > 0
    assert m["cache_experts_total"] == cache and m["num_devices"] == ndev


def test_the_policy_sees_real_rows_and_one_request_per_row() -> None:
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = _batch(prompts)
    pol = EventRecorder()
    with offload("tiny-mixtral", policy=pol, cache_experts=6) as lm:
        _generate(lm.model, ids, mask, 3)
        spec = lm.spec
    ev = pol.events
    arrivals = [e for e in ev if isinstance(e, RequestArrival)]
    assert [a.prompt_len for a in arrivals] == [4, 2]  # the pad tokens are not the prompt's
    rids = tuple(a.request_id for a in arrivals)
    starts = [e for e in ev if isinstance(e, IterationStart)]
    ends = [e for e in ev if isinstance(e, IterationEnd)]
    assert [len(s.request_ids) for s in starts] == [6, 2, 2]  # real rows: 4 + 2, then 1 + 1
    assert starts[0].request_ids == (rids[0],) * 4 + (rids[1],) * 2
    assert starts[0].positions.tolist() == [0, 1, 2, 3, 0, 1]
    assert starts[1].positions.tolist() == [4, 2] and not starts[1].prefill.any()
    assert starts[2].positions.tolist() == [5, 3] and starts[0].prefill.all()
    assert [e.finished for e in ends] == [(), (), rids]  # the requests end with generate
    assert all(e.request_ids == rids for e in ends)
    gates = [e for e in ev if isinstance(e, GateOutput)]
    assert len(gates) == 3 * spec.num_moe_layers
    assert [len(g.topk_ids) for g in gates[: spec.num_moe_layers]] == [6] * spec.num_moe_layers


def test_tokens_stop_at_a_rows_first_eos() -> None:
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    ids, mask = _batch(prompts)
    free = _generate(_ref("tiny-mixtral").model, ids, mask, 4).sequences[:, ids.shape[1] :]
    eos = int(free[0, 1])  # row 0's second token ends row 0 (when row 1 does not make it first)
    assert eos not in free[1, :2].tolist()
    with offload("tiny-mixtral", policy="lru", cache_experts=8) as lm:
        out = lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
            pad_token_id=0, eos_token_id=eos,
        )  # fmt: skip
        gens = lm.generations
        m = lm.metrics()
    row0 = free[0].tolist()
    assert gens[0].output_ids == row0[: row0.index(eos) + 1]
    assert len(gens[0].decode_s) == len(gens[0].output_ids) - 1
    assert gens[1].output_ids == out[1, ids.shape[1] :].tolist()[: len(gens[1].output_ids)]
    assert m["tokens_generated"] == sum(len(g.output_ids) for g in gens)
    assert all(g.ttft_s > 0 for g in gens) and all(t > 0 for g in gens for t in g.decode_s)


def test_beam_search_stays_exact_with_beams_as_rows() -> None:
    ids, mask = _batch([[5, 6, 7, 8], [9, 10]])
    kw = dict(num_beams=3, num_return_sequences=2)
    want = _generate(_ref("tiny-mixtral").model, ids, mask, 3, **kw)
    with offload("tiny-mixtral", policy="fmoe", cache_experts=5) as lm:
        got = _generate(lm.model, ids, mask, 3, **kw)
        m = lm.metrics()
    _assert_same(got, want)
    assert m["requests"] == 2 * 3 and m["tokens_generated"] == 2 * 3 * 3
    assert m["tokens_sha256"] is None


@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_a_model_passed_in_and_plain_forwards(dtype, name) -> None:
    ref = load("tiny-qwen2-moe").model.to(dtype)
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    mine = load("tiny-qwen2-moe").model.to(dtype)  # built by the caller, offloaded in place
    pol = EventRecorder()
    with offload(mine, policy=pol, cache_experts=4) as lm:
        assert lm.tokenizer is None and lm.spec.dtype == name
        with torch.no_grad():
            got = mine(input_ids=ids).logits
            again = mine(input_ids=ids).logits
        m = lm.metrics()
    assert torch.equal(got, want) and torch.equal(again, want)
    assert m["requests"] == 0 and m["layer_steps"] == 2 * lm.spec.num_moe_layers  # no generate
    ends = [e for e in pol.events if isinstance(e, IterationEnd)]
    # the second forward (an empty cache again) ended the first one's request
    assert len(ends) == 2 and ends[0].finished == ends[0].request_ids
    assert all(isinstance(b.experts, OffloadedExperts) for b in lm.om.loaded.blocks)


def test_close_puts_generate_back_and_removes_the_hooks() -> None:
    lm = offload("tiny-mixtral", policy="fmoe", cache_experts=6)
    model = lm.model
    assert "generate" in model.__dict__
    hooks = len(model._forward_pre_hooks) + len(model._forward_hooks)
    lm.close()
    lm.close()  # idempotent
    assert "generate" not in model.__dict__
    assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks - 2
    with pytest.raises(RuntimeError, match="no session attached"):
        model(input_ids=torch.tensor([[1, 2]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache_experts": 1}, "below what one layer needs"),
        ({"policy": "oracle"}, "oracle"),
        ({"policy": "no-such-policy"}, "no-such-policy"),
        ({"store": "disk"}, "unknown store"),
        ({"link_latency_us": 5.0}, "needs --link-gbps"),
    ],
)
def test_bad_input_is_refused_before_offloading(kwargs, message) -> None:
    mine = load("tiny-mixtral").model
    experts = mine.model.layers[0].mlp.experts
    with pytest.raises(InputError, match=message):
        offload(mine, **kwargs)
    assert mine.model.layers[0].mlp.experts is experts  # untouched


def test_a_model_without_experts_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2,
        )
    )  # fmt: skip
    with pytest.raises(InputError, match="not an MoE model"):
        offload(dense)


def test_recorded_generate_calls_are_a_trace_the_simulator_replays(tmp_path) -> None:
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware
    from traces.io import load_workload

    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    with offload("tiny-mixtral", policy="lru", cache_experts=5, record=True) as lm:
        for p in prompts:  # one request per call, at batch size 1
            lm.model.generate(input_ids=torch.tensor([p]), max_new_tokens=4, min_new_tokens=4)
        real = lm.metrics()
        lm.save_trace(str(tmp_path / "api.trace"))
        spec = lm.spec
    w = load_workload(tmp_path / "api.trace", spec)
    assert [r.prompt_len for r in w.requests] == [5, 3]
    assert [r.output_len for r in w.requests] == [4, 4]
    assert [r.routing.num_tokens for r in w.requests] == [5 + 3, 3 + 3]
    assert w.requests[0].routing.gate_probs is not None
    assert w.provenance["source"] == "realrun.api"
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware("cpu-local"),
        policy="lru",
        cache_experts=5,
        batch_size=1,
        batching="static",
        arrivals="closed",
    )
    sim = simulate(w, cfg).metrics
    # lru's copies depend on routing alone: the simulator's replay moves what the run moved
    assert (sim["hits"], sim["misses"]) == (real["hits"], real["misses"])
    assert sim["bytes_h2d"] == real["bytes_h2d"]


def test_a_recorded_padded_batch_keeps_real_rows_up_to_each_eos() -> None:
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask = _batch(prompts)
    free = _generate(_ref("tiny-mixtral").model, ids, mask, 4).sequences[:, ids.shape[1] :]
    eos = int(free[0, 1])
    assert eos not in free[1].tolist()
    with offload("tiny-mixtral", policy="fmoe", cache_experts=6, record=True) as lm:
        lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, eos_token_id=eos
        )
        with torch.no_grad():  # a forward outside generate: not a trace request
            lm.model(input_ids=torch.tensor([[3, 4]]))
        w = lm.workload()
    assert [(r.prompt_len, r.output_len) for r in w.requests] == [(4, 2), (2, 4)]
    assert [r.routing.num_tokens for r in w.requests] == [4 + 1, 2 + 3]


def test_workload_needs_record() -> None:
    with offload("tiny-mixtral", cache_experts=8) as lm:
        with pytest.raises(InputError, match="record=True"):
            lm.workload()


def test_generate_calls_from_two_threads_run_one_at_a_time() -> None:
    import threading

    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    want = [
        _generate(_ref("tiny-mixtral").model, torch.tensor([p]), None, 3).sequences for p in prompts
    ]
    got: dict[int, torch.Tensor] = {}
    with offload("tiny-mixtral", policy="fmoe", cache_experts=5) as lm:

        def call(i: int) -> None:
            got[i] = _generate(lm.model, torch.tensor([prompts[i]]), None, 3).sequences

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = lm.metrics()
    assert all(torch.equal(got[i], want[i]) for i in range(2))
    assert m["requests"] == 2 and m["tokens_generated"] == 6 and m["iterations"] == 6
