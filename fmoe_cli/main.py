"""`fmoe`: entry point. Commands are listed in COMMANDS with the module that registers
them; each module exposes ``register(subparsers)``, which adds its subcommands with
``func`` set to a handler ``handler(args) -> int | None``. Modules import their heavy
dependencies (torch, simpy, pandas, ...) inside handlers, never at import time.

Errors (fmoe_cli.errors): bad input of any kind (an InputError, an argparse problem, a
path that is missing, a directory or unwritable, a file that is not text or not JSON)
prints one line on stderr, ``fmoe CMD: error: <what>``, and exits with status 2; an
unexpected exception (a bug) prints one line saying so and exits with status 1. No
traceback reaches the user unless ``--debug`` is given, which re-raises.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module that registers it, one-line help). A command's module is imported
# only when that command runs (or shows its help), so `fmoe --help` stays light.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("fmoe_cli.profiles", "list model presets (or show one) with their figures"),
    "hardware": ("fmoe_cli.profiles", "list hardware presets (or show one) with their figures"),
    "policies": ("fmoe_cli.policies", "list prefetch/caching policies and their options"),
    "trace": ("fmoe_cli.trace", "workload traces: synthesize, import, inspect, capture"),
    "sim": ("fmoe_cli.sim", "simulate one policy on a workload and print its metrics"),
    "sweep": ("fmoe_cli.sim", "simulate policies x cache sizes x traces; results table and plots"),
    "run": ("fmoe_cli.run", "run a real MoE model with offloaded experts under a policy"),
    "serve": (
        "fmoe_cli.serve",
        "serve a model over an OpenAI-compatible HTTP API (offloaded experts)",
    ),
    "calibrate": ("fmoe_cli.calibrate", "measure this machine; validate the simulator against it"),
    "demo": (
        "fmoe_cli.demo",
        "fMoE vs the baselines on Mixtral-8x7B / paper-6x3090 in simulation (the paper's Fig. 10)",
    ),
}


# A flag's value placeholder in help: by the flag's unit suffix, then its name, then the
# type of its value; VALUE when nothing says more.
_SUFFIX_METAVARS = {"-gb": "GiB", "-mb": "MiB", "-s": "SECONDS", "-ms": "MS"}
_NAME_METAVARS = {
    "model": "NAME",
    "hardware": "NAME",
    "policy": "NAME",
    "preset": "NAME",
    "path": "PATH",
    "out": "PATH",
    "file": "PATH",
    "dir": "PATH",
    "trace": "PATH",
    "config": "PATH",
    "profile": "PATH",
    "experts": "N",
    "prompts": "PATH",
    "metadata": "PATH",
    "manifest": "PATH",
    "policies": "NAMES",
    "name": "NAME",
    "layers": "LIST",
}
_TYPE_METAVARS = {"positive_int": "N", "int": "N", "positive_float": "X", "float": "X"}


def _readable_metavar(action: argparse.Action) -> str:
    """A short placeholder (N, X, GiB, NAME, PATH, VALUE) for an option that takes a value,
    instead of its dest in capitals (CFG_NUM_REQUESTS)."""
    flag = max(action.option_strings, key=len)
    for suffix, metavar in _SUFFIX_METAVARS.items():
        if flag.endswith(suffix):
            return metavar
    type_metavar = _TYPE_METAVARS.get(getattr(action.type, "__name__", ""))
    if type_metavar == "N":
        return type_metavar
    words = flag.lstrip("-").split("-")
    for word, metavar in _NAME_METAVARS.items():
        if word in words:
            return metavar
    return type_metavar or "VALUE"


def _name_placeholders(parser: argparse.ArgumentParser) -> None:
    """Give every value-taking option of ``parser`` and its subcommands a readable
    metavar where it has none (choices keep their {a,b} list)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _name_placeholders(child)
        elif action.option_strings and action.nargs != 0 and action.metavar is None:
            if action.choices is None:
                action.metavar = _readable_metavar(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, status 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fmoe` parser. With ``command`` (a key of COMMANDS) only that command's module
    is imported and registered in full; the others appear as one-line entries. With
    None, every command is registered in full (tests and the CLI reference use this)."""
    parser = _Parser(
        prog="fmoe", description="Fine-grained MoE expert offloading: simulate, run, calibrate."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of any error (bug reports); may follow the command too",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    wanted = {module for module, _ in COMMANDS.values()}
    if command is not None:
        wanted = {COMMANDS[command][0]} if command in COMMANDS else set()
    for name, (module_name, help_text) in COMMANDS.items():
        if name in sub.choices:  # registered with another command of its module
            continue
        if module_name in wanted:
            importlib.import_module(module_name).register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    _name_placeholders(parser)
    return parser


def _command_of(argv: list[str]) -> str:
    """The command named in argv ('' when none or an unknown one: the light parser then
    prints help or names the bad choice)."""
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else ""
    return ""


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default: sys.argv[1:]) and return its exit status:
    0 done, 2 bad input (one line on stderr), 1 an internal error, 130 interrupted.
    argparse's own exits (``--help``, a bad flag) raise SystemExit as usual."""
    from fmoe_cli.errors import classify

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # accepted anywhere: `fmoe sim ... --debug` too
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    args.debug = debug
    if not getattr(args, "func", None):
        sys.stderr.write(
            f"fmoe: error: no command given (one of: {', '.join(COMMANDS)}; "
            "fmoe --help says more)\n"
        )
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        status, message = classify(exc)
        sys.stderr.write(f"fmoe {_command_name(args)}: {message}\n")
        return status
    return int(rc or 0)


def _command_name(args: argparse.Namespace) -> str:
    """'sim', 'trace synth', 'calibrate bench': the command as the user typed it."""
    sub = getattr(args, "trace_command", None) or getattr(args, "calibrate_command", None)
    return f"{args.command} {sub}" if sub else str(args.command)


if __name__ == "__main__":
    raise SystemExit(main())
