"""One unit for memory sizes: every ``*-gb`` flag means GiB (2^30 bytes) and says so in its
help and placeholder; `fmoe hardware` / `fmoe models` tables print sizes in GiB under
GiB headers; JSON keeps bytes."""

from __future__ import annotations

import argparse
import json

from fmoe_cli.main import build_parser, main
from specs.presets import load_hardware, load_model

GIB = 2**30


def _size_flags() -> list[tuple[str, argparse.Action]]:
    """(command path, action) of every option of `fmoe` whose flag ends in -gb."""
    found: list[tuple[str, argparse.Action]] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}".strip())
            elif any(flag.endswith("-gb") for flag in action.option_strings):
                found.append((path, action))

    walk(build_parser(), "")
    return found


def test_every_gb_flag_says_gib_in_help_and_placeholder() -> None:
    flags = _size_flags()
    where = {(path, max(a.option_strings, key=len)) for path, a in flags}
    # the size flags users type most; the walk must reach them (else the check is empty)
    assert {("sim", "--cache-gb"), ("sweep", "--cache-gb"), ("run", "--cache-gb")} <= where
    assert {("sim", "--per-gpu-cache-gb"), ("run", "--reserve-gb"), ("demo", "--cache-gb")} <= where
    for path, action in flags:
        flag = max(action.option_strings, key=len)
        assert action.help and "GiB" in action.help, f"fmoe {path} {flag}: help {action.help!r}"
        assert " GB" not in action.help.replace("GB/s", ""), f"fmoe {path} {flag} says GB"
        assert action.metavar == "GiB", f"fmoe {path} {flag}: metavar {action.metavar!r}"


def test_gb_flag_help_is_printed_with_gib(capsys) -> None:
    try:
        main(["sim", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "--cache-gb GiB" in out and "--cache-gb GB " not in out


def _table(capsys, *argv: str) -> list[dict[str, str]]:
    """print_table's rows, cut at the header's column starts (cells may hold spaces)."""
    assert main(list(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    names = header.split()
    starts = [header.index(f"{n} ") if f"{n} " in header else header.index(n) for n in names]
    ends = [*starts[1:], None]
    return [
        {n: line[a:b].strip() for n, a, b in zip(names, starts, ends, strict=True)}
        for line in lines[1:]
        if line.strip() and not line.startswith((" ", "sources", "notes"))
    ]


def test_hardware_table_prints_memory_in_gib(capsys) -> None:
    rows = {r["name"]: r for r in _table(capsys, "hardware")}
    a100 = load_hardware("a100-80gb-pcie4")
    assert a100.gpu.memory_bytes == 80 * GIB  # an 80 GB card is 80 GiB in the preset
    assert rows["a100-80gb-pcie4"]["gpu_mem_GiB"] == "80"  # not 85.9 under "GB"
    assert (
        rows["rtx3090-pcie4"]["gpu_mem_GiB"]
        == f"{load_hardware('rtx3090-pcie4').gpu.memory_bytes / GIB:.4g}"
    )
    assert not any(key.endswith("_GB") for key in rows["a100-80gb-pcie4"])


def test_models_table_prints_sizes_in_gib_and_json_keeps_bytes(capsys) -> None:
    rows = {r["name"]: r for r in _table(capsys, "models")}
    spec = load_model("mixtral-8x7b")
    assert rows["mixtral-8x7b"]["expert_GiB"] == f"{spec.expert_bytes / GIB:.4g}"  # 0.3281
    assert rows["mixtral-8x7b"]["model_GiB"] == f"{spec.model_bytes / GIB:.4g}"
    assert main(["models", "mixtral-8x7b", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["expert_bytes"] == spec.expert_bytes == 352_321_536
    assert "expert_GiB" not in payload
