"""`fmoe models` / `fmoe hardware`: JSON output and one-line errors with status 2."""

from __future__ import annotations

import json

import pytest

from fmoe_cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_models_json_lists_presets_with_figures(capsys) -> None:
    rc, out, _ = run(capsys, "models", "--json")
    assert rc == 0
    rows = json.loads(out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["mixtral-8x7b"]["expert_bytes"] == 352_321_536
    assert by_name["qwen1.5-moe-a2.7b"]["num_experts"] == 60


def test_hardware_json_lists_presets_with_figures(capsys) -> None:
    rc, out, _ = run(capsys, "hardware", "--json")
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["paper-6x3090"]["num_gpus"] == 6
    assert rows["paper-6x3090"]["link"]["pinned_bandwidth_Bps"] > 0
    assert rows["cpu-local"]["link"]["emulated"] is True


@pytest.mark.parametrize(
    "argv", [["models", "nope"], ["hardware", "nope"], ["hardware", "/no/such.json"]]
)
def test_bad_names_give_one_line_and_status_2(capsys, argv) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_unknown_subcommand_is_status_2(capsys) -> None:
    rc, _, err = run(capsys, "frobnicate")
    assert rc == 2 and len(err.strip().splitlines()) == 1
