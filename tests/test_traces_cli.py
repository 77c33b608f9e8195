"""`fmoe trace ...` through fmoe_cli.main.main: JSON output, files, exit status 2 on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fmoe_cli.main import build_parser, main
from traces.io import load_workload

FIX = Path(__file__).parent / "fixtures"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_synth_info_stats_round(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_path = tmp_path / "s.trace"
    rc, out, _ = run(capsys, "trace", "synth", "--model", "tiny-mixtral", "--out", str(out_path), "--num-requests", "12",
                     "--popularity-skew", "2", "--no-with-lookahead", "--temporal-locality", "0.5", "--seed", "3", "--json")  # fmt: skip
    assert rc == 0
    made = json.loads(out)
    assert made["requests"] == 12 and made["path"] == str(out_path)
    w = load_workload(out_path)
    assert (
        w.provenance["config"]["popularity_skew"] == 2.0
        and w.provenance["config"]["temporal_locality"] == 0.5
    )
    assert not w.has_lookahead and w.has_gate_probs

    rc, out, _ = run(capsys, "trace", "info", str(out_path), "--json")
    info = json.loads(out)
    assert rc == 0
    assert {k: info[k] for k in ("requests", "layers", "experts", "top_k")} == {
        "requests": 12,
        "layers": 4,
        "experts": 8,
        "top_k": 2,
    }
    assert info["iterations"] == sum(r.output_len for r in w.requests)
    assert (info["has_gate_probs"], info["has_embeddings"], info["has_lookahead"]) == (
        True,
        True,
        False,
    )

    png = tmp_path / "heat.png"
    rc, out, _ = run(capsys, "trace", "stats", str(out_path), "--json", "--plot", str(png))
    s = json.loads(out)
    assert rc == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(s["popularity"]) == 4 and all(abs(sum(row) - 1) < 1e-4 for row in s["popularity"])
    assert s["reuse_distance_mean"] >= 1 and len(s["affinity_top1"]) == 3

    rc, out, _ = run(capsys, "trace", "stats", str(out_path))
    assert rc == 0 and "top_expert_share" in out and "reuse distance" in out


def test_synth_from_config_file_and_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"num_requests": 5, "preset": "sharegpt", "num_topics": 2}))
    rc, _, _ = run(
        capsys,
        "trace",
        "synth",
        "--model",
        "tiny-mixtral",
        "--config",
        str(cfg),
        "--num-topics",
        "3",
        "--out",
        str(tmp_path / "a.trace"),
    )
    w = load_workload(tmp_path / "a.trace")
    assert rc == 0 and len(w.requests) == 5 and w.provenance["config"]["num_topics"] == 3
    assert w.provenance["config"]["preset"] == "sharegpt"
    rc, out, _ = run(
        capsys,
        "trace",
        "synth",
        "--fit",
        str(tmp_path / "a.trace"),
        "--num-requests",
        "7",
        "--out",
        str(tmp_path / "f.trace"),
        "--json",
    )
    assert rc == 0 and json.loads(out)["requests"] == 7
    assert load_workload(tmp_path / "f.trace").provenance["source"] == "synthetic-fit"


def test_import_real_fixtures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run(
        capsys,
        "trace",
        "import",
        "--format",
        "switch-json",
        str(FIX / "switch_base_8_router_trace.json"),
        "--out",
        str(tmp_path / "s.trace"),
        "--json",
    )
    assert rc == 0 and json.loads(out)["requests"] == 10
    rc, out, err = run(
        capsys,
        "trace",
        "import",
        "--format",
        "routing-jsonl",
        str(FIX / "vllm_qwen1.5_moe_routes_excerpt.jsonl"),
        "--out",
        str(tmp_path / "q.trace"),
        "--prompt-len",
        "3",
    )
    assert rc == 0 and "import report" in err and "wrote" in out
    w = load_workload(tmp_path / "q.trace")
    assert (w.requests[0].prompt_len, w.spec.top_k) == (3, 4)


def test_import_with_explicit_fields(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "log.jsonl"
    rows = [
        {"conv": "a", "blk": layer, "step": t, "sel": [int((t + layer) % 8)]}
        for t in range(4)
        for layer in range(6)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, _ = run(capsys, "trace", "import", "--format", "routing-jsonl", str(log), "--out", str(tmp_path / "o.trace"), "--model", "switch-base-8",
                     "--field", "request=conv", "--field", "layer=blk", "--field", "token=step", "--field", "ids=sel", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["tokens"] == 4
    w = load_workload(tmp_path / "o.trace")
    np.testing.assert_array_equal(
        w.requests[0].routing.topk_ids[:, :, 0],
        [[(t + layer) % 8 for layer in range(6)] for t in range(4)],
    )
    assert w.provenance["topk_weights"].startswith("not in the log")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["trace", "info", "{bad}"], "not an fmoe trace file"),
        (["trace", "info", "{missing}"], "no such file"),
        (
            [
                "trace",
                "synth",
                "--model",
                "tiny-mixtral",
                "--out",
                "{out}",
                "--temporal-locality",
                "1.5",
            ],
            "argument --temporal-locality: expected a number >= 0 and <= 1",
        ),
        (["trace", "synth", "--model", "no-such-model", "--out", "{out}"], "unknown model preset"),
        (["trace", "synth", "--out", "{out}"], "--model is required"),
        (
            ["trace", "import", "--format", "switch-json", "{bad}", "--out", "{out}"],
            "not valid JSON",
        ),
        (
            [
                "trace",
                "import",
                "--format",
                "routing-jsonl",
                "{switch}",
                "--out",
                "{out}",
                "--field",
                "colour=x",
            ],
            "unknown key",
        ),
        (
            [
                "trace",
                "import",
                "--format",
                "switch-json",
                "{switch}",
                "--out",
                "{out}",
                "--layers",
                "0",
            ],
            "unexpected keyword",
        ),
        (["trace", "stats", "{bad}"], "bad.trace"),
        (["trace", "prompts", "mt-bench", "--n", "0"], "positive integer"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], needle: str
) -> None:
    bad = tmp_path / "bad.trace"
    bad.write_text("{this is not a trace")
    subs = {
        "{bad}": str(bad),
        "{missing}": str(tmp_path / "missing.trace"),
        "{out}": str(tmp_path / "out.trace"),
        "{switch}": str(FIX / "switch_base_8_router_trace.json"),
    }
    try:
        code = main([subs.get(a, a) for a in argv])
    except SystemExit as exc:  # argparse rejects the value itself
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err
    assert not (tmp_path / "out.trace").exists()


def test_prompts_command(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run(capsys, "trace", "prompts", "gsm8k", "--n", "2", "--json")
    rows = json.loads(out)
    assert rc == 0 and len(rows) == 2 and rows[0]["text"].startswith("Janet")


def test_capture_help_lists_its_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["trace", "capture", "--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out
