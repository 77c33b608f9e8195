"""`fmoe policies`: list registered policies and their options."""

from __future__ import annotations

import argparse

from fmoe_cli.common import add_json_flag, print_json, print_table
from policies.registry import describe_policies


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list prefetch/caching policies and their options")
    add_json_flag(p)
    p.set_defaults(func=_policies)


def _policies(args: argparse.Namespace) -> None:
    rows = describe_policies()
    if args.json:
        print_json(rows)
        return
    print_table(
        [
            {
                "name": r["name"],
                "options": ",".join(r["options"]) or "-",
                "description": r["description"],
            }
            for r in rows
        ]
    )
