"""The docs stay current: the generated pages (CLI reference, presets) equal what their
scripts write from the code now, they cover every command and flag, and the README stays
short. (`make lint` builds the site with `mkdocs build --strict`, so broken links fail.)"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from types import ModuleType

from fmoe_cli.main import COMMANDS, build_parser
from specs.presets import hardware_preset_names, model_preset_names

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current_with_the_parser() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == _script("cli_reference").render(), (
        "docs/cli.md is stale: run `make docs` (or python scripts/cli_reference.py)"
    )


def test_cli_reference_lists_every_command_subcommand_and_flag() -> None:
    text = _script("cli_reference").render()

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> int:
        seen = 0
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    assert f"`fmoe {' '.join([*path, name])}`" in text
                    seen += walk(child, [*path, name])
            elif action.option_strings and action.dest != "help":
                for flag in action.option_strings:
                    assert f"`{flag}`" in text, f"fmoe {' '.join(path)} {flag} missing"
                seen += 1
        return seen

    assert walk(build_parser(), []) > 50  # every command's flags, not an empty walk
    for name in COMMANDS:
        assert f"## `fmoe {name}`" in text


def test_presets_page_is_current_and_lists_every_preset() -> None:
    module = _script("presets_reference")
    text = module.render()
    assert (ROOT / "docs" / "presets.md").read_text() == text, (
        "docs/presets.md is stale: run `make docs` (or python scripts/presets_reference.py)"
    )
    for name in hardware_preset_names() + model_preset_names():
        assert f"### `{name}`" in text
    # sizes in GiB: the 80 GiB A100 preset shows as 80, not 85.9
    row = next(line for line in text.splitlines() if line.startswith("| `a100-80gb-pcie4`"))
    assert "| 80 |" in row


def test_readme_is_short_and_links_into_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in ("getting-started", "architecture", "calibration", "limits", "cli"):
        assert f"(docs/{page}.md)" in readme
        assert (ROOT / "docs" / f"{page}.md").exists()
