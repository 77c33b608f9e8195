"""`fmoe calibrate bench` then `fmoe calibrate validate`, end to end on tiny-mixtral.

A small case (few points, 2 prompts, 3 new tokens, 3 policies x 3 cache sizes) so it
runs in CI; timing figures on a shared CI machine are noise, so the assertions are on
what must hold regardless: the profile is complete and valid, every pair ran, the real
runs routed as the captured trace, and for LRU (no prefetch: residency does not depend
on timing) the simulator's hit rate equals the measured one exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fmoe_cli.main import main
from specs.costs import transfer_time_s
from specs.hardware import HardwareProfile
from specs.presets import load_model


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "profile.json"
    argv = ["calibrate", "bench", "--model", "tiny-mixtral", "--link-gbps", "0.05"]
    argv += ["--repeats", "1", "--max-tokens", "8", "--max-context", "16"]
    argv += ["--overhead-rounds", "1", "--policies", "lru,fmoe", "--no-progress"]
    # one interference round and a 4-row search store (as the GPU check's dry run): the
    # same code paths; the defaults (7 rounds, 256 rows) tripled the fixture's time
    argv += ["--interference-rounds", "1", "--search-store-rows", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def test_bench_writes_a_calibrated_profile(profile_path: Path) -> None:
    p = HardwareProfile.from_json(profile_path)
    c = p.compute
    assert p.kind == "calibrated" and p.device == "cpu"
    assert c.fitted_for_model == "tiny-mixtral" and c.torch_threads is not None
    assert c.expert is not None and c.dense is not None and c.head is not None
    assert c.expert.knots and c.expert(1) > 0 and c.dense(1, 8) > 0
    assert p.link.emulated and p.link.emulated_gbps == 0.05
    # the copy engine sleeps each copy to at least bytes / 0.05 GB/s, so the fit predicts
    # about that for one expert (latency and slope trade off over small copies, their sum
    # does not); a loaded CI machine can only make copies slower
    nbytes = load_model("tiny-mixtral").expert_bytes
    assert 0.9 <= transfer_time_s(p, nbytes) / (nbytes / 0.05e9) <= 3.0
    assert set(c.fit_errors) >= {"expert", "dense", "head", "link"}
    assert all(math.isfinite(v) and v >= 0 for v in c.fit_errors.values())
    assert c.experts_wait_for_loads and set(c.policy_overhead_s) == {"fmoe"}
    assert 0.5 <= c.copy_interference <= 5.0  # 1 unless it stood out of the rounds' noise


def test_validate_runs_every_pair_and_reports_errors(
    profile_path: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "val"
    argv = ["calibrate", "validate", "--profile", str(profile_path), "--num-prompts", "2"]
    argv += ["--max-new-tokens", "3", "--max-prompt-tokens", "16", "--cache-experts", "8,16,24"]
    argv += ["--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    s, runs = doc["summary"], doc["runs"]
    assert len(runs) == 9 and s["requests"] == 18
    assert {r["policy"] for r in runs} == {"lru", "mixtral-offloading", "fmoe"}
    assert s["routing_matches_capture"] is True
    for k in ("ttft_mape", "tpot_mape", "e2e_mape", "hit_rate_abs_error_max"):
        assert s[k] is not None and math.isfinite(s[k]) and s[k] >= 0
    lru = [r for r in runs if r["policy"] == "lru"]
    assert all(r["real_hit_rate"] == r["sim_hit_rate"] for r in lru)
    assert all(r["real_bytes_h2d"] == r["sim_bytes_h2d"] for r in lru)
    # drift: every cell simulated again on compute scaled by its measured slowdown
    assert all(r["compute_slowdown"] > 0 for r in runs)
    assert all(r["sim_hit_rate_drift"] == r["real_hit_rate"] for r in lru)
    for r in lru:  # demand loads only: more (less) compute per step, longer (shorter) steps
        if r["compute_slowdown"] != 1.0:
            slower = r["compute_slowdown"] > 1.0
            assert (r["sim_tpot_mean_s_drift"] > r["sim_tpot_mean_s"]) == slower
    drift = s["drift_corrected"]
    assert set(drift) == {"ttft_mape", "tpot_mape", "e2e_mape", "hit_rate_abs_error_max",
                          "hit_rate_abs_error_mean"}  # fmt: skip
    assert all(v is not None and v >= 0 for v in drift.values())
    for name in ("runs.csv", "requests.csv", "summary.json", "sim_vs_real.png", "captured.fmoe"):
        assert (out / name).stat().st_size > 0
    assert (out / "sim_vs_real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validate_at_batch_size_2_runs_static_batches_on_both_sides(
    profile_path: Path, capsys
) -> None:
    """--batch-size 2 with 3 prompts (batches of 2 and 1): the real runs route as the
    batched capture, and LRU's demands and hits (no prefetch) match the simulator's static
    batches exactly: one row per real token on both sides, no pad rows."""
    argv = ["calibrate", "validate", "--profile", str(profile_path), "--num-prompts", "3"]
    argv += ["--max-new-tokens", "3", "--max-prompt-tokens", "16", "--cache-experts", "8"]
    argv += ["--policies", "lru", "--batch-size", "2", "--json", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    s, (run,) = doc["summary"], doc["runs"]
    assert s["batch_size"] == 2 and s["requests"] == 3 and s["routing_matches_capture"] is True
    assert run["real_hit_rate"] == run["sim_hit_rate"]
    assert run["real_bytes_h2d"] == run["sim_bytes_h2d"]
    assert run["real_demand_loads"] == run["sim_demand_loads"]


def test_validate_with_reference_lengths_simulates_the_same_output_lengths(
    profile_path: Path, capsys
) -> None:
    """--output-lens reference with continuous batching at B = 2 on GSM8K (limits 120, 114
    and 120 at a cap of 120: the third request joins mid-run): the real runs generate the
    limits and the simulator, replaying the capture, the same per-request lengths."""
    argv = ["calibrate", "validate", "--profile", str(profile_path), "--num-prompts", "3"]
    argv += ["--prompts", "gsm8k", "--output-lens", "reference", "--max-new-tokens", "120"]
    argv += ["--max-prompt-tokens", "16", "--cache-experts", "8", "--policies", "lru"]
    argv += ["--batch-size", "2", "--batching", "continuous", "--json", "--no-progress"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)["summary"]
    assert s["output_lens"] == "reference" and s["new_token_limits"] == [120, 114, 120]
    assert s["output_lens_match"] is True and s["routing_matches_capture"] is True


def test_validate_with_repeats_reports_medians_and_the_real_runs_spread(
    profile_path: Path, tmp_path: Path, capsys
) -> None:
    """--repeats 2: every cell's real side runs twice; the real figures are per-request
    medians (for lru, whose residency does not depend on timing, hits and bytes still
    equal the simulator's) and each cell reports the runs' TPOT and TTFT spread."""
    argv = ["calibrate", "validate", "--profile", str(profile_path), "--num-prompts", "2"]
    argv += ["--max-new-tokens", "3", "--max-prompt-tokens", "16", "--cache-experts", "8,16"]
    argv += ["--policies", "lru", "--repeats", "2", "--json", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    s, runs = doc["summary"], doc["runs"]
    assert s["repeats"] == 2 and len(runs) == 2 and s["requests"] == 4
    assert s["routing_matches_capture"] is True
    for r in runs:
        assert r["real_hit_rate"] == r["sim_hit_rate"]
        assert r["real_bytes_h2d"] == r["sim_bytes_h2d"]
        for k in ("real_tpot_mean_spread", "real_ttft_mean_spread"):
            assert r[k] is not None and math.isfinite(r[k]) and r[k] >= 0
    assert s["real_tpot_spread_median"] is not None and s["real_tpot_spread_median"] >= 0
    with pytest.raises(SystemExit) as exc:  # the flag's type refuses it before any work
        main([*argv[:-2], "--repeats", "0", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --repeats: expected a positive integer" in err[0]
