"""The server's parts that need no server: answer text and stop strings, token choice,
request checks, a checkpoint's chat template, and the simulator's schedule replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from realrun.serve.sampling import SamplingParams, next_tokens, sample_row
from realrun.serve.schemas import ApiError, check
from realrun.serve.text import TextAssembler
from realrun.tokenizer import ByteTokenizer
from sim.batching import ScheduleBatcher, schedule_batcher
from specs.errors import InputError
from tests.test_realrun_exactness import _make, _off, _ref, prompt_ids, setups

BYTES = ByteTokenizer(256)


# -- answer text -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    ids=st.lists(st.sampled_from([*b"ab\n", 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF]), max_size=24),
    stops=st.lists(st.text(alphabet="ab\né€", min_size=1, max_size=3), max_size=3),
)
def test_streamed_pieces_add_up_to_the_answer_cut_before_the_first_stop(ids, stops):
    """Whatever the tokens (UTF-8 split across tokens, invalid bytes) and stop strings:
    the pieces and the final flush add up to the answer; the answer is the decoded tokens
    fed so far, cut before the first stop string, and holds no stop string."""
    asm = TextAssembler(BYTES.decode, stops)
    pieces, fed = [], []
    for t in ids:
        if asm.stopped:
            break
        fed.append(t)
        pieces.append(asm.add(t))
    pieces.append(asm.flush())
    full = BYTES.decode(fed)
    hits = [full.find(s) for s in stops if s in full]
    want = full[: min(hits)] if hits else full
    assert "".join(pieces) == asm.text == want
    assert asm.stopped == bool(hits)
    assert not any(s in asm.text for s in stops)


def test_a_split_character_and_a_stop_prefix_are_held_back_until_they_resolve():
    asm = TextAssembler(BYTES.decode, ["STOP"])
    assert asm.add(ord("h")) == "h"
    assert asm.add(0xC3) == ""  # half of é
    assert asm.add(0xA9) == "é"
    assert asm.add(ord("S")) == "" and asm.add(ord("T")) == ""  # could become STOP
    assert asm.add(ord("x")) == "STx"
    for c in b"STOP":
        asm.add(c)
    assert asm.stopped and asm.text == "héSTx" and asm.flush() == ""


# -- token choice ----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    temp=st.floats(0.05, 2.0),
    top_p=st.floats(0.0, 1.0),
    rows=st.integers(1, 4),
)
def test_sampling_is_seeded_and_stays_in_the_nucleus(seed, temp, top_p, rows):
    """The same seed draws the same token; the token is among the most likely tokens
    whose probability before it is below top_p (top_p = 0: the argmax)."""
    logits = torch.randn(rows, 50, generator=torch.Generator().manual_seed(seed))
    p = SamplingParams(max_tokens=1, temperature=temp, top_p=top_p, seed=seed)
    a = next_tokens(logits, [p] * rows, [p.generator() for _ in range(rows)])
    b = next_tokens(logits, [p] * rows, [p.generator() for _ in range(rows)])
    assert a == b
    for r, tok in enumerate(a):
        x = logits[r].double()
        probs = torch.softmax((x - x.max()) / temp, -1)
        order = probs.argsort(descending=True).tolist()
        before = float(probs[order[: order.index(tok)]].sum())
        assert before < top_p or tok == order[0]


def test_temperature_zero_is_the_argmax_and_draws_nothing():
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    assert greedy.generator() is None
    assert next_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]  # first max on a tie
    hot = SamplingParams(max_tokens=1, temperature=1.0, seed=3)
    assert sample_row(logits[1], hot, hot.generator()) in range(4)
    cold = SamplingParams(max_tokens=1, temperature=5e-324, top_p=0.5, seed=3)  # no NaN
    assert sample_row(logits[1], cold, cold.generator()) == 0


# -- request checks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": "m", "prompt": "x", "seed": 2**64}, "seed"),
        ({"model": "m", "prompt": "x", "stop": ["a", ""]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        (
            {"model": "m", "prompt": "x", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "prompt": "x", "frobnicate": 1}, "frobnicate"),
    ],
)
def test_a_bad_completions_body_names_its_parameter(body, param):
    with pytest.raises(ApiError) as e:
        check(body, chat=False)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_neutral_values_of_unsupported_parameters_are_accepted():
    ok = check(
        {"model": "m", "prompt": [[1, 2]], "echo": False, "n": 1, "presence_penalty": 0,
         "logprobs": None, "user": "u", "stop": "x", "stream": True,
         "stream_options": {"include_usage": True}},
        chat=False,
    )  # fmt: skip
    assert ok.stop == ("x",) and ok.stream and ok.include_usage
    chat = check(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "max_completion_tokens": 3, "tool_choice": "none"},
        chat=True,
    )  # fmt: skip
    assert chat.body.max_completion_tokens == 3
    with pytest.raises(ApiError) as e:
        check({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, chat=True)
    assert e.value.param == "messages.0.role"


# -- a checkpoint's chat template ------------------------------------------------------------
def test_a_checkpoint_tokenizer_with_a_chat_template_renders_chat_requests(tmp_path):
    """A checkpoint directory whose tokenizer has a chat template: the chat endpoint's
    prompt is the template's ids (the app asks the tokenizer first, bytes only without)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from realrun.serve.app import Served, _Api
    from realrun.serve.schemas import ChatBody
    from realrun.tokenizer import tokenizer_for
    from specs.presets import load_model

    words = ["<unk>", "<s>", "hi", "there", "[user]", "[assistant]", "[system]"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", bos_token="<s>")
    fast.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    fast.save_pretrained(tmp_path)
    spec = load_model("tiny-mixtral")
    tok = tokenizer_for(str(tmp_path), spec, "checkpoint")
    msgs = [{"role": "user", "content": "hi there"}]
    ids = tok.chat_ids(msgs)
    assert ids == [words.index(w) for w in ["[user]", "hi", "there", "[assistant]"]]
    assert tok.decode(ids) == "[user] hi there [assistant]"
    assert BYTES.chat_ids(msgs) is None
    served = Served(None, None, "m", (), tok.encode, tok.chat_ids, 256, 512)  # type: ignore[arg-type]
    body = ChatBody.model_validate({"model": "m", "messages": msgs})
    assert _Api(served)._prompt(body) == (ids, None)


# -- the simulator replays a served schedule -------------------------------------------------
def test_the_schedule_batcher_admits_at_the_recorded_iterations_and_closes_gaps():
    it = [0]
    b = ScheduleBatcher([0, 0, 2, 7, 7], lambda: it[0])
    assert b.admit(waiting=5, running=0, more_coming=False) == 2
    it[0] = 1
    assert b.admit(3, 2, False) == 0
    it[0] = 2
    assert b.admit(3, 2, False) == 1
    it[0] = 4  # everything finished at iteration 4: the gap to 7 closes
    assert b.admit(2, 0, False) == 2
    assert b.admit(0, 2, False) == 0


def test_a_trace_without_a_schedule_is_refused_by_name():
    from traces.types import Request, Routing, Workload

    spec = __import__("specs.presets", fromlist=["load_model"]).load_model("tiny-mixtral")
    ids = np.zeros((2, spec.num_moe_layers, spec.top_k), dtype=np.int16)
    ids[..., 1] = 1
    req = Request("r0", 0.0, 1, 2, Routing(ids, np.ones(ids.shape, np.float32)))
    with pytest.raises(InputError, match="'r0'.*served_iteration"):
        schedule_batcher(Workload(spec, [req]), lambda: 0)
    req.tags["served_iteration"] = 3
    later = Request(
        "r1", 0.0, 1, 2, Routing(ids, np.ones(ids.shape, np.float32)), tags={"served_iteration": 1}
    )
    with pytest.raises(InputError, match="'r1'.*before"):
        schedule_batcher(Workload(spec, [req, later]), lambda: 0)


# -- the engine, without HTTP ----------------------------------------------------------------
@st.composite
def engine_cases(draw):
    arch, ndev, cache, policy = draw(setups())
    n = draw(st.integers(1, 5))
    prompts = draw(prompt_ids(arch, n))
    limits = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    return arch, ndev, cache, policy, prompts, limits, draw(st.integers(1, 3))


@pytest.mark.usefixtures("one_torch_thread")
@settings(max_examples=12, deadline=None)
@given(engine_cases())
def test_the_engine_serves_every_policy_exactly_and_records_every_request(case):
    """Every architecture, policy, cache size and device count: requests queued before the
    engine starts join as generate_continuous admits them (FCFS up to max_batch), so each
    greedy answer equals the unmodified model's run through it, token for token; every
    request is recorded with its tokens and the iteration it joined."""
    import queue

    from realrun.continuous import generate_continuous
    from realrun.prompting import Prompt
    from realrun.serve.engine import Finished, Job, ServingEngine
    from realrun.session import RunSession, SessionOptions

    arch, ndev, cache, policy, prompts, limits, batch = case
    want = generate_continuous(
        _ref(arch).model, [Prompt(f"r{i}", p) for i, p in enumerate(prompts)], limits, batch
    )
    opts = SessionOptions(cache, [torch.device("cpu")] * ndev, record=True)
    events: queue.Queue = queue.Queue()
    with RunSession(_off(arch), _make(policy), opts) as session:
        engine = ServingEngine(session, BYTES.decode, max_batch=batch, max_queue=len(prompts))
        jobs = [
            Job(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0), events.put)
            for i, (p, n) in enumerate(zip(prompts, limits, strict=True))
        ]
        for job in jobs:
            engine.submit(job)
        engine.start()
        ends: list[Finished] = []
        while len(ends) < len(jobs):
            ev = events.get(timeout=120)
            if isinstance(ev, Finished):
                ends.append(ev)
        engine.stop()
        counters = session.counters()
    assert [j.output_ids for j in jobs] == [g.output_ids for g in want], (arch, policy, cache)
    assert all(e.reason == "length" for e in ends)
    recorded = engine.trace_requests()
    assert [r.request_id for r in recorded] == [j.request_id for j in jobs]
    assert [r.output_len for r in recorded] == limits
    assert [r.tags["served_iteration"] for r in recorded] == [j.served_iteration for j in jobs]
    assert counters.hits + counters.misses == counters.demands > 0
