"""The hybrid experiments users run (issue 22): lossy quality says it is random weights,
the study's summary counts ties, the sanity rows use the published formats."""

from __future__ import annotations

import pandas as pd
import pytest


def test_hybrid_quality_reports_random_weights_agreement_kl_and_speedup(tmp_path, capsys):
    from experiments.hybrid_quality import main

    assert main(["--out", str(tmp_path), "--models", "tiny-mixtral", "--new-tokens", "2"]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    df = pd.read_csv(tmp_path / "hybrid_quality.csv")
    assert set(df.weights) == {"random"}
    assert {"token_agreement", "kl_mean", "wall_speedup_vs_exact"} <= set(df.columns)
    every = df[df.threshold.astype(str) == "1.0"]
    # every miss lossy: the runs say they were not exact, and agreement is a share
    assert len(every) == 2 and not every.exact.any() and (every.lossy_share_of_demands > 0).all()
    assert df.token_agreement.between(0, 1).all() and (df.kl_mean >= 0).all()


def test_hybrid_quality_refuses_an_unknown_model():
    from experiments.hybrid_quality import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "x", "--models", "tiny-nothing"])
    assert exc.value.code == 2


def test_study_summary_counts_a_tie_within_half_a_percent_as_lowest():
    from experiments.hybrid import summary

    rows = [
        ("s1", "fmoe-hybrid", True, 1.004),
        ("s1", "fiddler", True, 1.0),
        ("s1", "hobbit", False, 0.5),  # lossy: not a competitor
        ("s2", "fmoe-hybrid", True, 1.01),
        ("s2", "fiddler", True, 1.0),
    ]
    df = pd.DataFrame(rows, columns=["setting", "policy", "exact", "tpot_mean_s"])
    s = summary(df).set_index("setting")
    assert s.loc["s1", "lowest_or_tie"] and s.loc["s1", "best_other_policy"] == "fiddler"
    assert not s.loc["s2", "lowest_or_tie"]


def test_sanity_rows_run_the_published_weight_formats():
    from experiments.hybrid_sanity import FORMAT_OF, SETUPS

    for row in SETUPS:
        assert row["format"] == FORMAT_OF[row["published_format"]], row["setup"]
