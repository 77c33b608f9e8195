"""The quality table of the issue: runs shared between equal variants, the table's layout,
and the claims checked on it."""

from __future__ import annotations

import pandas as pd

from sim.paper import PaperSetup, quality_checks, quality_table, run_quality


def _rows(values: dict[str, tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"variant": v, "group": g, "workload": w, "hit_rate": h, "tpot_mean_s": t}
            for w in ("lmsys", "sharegpt")
            for v, (g, h, t) in values.items()
        ]
    )


def test_checks_name_each_claim_and_whether_it_holds() -> None:
    table = quality_table(
        _rows(
            {
                "fmoe": ("fmoe", 0.7, 0.2),
                "promoe": ("baseline", 0.5, 0.3),
                "moe-infinity": ("baseline", 0.72, 0.25),  # higher hit rate: fmoe loses
                "oracle": ("bound", 0.9, 0.1),  # bounds are not baselines
                "fmoe prediction=traj": ("ablation: prediction", 0.6, 0.3),
                "fmoe prediction=traj+sem": ("ablation: prediction", 0.7, 0.2),
                "fmoe prediction=traj+sem+delta": ("ablation: prediction", 0.7, 0.2),
            }
        )
    )
    assert list(table["variant"])[:2] == ["fmoe", "promoe"]
    assert {"hit_rate_lmsys", "tpot_s_sharegpt", "hit_rate", "tpot_mean_s"} <= set(table)
    got = {c["claim"]: c["holds"] for c in quality_checks(table)}
    assert got == {
        "fmoe beats promoe": True,
        "fmoe beats moe-infinity": False,
        "prediction: traj < traj+sem < traj+sem+delta (hit rate)": False,  # a tie is no gain
    }


def test_run_quality_shares_runs_of_equal_variants() -> None:
    setup = PaperSetup(model="tiny-mixtral", num_requests=5, workers=1, workloads=["lmsys"])
    variants = {
        "fmoe": ("fmoe", "fmoe", {}),
        "fmoe prediction=traj+sem+delta": ("ablation", "fmoe", {"prediction": "traj+sem+delta"}),
        "fmoe prediction=traj": ("ablation", "fmoe", {"prediction": "traj"}),
        "lru": ("baseline", "lru", {}),
    }
    df = run_quality(setup, variants, progress=False)
    assert list(df["variant"]) == list(variants)
    by = df.set_index("variant")
    assert by.loc["fmoe", "wall_s"] == by.loc["fmoe prediction=traj+sem+delta", "wall_s"]  # one run
    assert by.loc["fmoe", "wall_s"] != by.loc["fmoe prediction=traj", "wall_s"]
    assert (df["hit_rate"].between(0, 1)).all() and (df["tpot_mean_s"] > 0).all()


def test_delta_regimes_count_widened_predictions_only_where_delta_is_on() -> None:
    from experiments.delta_regimes import REGIMES, study_delta_regimes

    setup = PaperSetup(model="tiny-mixtral", num_requests=6, workers=1, workloads=["lmsys"])
    df = study_delta_regimes(setup)
    assert len(df) == 3 * len(REGIMES)
    assert (df["searches"] > 0).all()
    assert (df.loc[df["prediction"] != "traj+sem+delta", "widened"] == 0).all()
    weakest = df[(df["regime"] == list(REGIMES)[-1]) & (df["prediction"] == "traj+sem+delta")]
    assert int(weakest["widened"].iloc[0]) > 0  # a 5-row store of noisy, flat maps: weak matches


def test_scaled_cache_holds_the_same_share_of_every_models_experts() -> None:
    from sim.paper import PAPER_CACHE_GB, scaled_cache_gb
    from specs.presets import load_model

    assert scaled_cache_gb("mixtral-8x7b") == PAPER_CACHE_GB
    share = PAPER_CACHE_GB / load_model("mixtral-8x7b").experts_total_bytes
    for name in ("qwen1.5-moe-a2.7b", "phi-3.5-moe", "tiny-mixtral"):
        expected = share * load_model(name).experts_total_bytes
        assert abs(scaled_cache_gb(name) - expected) <= 0.05 + 1e-9


def test_study_scripts_take_a_model_and_refuse_an_unknown_one(
    monkeypatch, capsys, tmp_path
) -> None:
    import sys

    import pytest

    from experiments._common import parse
    from sim.paper import scaled_cache_gb

    argv = ["quality", "--model", "phi-3.5-moe", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    setup, _ = parse("study")
    assert setup.model == "phi-3.5-moe"
    assert setup.cache_gb == scaled_cache_gb("phi-3.5-moe")
    monkeypatch.setattr(sys, "argv", ["quality", "--model", "no-such-model"])
    with pytest.raises(SystemExit) as exc:
        parse("study")
    assert exc.value.code == 2
    assert "no-such-model" in capsys.readouterr().err
