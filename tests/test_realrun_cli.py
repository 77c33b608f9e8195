"""`fmoe run` and `fmoe trace capture`: JSON metrics under the simulator's names, the same
tokens for every policy and budget, emulation labelled, checkpoints, and bad input
rejected with one line and exit status 2 before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fmoe_cli.main import main
from fmoe_cli.sim import SUMMARY_KEYS
from realrun.models import load
from traces.io import load_workload

# the real executor reports the simulator's metric names (one table holds both)
SIM_METRICS = [k for k in SUMMARY_KEYS if k != "policy"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run_json(capsys, *argv) -> dict:
    rc = main(["run", *argv, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


BASE = [
    "--model",
    "tiny-mixtral",
    "--prompt",
    "Name three rivers.",
    "--prompt",
    "2+2?",
    "--max-new-tokens",
    "3",
]


def test_run_prints_simulator_metrics_and_a_token_hash(capsys):
    m = _run_json(capsys, *BASE, "--policy", "lru", "--cache-experts", "4")
    for k in SIM_METRICS + ["tokens_sha256", "emulated_link", "link_gbps"]:
        assert k in m
    assert m["emulated_link"] is False and m["requests"] == 2 and m["tokens_generated"] == 6
    assert 0 <= m["hit_rate"] <= 1 and m["cache_experts"] == [4] and m["cache_experts_total"] == 4
    assert m["layer_steps"] == 2 * 3 * 4
    assert m["bytes_h2d"] == m["loads"] * 98304


def test_a_static_batch_shares_its_forwards(capsys):
    """--batch-size 2: both prompts in one padded batch, so 3 forwards instead of 6, one
    TTFT (the batch's prefill) for both; batch size 1 is the default and reported."""
    one = _run_json(capsys, *BASE, "--policy", "lru", "--cache-experts", "4")
    two = _run_json(capsys, *BASE, "--policy", "lru", "--cache-experts", "4", "--batch-size", "2")
    assert one["batch_size"] == 1 and one["iterations"] == 6
    assert two["batch_size"] == 2 and two["iterations"] == 3 and two["layer_steps"] == 3 * 4
    assert two["requests"] == 2 and two["tokens_generated"] == 6
    assert two["ttft_p99_s"] == pytest.approx(two["ttft_mean_s"], rel=1e-9)
    assert 0 <= two["hit_rate"] <= 1 and two["hits"] + two["misses"] == two["demands"]


def test_tokens_do_not_depend_on_policy_budget_or_link(capsys):
    a = _run_json(capsys, *BASE, "--policy", "lru", "--cache-experts", "2")
    b = _run_json(
        capsys,
        *BASE,
        "--policy",
        "mixtral-offloading",
        "--cache-gb",
        "0.0008",
        "--link-gbps",
        "1",
        "--link-latency-us",
        "50",
    )
    c = _run_json(capsys, *BASE, "--policy", "no-offload", "--store", "ram")
    assert a["tokens_sha256"] == b["tokens_sha256"] == c["tokens_sha256"]
    assert (
        b["emulated_link"] is True
        and b["emulated"] is True
        and b["link_gbps"] == 1.0
        and b["link_latency_us"] == 50.0
    )
    assert b["cache_experts"] == [int(0.0008 * 2**30 // 98304)]
    assert c["hit_rate"] == 1.0 and c["bytes_h2d"] == 0


def test_a_local_checkpoint_runs_like_its_preset(capsys, tmp_path):
    load("tiny-mixtral").model.save_pretrained(tmp_path / "ckpt")
    a = _run_json(capsys, *BASE, "--policy", "lru", "--cache-experts", "3")
    BASE_CKPT = ["--model", str(tmp_path / "ckpt"), *BASE[2:]]
    b = _run_json(capsys, *BASE_CKPT, "--policy", "lru", "--cache-experts", "3")
    assert a["tokens_sha256"] == b["tokens_sha256"] and b["model"] == "ckpt"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "no-such-model", "--policy", "lru"], "unknown model 'no-such-model'"),
        (["--model", "mixtral-8x7b", "--policy", "lru"], "no local weights"),
        (
            ["--model", "tiny-olmoe", "--policy", "lru", "--cache-experts", "3"],
            "below what one layer needs: top-K = 4",
        ),
        (
            ["--model", "tiny-mixtral", "--policy", "oracle"],
            "reads the trace's future; it runs only in the simulator",
        ),
        (
            ["--model", "tiny-mixtral", "--policy", "no-offload", "--cache-experts", "8"],
            "keeps every expert resident",
        ),
        (
            ["--model", "tiny-mixtral", "--policy", "lru", "--cache-gb", "auto"],
            "cache_gb='auto' sizes the cache from free CUDA memory: device='cuda' only",
        ),
        (["--model", "tiny-mixtral", "--policy", "nope"], "unknown policy 'nope'"),
        (["--model", "tiny-mixtral", "--policy", "lru", "--device", "cuda"], "no CUDA device"),
        (
            ["--model", "tiny-mixtral", "--policy", "lru", "--link-latency-us", "5"],
            "needs --link-gbps",
        ),
        (["--model", "tiny-mixtral", "--policy", "lru", "--prompts", "nope"], "unknown prompt set"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, monkeypatch, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    import realrun.models

    def no_work(*a, **k):  # the error must come before any model is built
        raise AssertionError("model built before the input was checked")

    monkeypatch.setattr(realrun.models, "load", no_work)
    prompt = [] if "--prompts" in argv else ["--prompt", "x"]
    rc = main(["run", *argv, *prompt, "--json"])
    out = capsys.readouterr()
    assert rc == 2 and out.out == ""
    assert message in out.err and out.err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--model", "tiny-mixtral", "--policy", "lru"],
        ["trace", "capture", "--model", "tiny-mixtral", "--out", "x.fmoe"],
        ["calibrate", "validate", "--profile", "cpu-local"],
    ],
)
@pytest.mark.parametrize("bad", ["0", "-2", "two"])
def test_a_bad_batch_size_is_one_line_and_status_2(capsys, argv, bad):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--batch-size", bad])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "argument --batch-size: expected a positive integer" in err


def test_a_bad_batch_size_in_a_run_config_is_refused_before_any_work():
    from realrun.runner import RunConfig, prepare
    from specs.errors import InputError

    with pytest.raises(InputError, match="--batch-size must be >= 1, got 0"):
        prepare(RunConfig(model="tiny-mixtral", prompt_texts=["x"], batch_size=0))


def test_a_checkpoint_that_is_not_moe_is_refused_from_its_config(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    ).save_pretrained(tmp_path)
    rc = main(["run", "--model", str(tmp_path), "--policy", "lru", "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "not an MoE model" in err


def test_capture_writes_a_trace_the_run_reproduces(capsys, tmp_path):
    path = tmp_path / "cap.fmoe"
    rc = main(
        [
            "trace",
            "capture",
            "--model",
            "tiny-phimoe",
            "--prompt",
            "hello",
            "--prompt",
            "moe!",
            "--max-new-tokens",
            "3",
            "--out",
            str(path),
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    info = json.loads(out.out)
    assert info["has_gate_probs"] and info["has_embeddings"] and info["has_lookahead"]
    w = load_workload(path)
    assert w.provenance["source"] == "realrun.capture" and w.provenance["model"] == "tiny-phimoe"
    assert {"torch", "transformers", "seed"} <= set(w.provenance)
    assert [r.routing.num_tokens for r in w.requests] == [5 + 3 - 1, 4 + 3 - 1]
    # an offloaded run under a small cache records the same routing
    run_path = tmp_path / "run.fmoe"
    _run_json(
        capsys,
        "--model",
        "tiny-phimoe",
        "--prompt",
        "hello",
        "--prompt",
        "moe!",
        "--max-new-tokens",
        "3",
        "--policy",
        "lru",
        "--cache-experts",
        "2",
        "--trace-out",
        str(run_path),
    )
    w2 = load_workload(run_path)
    assert w2.provenance["source"] == "realrun.run"
    for a, b in zip(w.requests, w2.requests, strict=True):
        np.testing.assert_array_equal(a.routing.topk_ids, b.routing.topk_ids)
        np.testing.assert_array_equal(a.routing.gate_probs, b.routing.gate_probs)


def test_a_captured_trace_drives_the_simulator(capsys, tmp_path):
    path = tmp_path / "cap.fmoe"
    argv = [
        "trace",
        "capture",
        "--model",
        "tiny-qwen2-moe",
        "--prompt",
        "a prompt",
        "--max-new-tokens",
        "4",
    ]
    assert main([*argv, "--out", str(path)]) == 0
    capsys.readouterr()
    sim = ["sim", "--trace", str(path), "--hardware", "cpu-local", "--cache-experts", "8", "--json"]
    for policy in ("fmoe", "mixtral-offloading"):  # gate rows, embeddings, lookahead rows
        rc = main([*sim, "--policy", policy])
        out = capsys.readouterr()
        assert rc == 0, out.err
        m = json.loads(out.out)
        assert m["model"] == "tiny-qwen2-moe" and m["requests"] == 1 and m["demands"] > 0


def test_a_batched_capture_matches_a_batched_run_and_drives_the_simulator(capsys, tmp_path):
    """Capture and run at --batch-size 2 (prompts of 5 and 4 tokens: one padded row): the
    run records exactly the capture's routing, one row per real token, and the trace
    drives the simulator's static batches."""
    prompts = ["--prompt", "hello", "--prompt", "moe!", "--max-new-tokens", "3"]
    cap, run_path = tmp_path / "cap.fmoe", tmp_path / "run.fmoe"
    argv = ["trace", "capture", "--model", "tiny-phimoe", *prompts, "--batch-size", "2"]
    assert main([*argv, "--out", str(cap)]) == 0
    capsys.readouterr()
    m = _run_json(
        capsys,
        "--model",
        "tiny-phimoe",
        *prompts,
        "--policy",
        "lru",
        "--cache-experts",
        "2",
        "--batch-size",
        "2",
        "--trace-out",
        str(run_path),
    )
    w, w2 = load_workload(cap), load_workload(run_path)
    assert w.provenance["batch_size"] == 2 and m["batch_size"] == 2
    assert [r.routing.num_tokens for r in w.requests] == [5 + 3 - 1, 4 + 3 - 1]
    for a, b in zip(w.requests, w2.requests, strict=True):
        np.testing.assert_array_equal(a.routing.topk_ids, b.routing.topk_ids)
        np.testing.assert_array_equal(a.routing.gate_probs, b.routing.gate_probs)
    sim = ["sim", "--trace", str(cap), "--hardware", "cpu-local", "--cache-experts", "8"]
    rc = main([*sim, "--policy", "lru", "--batch-size", "2", "--batching", "static", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["requests"] == 2
