"""`fmoe`: entry point. Command groups are modules listed in GROUPS; each exposes
``register(subparsers)`` which adds its subcommands with ``func`` set to a handler
``handler(args) -> int | None``.

Errors: an InputError, a missing file or an argparse problem prints one line on stderr
and exits with status 2; no traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from calibration.errors import InputError

GROUPS = [
    "fmoe_cli.profiles",
    "fmoe_cli.policies",
    "fmoe_cli.trace",
    "fmoe_cli.sim",
    "fmoe_cli.run",
    "fmoe_cli.calibrate",
    "fmoe_cli.demo",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fmoe", description="Fine-grained MoE expert offloading: simulate, run, calibrate."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod in GROUPS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name == mod:  # group not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        rc = args.func(args)
    except InputError as exc:
        sys.stderr.write(f"fmoe {args.command}: error: {exc}\n")
        return 2
    except FileNotFoundError as exc:
        sys.stderr.write(f"fmoe {args.command}: error: {exc.filename or exc}: no such file\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
