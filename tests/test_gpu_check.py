"""The GPU check's dry run (``scripts/gpu_check.sh --device cpu``): every stage runs at its
smallest size, so a typo in the device call's command lines fails here, not on the GPU;
and its pieces: the report script, the wheel selection, the JUnit counts, the goals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402
import gpu_wheels  # noqa: E402

from calibration.gpu_report import CELL_TARGETS, goals, render_summary  # noqa: E402
from specs.presets import load_hardware  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check_dry")
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--device", "cpu", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + (out / "log.txt").read_text()[-3000:]
    return out


def test_the_dry_run_runs_every_stage_and_writes_few_flat_files(dry_run):
    files = sorted(p.name for p in dry_run.iterdir())
    assert files == sorted(
        ["results.json", "summary.md", "profile.json", "runs.csv", "requests.csv",
         "junit.xml", "log.txt"]
    )  # fmt: skip
    assert len(files) <= 8 and all(p.is_file() for p in dry_run.iterdir())  # the device's limits
    res = json.loads((dry_run / "results.json").read_text())
    assert res["dry_run"] and res["device"] == "cpu"
    assert {n: s["status"] for n, s in res["stages"].items()} == dict.fromkeys(
        ["cuda_tests", "checkpoint", "bench", "validate", "overhead"], "ok"
    )
    t = res["cuda_tests"]
    assert t["tests"] >= 10 and t["skipped"] == t["tests"]  # collected, and skipped on a CPU
    assert len(res["validate"]["runs"]) == 9  # 3 policies x 3 caches
    assert res["bench"]["measurements"]["expert_shapes"][0]["hidden"] == 2048
    assert res["overhead"]["outputs_bitwise_equal"] is True
    g = res["goals"]
    assert g["cuda_tests_pass"] and g["measured_on_gpu"] is False
    assert g["profile_has_link_spread"] and g["profile_has_expert_shapes"]
    assert "dry run on the CPU" in (dry_run / "summary.md").read_text()


def test_the_report_writes_a_measured_preset_and_replaces_its_docs_block(dry_run, tmp_path):
    docs = tmp_path / "gpu.md"
    docs.write_text("# GPU\n\nintro\n")
    argv = [str(dry_run), "--name", "test-measured", "--presets", str(tmp_path),
            "--docs", str(docs), "--allow-dry-run"]  # fmt: skip
    assert gpu_report.main(argv) == 0
    prof = load_hardware(str(tmp_path / "test-measured.json"))
    assert prof.name == "test-measured" and prof.kind == "calibrated"
    assert "NOT a GPU measurement" in prof.sources[0] and prof.notes.startswith("Measured")
    once = docs.read_text()
    assert once.startswith("# GPU\n\nintro\n") and once.count(gpu_report.BEGIN) == 1
    assert gpu_report.main(argv) == 0
    assert docs.read_text() == once  # the block is replaced, not appended again


def test_the_report_refuses_a_dry_run_unless_allowed(dry_run, tmp_path, capsys):
    assert gpu_report.main([str(dry_run), "--docs", str(tmp_path / "x.md")]) == 2
    assert "dry run" in capsys.readouterr().err
    assert gpu_report.main([str(tmp_path)]) == 2  # no results.json: one line


def test_carried_wheels_install_only_what_is_missing_or_older(tmp_path):
    for f in ["simpy-4.1.2-py3-none-any.whl", "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl",
              "typing_extensions-4.16.0-py3-none-any.whl"]:  # fmt: skip
        (tmp_path / f).write_bytes(b"")
    have = {"typing-extensions": "4.16.0", "pydantic-core": "2.41.0"}
    got = [p.name for p in gpu_wheels.missing(tmp_path, have.get)]
    assert got == [
        "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.whl",  # older installed
        "simpy-4.1.2-py3-none-any.whl",  # absent
    ]
    with pytest.raises(ValueError):
        gpu_wheels.wheel_dist(Path("not-a-wheel.tar.gz"))


def test_junit_counts_and_failing_tests(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
        '<testcase classname="t" name="a"/>'
        '<testcase classname="t" name="b"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="t" name="c"><error message="boom">y</error></testcase>'
        '<testcase classname="t" name="d"><skipped/></testcase></testsuite></testsuites>'
    )
    c = gpu_check.junit_counts(xml)
    assert (c["tests"], c["passed"], c["failures"], c["errors"], c["skipped"]) == (4, 1, 1, 1, 1)
    assert [f["test"] for f in c["failing"]] == ["t::b", "t::c"]
    assert c["failing"][0]["message"] == "assert 1 == 2"


def test_stages_bring_what_they_need():
    assert gpu_check.stages_of(None) == list(gpu_check.STAGES)
    assert gpu_check.stages_of("validate") == ["bench", "validate"]
    with pytest.raises(SystemExit, match="unknown"):
        gpu_check.stages_of("bench,typo")


errors = st.floats(0, 0.3, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(errors, errors, errors), min_size=1, max_size=9))
def test_a_cell_meets_the_goal_only_when_all_three_errors_are_within_their_targets(errs):
    keys = list(CELL_TARGETS)
    runs = [
        {"policy": "lru", "cache_experts": i, **dict(zip(keys, e, strict=True))}
        for i, e in enumerate(errs)
    ]
    res = {"dry_run": False, "validate": {"runs": runs}, "stages": {}}
    met = [all(v <= CELL_TARGETS[k] for k, v in zip(keys, e, strict=True)) for e in errs]
    g = goals(res)
    assert g["cells_meeting_targets"] == f"{sum(met)}/{len(met)}"
    assert g["all_cells_meet_targets"] == all(met)
    assert g["cuda_tests_pass"] is None and g["overhead_met"] is None  # not measured
    render_summary(res)  # renders without the other stages


def test_on_a_gpu_a_skipped_cuda_test_fails_the_goal():
    t = {"tests": 3, "failures": 0, "errors": 0, "skipped": 1, "passed": 2, "failing": []}
    assert goals({"dry_run": False, "cuda_tests": t})["cuda_tests_pass"] is False
    assert goals({"dry_run": True, "cuda_tests": t})["cuda_tests_pass"] is True
