"""The command line shared by the scripts that generate a docs page (`make docs`):
write the page atomically, or with ``--check`` exit 1 when the page on disk is stale."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from specs.jsonio import atomic_output

ROOT = Path(__file__).resolve().parent.parent


def page_main(out: Path, render: Callable[[], str], source: str, argv: list[str] | None) -> int:
    """`python scripts/X.py [--check]` for the page ``out`` (under the repository) that
    ``render`` makes from ``source`` (named in --help): 0 when written or current, 1 when
    --check finds it stale (a line on stderr says so)."""
    rel = out.relative_to(ROOT)
    p = argparse.ArgumentParser(description=f"write {rel} from {source}")
    p.add_argument("--check", action="store_true", help=f"exit 1 when {rel} is stale")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if (out.read_text() if out.exists() else "") != text:
            sys.stderr.write(f"{rel} is stale: run `make docs`\n")
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        tmp.write_text(text)
    print(f"wrote {rel}")
    return 0
