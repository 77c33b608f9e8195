"""Calibrated profiles: JSON round trip, and bad input to `fmoe calibrate` as one line, status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmoe_cli.main import main
from specs.hardware import HardwareProfile, LinearCost
from tests.test_sim_kit import exact_profile


def calibrated(model: str = "tiny-mixtral", device: str = "cpu") -> HardwareProfile:
    hw = exact_profile()
    compute = hw.compute.model_copy(
        update={
            "fitted_for_model": model,
            "expert": LinearCost(fixed_s=3e-3, per_token_s=6e-4, knots=[(1, 3e-3), (2, 6e-3)]),
            "layer_overhead_s": 3e-4,
            "policy_overhead_s": {"fmoe": 1e-4},
            "policy_overhead_per_row_s": {"fmoe": 2e-6},
            "experts_wait_for_loads": True,
            "torch_threads": 1,
            "fit_errors": {"expert": 0.01},
        }
    )
    link = hw.link.model_copy(update={"emulated": True, "emulated_gbps": 0.05})
    return hw.model_copy(
        update={"compute": compute, "link": link, "device": device, "name": "calibrated-test"}
    )


def test_profile_round_trips_through_json(tmp_path: Path) -> None:
    p = calibrated()
    p.to_json(tmp_path / "p.json")
    back = HardwareProfile.from_json(tmp_path / "p.json")
    assert back == p
    assert back.compute.expert is not None and back.compute.expert(1.5) == pytest.approx(4.5e-3)
    assert back.compute.layer_overhead("fmoe", 10) == pytest.approx(3e-4 + 1e-4 + 2e-5)


def _validate(tmp_path: Path, capsys, payload: dict, *extra: str) -> tuple[int, str]:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(payload))
    rc = main(["calibrate", "validate", "--profile", str(path), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_profile_for_another_model_is_refused(tmp_path: Path, capsys) -> None:
    payload = calibrated("tiny-mixtral-wide").model_dump(mode="json")
    rc, err = _validate(tmp_path, capsys, payload, "--model", "tiny-mixtral")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "profile fitted for tiny-mixtral-wide, not tiny-mixtral" in err


def test_profile_for_another_device_is_refused(tmp_path: Path, capsys) -> None:
    payload = calibrated(device="cuda").model_dump(mode="json")
    rc, err = _validate(tmp_path, capsys, payload, "--device", "cpu")
    assert rc == 2 and len(err.splitlines()) == 1
    assert "measured on cuda, not cpu" in err


def test_missing_field_and_unknown_version_are_one_line(tmp_path: Path, capsys) -> None:
    payload = calibrated().model_dump(mode="json")
    del payload["link"]
    rc, err = _validate(tmp_path, capsys, payload)
    assert rc == 2 and len(err.splitlines()) == 1 and "link" in err and "required" in err
    payload = calibrated().model_dump(mode="json")
    payload["schema_version"] = 99
    rc, err = _validate(tmp_path, capsys, payload)
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown schema_version 99" in err


def test_unfitted_profile_needs_a_model(tmp_path: Path, capsys) -> None:
    payload = exact_profile().model_copy(update={"device": "cpu"}).model_dump(mode="json")
    rc, err = _validate(tmp_path, capsys, payload)
    assert rc == 2 and "not fitted for any model" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "lru,nope"], "unknown policy 'nope'"),
        (["--policies", "oracle"], "runs only in the simulator"),
        (["--cache-experts", "1"], "below what one layer needs"),
    ],
)
def test_bad_validate_options(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    rc, err = _validate(tmp_path, capsys, calibrated().model_dump(mode="json"), *args)
    assert rc == 2 and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "cuda"], "cuda"),
        (["--policies", "oracle"], "runs only in the simulator"),
        (["--model", "mixtral-8x7b"], "no local weights"),
        (["--out", "/nonexistent-dir/p.json"], "does not exist"),
        (["--interference-rounds", "0"], "--interference-rounds"),
    ],
)
def test_bad_bench_options_fail_before_measuring(capsys, args: list[str], message: str) -> None:
    argv = ["calibrate", "bench", "--model", "tiny-mixtral", "--no-progress", "--out", "x.json"]
    try:
        rc = main(argv + args)
    except SystemExit as exc:  # argparse's own checks exit from inside main
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
