"""Continuous batching in the real executor (realrun.continuous): packed rows without
padding, requests joining mid-run, TTFT from admission, the KV cache cut to live requests,
expert work on real tokens only, exactness against the unmodified model, and captured
traces replayed by the simulator's continuous batcher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationStart, RequestArrival
from realrun.capture import CaptureConfig, capture
from realrun.continuous import PackedKV, generate_continuous
from realrun.generate import IterationRows, greedy_generate
from realrun.models import load
from realrun.prompting import Prompt
from realrun.serving import BATCHING, generate_all
from realrun.session import RunSession, SessionOptions
from tests.recording_policy import EventRecorder
from tests.test_realrun_batch import count_expert_rows
from tests.test_realrun_exactness import ARCH_PRESETS, _make, _off, _ref, prompt_ids, setups

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["Why is the sky blue?", "Hi", "Name three rivers", "2+2?"]
LIMITS = [4, 1, 3, 2]  # q1 finishes first, so q2 joins while q0 decodes
ATOL = 1e-5  # logits vs one-at-a-time: float rounding only (measured <= 3e-7 on the tiny presets)


def _prompts(arch: str, texts=TEXTS) -> list[Prompt]:
    tok = _ref(arch).tokenizer
    return [Prompt(f"q{i}", tok.encode(t)) for i, t in enumerate(texts)]


class Seen:
    """An observer that keeps each forward's rows and finished requests."""

    def __init__(self, kv: list[PackedKV] | None = None) -> None:
        self.rows: list[IterationRows] = []
        self.finished: list[tuple[str, ...]] = []
        self.kv = kv
        self.cache_len: list[tuple[int, set[int]]] = []

    def begin_iteration(self, rows: IterationRows) -> None:
        self.rows.append(rows)
        if self.kv:
            packed = self.kv[0]
            layers = {
                int(lyr.keys.shape[-2]) for lyr in packed.cache.layers if lyr.keys is not None
            }
            self.cache_len.append((packed.length(), layers))

    def end_iteration(self, finished: tuple[str, ...]) -> None:
        self.finished.append(finished)


def test_the_batching_names_are_the_simulators():
    from sim.batching import BATCHERS

    assert tuple(BATCHERS) == BATCHING


@pytest.mark.parametrize("arch", ARCH_PRESETS)
def test_continuous_batching_generates_what_one_at_a_time_does(arch):
    """Prompts of different lengths and limits, B = 2: every request's tokens equal its solo
    greedy run's; logits agree to ATOL (different matmul shapes and softmax widths)."""
    model = _ref(arch).model
    prompts = _prompts(arch)
    got = generate_continuous(model, prompts, LIMITS, 2, keep_logits=True)
    for p, g, n in zip(prompts, got, LIMITS, strict=True):
        solo = greedy_generate(model, p.request_id, p.ids, n, keep_logits=True)
        assert g.output_ids == solo.output_ids, (arch, p.request_id)
        assert len(g.logits) == n
        for a, b in zip(g.logits, solo.logits, strict=True):
            assert torch.allclose(a, b, atol=ATOL, rtol=0), (arch, (a - b).abs().max())


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_a_sliding_window_is_applied_by_the_mask(arch):
    """A 4-token window (prompts longer than it) on every layer (Mixtral: one mask) or on
    alternate layers (Qwen2-MoE ``layer_types``: a mask per kind): the packed cache keeps
    full layers and the masks apply the window, as the library's sliding-window cache
    does for one request at a time."""
    loaded = load(arch)
    cfg = loaded.model.config
    cfg.sliding_window = 4
    if arch == "tiny-qwen2-moe":
        cfg.layer_types = ["full_attention", "sliding_attention"] * (cfg.num_hidden_layers // 2)
    prompts = _prompts(arch)
    got = generate_continuous(loaded.model, prompts, LIMITS, 3, keep_logits=True)
    for p, g, n in zip(prompts, got, LIMITS, strict=True):
        solo = greedy_generate(loaded.model, p.request_id, p.ids, n, keep_logits=True)
        assert g.output_ids == solo.output_ids
        for a, b in zip(g.logits, solo.logits, strict=True):
            assert torch.allclose(a, b, atol=ATOL, rtol=0), (a - b).abs().max()
    full = generate_continuous(_ref(arch).model, prompts[:1], 1, 1, keep_logits=True)
    assert not torch.allclose(full[0].logits[0], got[0].logits[0], atol=ATOL, rtol=0)


def test_a_request_joining_mid_run_counts_its_ttft_from_its_admission():
    """B = 2, limits 4, 1, 3, 2: q1 finishes at the prefill; q2 joins the next forward beside
    q0's first decode row (its prompt rows, then nothing padded); its TTFT is that forward's
    time, the same as q0's decode step there; q3 joins alone once q0 and q2 have finished."""
    prompts = _prompts("tiny-mixtral")
    lens = [len(p.ids) for p in prompts]
    seen, admitted = Seen(), []
    got = generate_continuous(
        _ref("tiny-mixtral").model,
        prompts,
        LIMITS,
        2,
        observer=seen,
        on_admit=lambda group: admitted.append([p.request_id for p in group]),
    )
    assert [len(g.output_ids) for g in got] == LIMITS
    assert admitted == [["q0", "q1"], ["q2"], ["q3"]]
    assert [r.batch for r in seen.rows] == [
        ("q0", "q1"),
        ("q0", "q2"),
        ("q0", "q2"),
        ("q0", "q2"),
        ("q3",),
        ("q3",),
    ]
    assert seen.finished == [("q1",), (), (), ("q0", "q2"), (), ("q3",)]
    join = seen.rows[1]
    assert join.real is None
    assert join.request_ids == ("q0",) + ("q2",) * lens[2]
    assert join.positions.tolist() == [lens[0]] + list(range(lens[2]))
    assert join.prefill.tolist() == [False] + [True] * lens[2]
    q0, q2 = got[0], got[2]
    assert q2.ttft_s == q0.decode_s[0] and q2.decode_s == q0.decode_s[1:3]
    assert q2.batch_size == 2 and got[3].batch_size == 1
    assert got[3].ttft_s not in q0.decode_s


def test_the_kv_cache_holds_only_the_live_requests_tokens():
    """Before every forward the cache holds exactly the tokens processed so far of the
    requests still running (every layer alike); after the last finish it is empty."""
    prompts = _prompts("tiny-qwen2-moe")
    kv: list[PackedKV] = []
    seen = Seen(kv)
    got = generate_continuous(
        _ref("tiny-qwen2-moe").model, prompts, LIMITS, 2, observer=seen, kv=kv
    )
    by_id = {g.request_id: g for g in got}
    done_tokens: dict[str, int] = {}
    for rows, (length, layers) in zip(seen.rows, seen.cache_len, strict=True):
        want = sum(done_tokens.get(r, 0) for r in rows.batch)
        assert length == want and layers <= {want}, (rows.batch, length, want, layers)
        for r in rows.batch:
            done_tokens[r] = done_tokens.get(r, 0) + rows.request_ids.count(r)
    assert sum(done_tokens.values()) == sum(
        len(g.prompt_ids) + len(g.output_ids) - 1 for g in by_id.values()
    )
    assert kv[0].length() == 0
    assert all(lyr.keys.shape[-2] == 0 for lyr in kv[0].cache.layers)


@pytest.mark.parametrize("arch", ["tiny-mixtral", "tiny-olmoe"])
def test_expert_work_is_real_tokens_times_top_k_times_layers(arch, monkeypatch):
    """Policy events, cache demands, expert compute and the recorded trace cover exactly
    the real tokens: (sum of prompts + decode rows) x top-K per MoE layer; each request
    arrives when admitted (after the forward that freed its slot)."""
    spec = _ref(arch).spec
    computed = count_expert_rows(monkeypatch)
    prompts = _prompts(arch)
    policy = EventRecorder()
    opts = SessionOptions(spec.total_experts // 2, record=True)
    with RunSession(_off(arch), policy, opts) as s:
        gens = s.serve(prompts, LIMITS, 2, "continuous")
        m = s.metrics()
        trace = s.recorder.requests
    real_tokens = sum(len(p.ids) + n - 1 for p, n in zip(prompts, LIMITS, strict=True))
    L, K = spec.num_moe_layers, spec.top_k
    assert computed[0] == real_tokens * K * L
    gates = [e for e in policy.events if isinstance(e, GateOutput)]
    starts = [e for e in policy.events if isinstance(e, IterationStart)]
    assert sum(len(g.topk_ids) for g in gates) == real_tokens * L
    assert sum(len(st.request_ids) for st in starts) == real_tokens
    assert m["demands"] == sum(len(np.unique(g.topk_ids)) for g in gates)
    assert m["iterations"] == len(starts) == 6 and m["batch_size"] == 2
    kinds = [
        (type(e).__name__, getattr(e, "request_id", None))
        for e in policy.events
        if isinstance(e, RequestArrival | IterationEnd)
    ]
    assert kinds[:3] == [("RequestArrival", "q0"), ("RequestArrival", "q1"), ("IterationEnd", None)]
    assert kinds[3] == ("RequestArrival", "q2")
    for p, g, r in zip(prompts, gens, trace, strict=True):
        assert r.request_id == p.request_id and r.prompt_len == len(p.ids)
        assert r.output_len == len(g.output_ids) and len(r.routing.topk_ids) == (
            len(p.ids) + r.output_len - 1
        )


@st.composite
def continuous_cases(draw):
    arch, ndev, cache, policy = draw(setups())
    n = draw(st.integers(1, 4))
    prompts = [Prompt(f"r{i}", ids) for i, ids in enumerate(draw(prompt_ids(arch, n)))]
    limits = draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    B = draw(st.integers(1, 3))
    return arch, ndev, cache, policy, prompts, limits, B


@settings(max_examples=12, deadline=None)
@given(continuous_cases())
def test_offloaded_continuous_batching_equals_the_unmodified_model(case):
    """Every policy, cache size, device count and B, prompts of different lengths and
    limits (requests join mid-run): every request's tokens and every logits row equal,
    bit for bit, the unmodified model's run through the same function."""
    arch, ndev, cache, policy, prompts, limits, B = case
    ref = generate_continuous(_ref(arch).model, prompts, limits, B, keep_logits=True)
    opts = SessionOptions(cache, [torch.device("cpu")] * ndev)
    with RunSession(_off(arch), _make(policy), opts) as s:
        got = s.serve(prompts, limits, B, "continuous", keep_logits=True)
        m = s.metrics()
    for g, r in zip(got, ref, strict=True):
        assert g.output_ids == r.output_ids, (arch, policy, cache)
        assert len(g.logits) == len(r.logits)
        for a, b in zip(g.logits, r.logits, strict=True):
            assert torch.equal(a, b), (arch, policy, cache, (a - b).abs().max())
    assert m["hits"] + m["misses"] == m["demands"]


def test_static_serving_with_per_request_limits_matches_one_at_a_time():
    """The shared step also serves static batches with one limit per prompt."""
    loaded = _ref("tiny-mixtral")
    prompts = _prompts("tiny-mixtral")
    got = generate_all(
        loaded.model, prompts, LIMITS, 2, "static", experts=[b.experts for b in loaded.blocks]
    )
    for p, g, n in zip(prompts, got, LIMITS, strict=True):
        assert g.output_ids == greedy_generate(loaded.model, "x", p.ids, n).output_ids


def replay_continuous(workload, policy: str, cache_experts: int, batch_size: int):
    """The simulator's closed-loop continuous batcher on ``workload`` (cpu-local hardware)."""
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware

    cfg = SimConfig(
        model=workload.spec,
        hardware=load_hardware("cpu-local"),
        policy=policy,
        cache_experts=cache_experts,
        batch_size=batch_size,
        batching="continuous",
        arrivals="closed",
    )
    return simulate(workload, cfg)


def test_a_continuous_capture_replays_in_the_simulator(tmp_path):
    """Capture at B = 2 with continuous batching: the trace's routing is the solo
    capture's, and the simulator's continuous batcher runs it in as many iterations as the
    real run had (it admits alike)."""
    from traces.io import load_workload

    texts = ["Why is the sky blue?", "Hi", "Name three rivers"]
    kw = dict(model="tiny-mixtral", prompts=None, prompt_texts=texts, max_new_tokens=3)
    cont = capture(
        CaptureConfig(out=str(tmp_path / "c.fmoe"), batch_size=2, batching="continuous", **kw)
    )
    solo = capture(CaptureConfig(out=str(tmp_path / "s.fmoe"), **kw))
    assert cont.provenance["batching"] == "continuous"
    w = load_workload(tmp_path / "c.fmoe")
    for a, b in zip(w.requests, solo.requests, strict=True):
        np.testing.assert_array_equal(a.routing.topk_ids, b.routing.topk_ids)
        # the file keeps gate rows at float16 (format v2): relative error <= 2^-11
        np.testing.assert_allclose(
            a.routing.gate_probs, b.routing.gate_probs, rtol=2**-10, atol=1e-5
        )
    res = replay_continuous(w, "fmoe", 8, 2)
    seen = Seen()
    prompts = _prompts("tiny-mixtral", texts)
    generate_continuous(_ref("tiny-mixtral").model, prompts, 3, 2, observer=seen)
    assert res.metrics["requests"] == 3 and res.metrics["iterations"] == len(seen.rows)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--model", "tiny-mixtral", "--policy", "lru"],
        ["trace", "capture", "--model", "tiny-mixtral", "--out", "x.fmoe"],
        ["calibrate", "validate", "--profile", "cpu-local"],
    ],
)
def test_a_bad_batching_is_one_line_and_status_2(capsys, argv):
    from fmoe_cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([*argv, "--batching", "dynamic"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "argument --batching: invalid choice: 'dynamic'" in err


def test_a_bad_batching_in_a_config_is_refused_before_any_work():
    from realrun.runner import RunConfig, prepare
    from specs.errors import InputError

    with pytest.raises(InputError, match="unknown --batching 'dynamic'"):
        prepare(RunConfig(model="tiny-mixtral", prompt_texts=["x"], batching="dynamic"))


def test_fmoe_run_continuous_generates_the_static_tokens(capsys):
    """`fmoe run --batching continuous` reports its batching and the same tokens as static."""
    from fmoe_cli.main import main

    base = ["run", "--model", "tiny-mixtral", "--policy", "lru", "--cache-experts", "4"]
    base += ["--prompt", "hello there", "--prompt", "x", "--prompt", "moe", "--max-new-tokens", "3"]
    out = {}
    for b in BATCHING:
        assert main([*base, "--batch-size", "2", "--batching", b, "--json"]) == 0
        out[b] = json.loads(capsys.readouterr().out)
    assert out["continuous"]["batching"] == "continuous"
    assert out["continuous"]["tokens_sha256"] == out["static"]["tokens_sha256"]
