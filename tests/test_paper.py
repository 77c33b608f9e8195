"""The paper-reproduction layer: bundled workloads, reductions, and `fmoe demo` end to end."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fmoe_cli.main import main
from sim.paper import PAPER_TPOT_REDUCTION, paper_workload, reductions
from specs.errors import InputError
from specs.presets import load_model


def test_bundled_workloads_have_the_papers_mean_lengths_and_semantic_tags() -> None:
    spec = load_model("tiny-mixtral")
    lmsys = paper_workload("lmsys", spec, 200, seed=3)
    share = paper_workload("sharegpt", spec, 200, seed=3)
    for w, (p, o) in ((lmsys, (37, 127)), (share, (43, 122))):
        w.validate()
        mean_p = sum(r.prompt_len for r in w.requests) / len(w.requests)
        mean_o = sum(r.output_len for r in w.requests) / len(w.requests)
        assert abs(mean_p - p) / p < 0.25 and abs(mean_o - o) / o < 0.25
        assert all("topic" in r.tags for r in w.requests)
        assert w.has_embeddings and w.has_gate_probs and w.has_lookahead
    with pytest.raises(InputError, match="unknown workload"):
        paper_workload("nope", spec, 4)


def test_reductions_compare_fmoe_with_each_baseline() -> None:
    df = pd.DataFrame(
        [
            {"trace": t, "policy": p, "ttft_mean_s": ttft, "tpot_mean_s": tpot, "hit_rate": h}
            for t in ("a", "b")
            for p, ttft, tpot, h in (
                ("fmoe", 1.0, 0.5, 0.8),
                ("promoe", 2.0, 1.0, 0.5),
                ("lru", 4.0, 2.0, 0.4),
            )
        ]
    )
    red = reductions(df, baselines=["promoe", "lru"]).set_index("baseline")
    assert red.loc["promoe", "ttft_reduction"] == pytest.approx(0.5)
    assert red.loc["lru", "tpot_reduction"] == pytest.approx(0.75)
    assert red.loc["promoe", "hit_rate_gain"] == pytest.approx(0.3)
    assert red.loc["promoe", "paper_tpot_reduction"] == PAPER_TPOT_REDUCTION["promoe"]


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys) -> None:
    rc = main(
        [
            "demo",
            "--model",
            "tiny-mixtral",
            "--hardware",
            "rtx3090-pcie4",
            "--num-requests",
            "6",
            "--cache-gb",
            "0.0005",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    policies = {r["policy"] for r in out["runs"]}
    assert {
        "fmoe",
        "moe-infinity",
        "promoe",
        "mixtral-offloading",
        "deepspeed",
        "oracle",
        "no-offload",
    } <= policies
    hit = {(r["workload"], r["policy"]): r["hit_rate"] for r in out["runs"]}
    assert all(hit[(w, "no-offload")] == 1.0 for w in ("lmsys", "sharegpt"))
    assert {r["baseline"] for r in out["reductions"]} == {
        "deepspeed",
        "mixtral-offloading",
        "promoe",
        "moe-infinity",
    }
    for name in (
        "demo_runs.csv",
        "demo_reductions.csv",
        "demo_policies.png",
        "demo_reductions.png",
    ):
        assert (tmp_path / name).stat().st_size > 0
