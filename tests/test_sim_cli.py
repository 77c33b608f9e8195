"""`fmoe sim` and `fmoe sweep` end to end on tiny workloads, and their bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from fmoe_cli.main import main
from sim.metrics import WALL_CLOCK_KEYS
from specs.presets import load_model
from tests.strategies import random_workload
from traces.io import save_workload

REQUIRED = [
    "policy",
    "hit_rate",
    "ttft_mean_s",
    "ttft_p99_s",
    "tpot_mean_s",
    "tpot_p99_s",
    "e2e_mean_s",
    "bytes_h2d",
    "prefetch_accuracy",
    "layer_steps",
    "wall_s",
]


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traces") / "tiny.fmoetrace"
    save_workload(
        random_workload(load_model("tiny-mixtral"), num_requests=5, seed=3, max_output=6), path
    )
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def sim_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    rc, out, err = run_cli(capsys, "sim", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_sim_prints_one_json_object_with_the_metrics(capsys, trace: Path) -> None:
    m = sim_json(
        capsys,
        "--model",
        "tiny-mixtral",
        "--hardware",
        "cpu-local",
        "--policy",
        "lru",
        "--trace",
        str(trace),
        "--cache-experts",
        "8",
    )
    for key in REQUIRED:
        assert key in m
    assert m["policy"] == "lru" and m["requests"] == 5
    assert 0.0 <= m["hit_rate"] <= 1.0
    assert m["bytes_h2d"] == m["loads"] * load_model("tiny-mixtral").expert_bytes
    assert m["emulated"] is True  # cpu-local's link is an emulation
    assert sum(m["cache_experts"]) == 8


def test_sim_same_inputs_give_identical_json(capsys, trace: Path) -> None:
    argv = (
        "--hardware",
        "paper-6x3090",
        "--policy",
        "fmoe",
        "--trace",
        str(trace),
        "--cache-gb",
        "0.002",
        "--offline",
        "--batch-size",
        "2",
    )
    a, b = sim_json(capsys, *argv), sim_json(capsys, *argv)
    for k in WALL_CLOCK_KEYS:
        a.pop(k), b.pop(k)
    assert a == b
    assert a["offline"] is True and a["arrivals"] == "closed"
    assert a["requests"] == 5 - round(0.7 * 5)  # the test part of the 70/30 split
    assert a["num_gpus"] == 6


def test_sim_synth_and_chrome_trace(capsys, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    m = sim_json(
        capsys,
        "--model",
        "tiny-mixtral",
        "--hardware",
        "paper-6x3090",
        "--policy",
        "lru",
        "--synth",
        "--synth-requests",
        "3",
        "--cache-experts",
        "6",
        "--chrome-trace",
        str(out),
    )
    doc = json.loads(out.read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["cat"] for e in spans} == {"h2d", "compute"}
    assert {e["pid"] for e in spans if e["cat"] == "h2d"} <= set(range(6))
    h2d_bytes = sum(e["args"]["bytes"] for e in spans if e["cat"] == "h2d")
    assert h2d_bytes == m["bytes_transferred"] > 0


def test_sim_table_output_and_requests_csv(capsys, trace: Path, tmp_path: Path) -> None:
    csv = tmp_path / "req.csv"
    rc, out, _ = run_cli(
        capsys,
        "sim",
        "--hardware",
        "cpu-local",
        "--policy",
        "lfu",
        "--trace",
        str(trace),
        "--per-gpu-cache-gb",
        "0.001",
        "--requests-out",
        str(csv),
    )
    assert rc == 0 and "hit_rate" in out
    df = pd.read_csv(csv)
    assert list(df.columns[:3]) == ["id", "arrival_s", "start_s"] and len(df) == 5
    assert (df.e2e_s >= df.ttft_s).all()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["--model", "tiny-mixtral", "--policy", "lru", "--cache-experts", "1"],
            "below top-K (2 experts)",
        ),
        (
            ["--model", "tiny-mixtral", "--policy", "lru", "--cache-gb", "0.00001"],
            "below top-K (2 experts)",
        ),
        (["--model", "tiny-olmoe", "--policy", "lru"], "'tiny-mixtral'"),
        (["--model", "no-such-model", "--policy", "lru"], "unknown model preset 'no-such-model'"),
        (["--model", "tiny-mixtral", "--policy", "no-such-policy"], "unknown policy"),
        (["--model", "mixtral-8x7b", "--policy", "lru"], "'tiny-mixtral'"),
        (["--policy", "no-offload", "--cache-experts", "4"], "keeps all 32 experts resident"),
    ],
)
def test_sim_bad_input_is_one_line_and_status_2(
    capsys, trace: Path, argv: list[str], needle: str
) -> None:
    rc, out, err = run_cli(capsys, "sim", "--hardware", "cpu-local", "--trace", str(trace), *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and needle in err


def test_sim_unknown_hardware_and_missing_trace(capsys, trace: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(
        capsys, "sim", "--hardware", "no-such-gpu", "--policy", "lru", "--trace", str(trace)
    )
    assert rc == 2 and "unknown hardware preset 'no-such-gpu'" in err
    rc, _, err = run_cli(
        capsys,
        "sim",
        "--hardware",
        "cpu-local",
        "--policy",
        "lru",
        "--trace",
        str(tmp_path / "missing.fmoetrace"),
    )
    assert rc == 2 and "no such file" in err and err.count("\n") == 1


def test_sweep_writes_results_and_plots(capsys, trace: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    rc, stdout, err = run_cli(
        capsys,
        "sweep",
        "--hardware",
        "paper-6x3090",
        "--policies",
        "lru,lfu,no-offload",
        "--traces",
        str(trace),
        "--cache-experts",
        "6,12",
        "--out",
        str(out),
        "--json",
    )
    assert rc == 0, err
    doc = json.loads(stdout)
    df = pd.read_csv(out / "results.csv")
    # 2 policies x 2 budgets, plus no-offload once (it keeps every expert resident)
    assert len(df) == len(doc["rows"]) == 5
    assert sorted(df.policy.unique()) == ["lfu", "lru", "no-offload"]
    assert df.error.isna().all()
    assert df.loc[df.policy == "no-offload", "hit_rate"].item() == 1.0
    small, big = (
        df[(df.policy == "lru") & (df.cache_experts_budget == n)].iloc[0] for n in (6, 12)
    )
    assert big.hit_rate >= small.hit_rate
    for name in ("pareto_latency_memory.png", "hit_rate_vs_cache.png", "ttft_tpot_bars.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sweep" in err  # the progress bar is on stderr


def test_sweep_parquet_and_a_failing_combination(capsys, trace: Path, tmp_path: Path) -> None:
    rc, _, err = run_cli(
        capsys,
        "sweep",
        "--hardware",
        "cpu-local",
        "--policies",
        "lru",
        "--traces",
        str(trace),
        "--cache-experts",
        "1,8",
        "--out",
        str(tmp_path),
        "--format",
        "parquet",
        "--no-plots",
        "--quiet",
    )
    assert rc == 0
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert df.error.notna().tolist() == [True, False]
    assert "below top-K" in err
