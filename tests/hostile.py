"""Hostile argv for every command, and an in-process runner that checks the contract.

``argv_for(command)`` is a hypothesis strategy: a valid, cheap argv of that command with
one flag (or positional) replaced or added with a value from the hostile classes
(negative, zero, NaN, inf, huge, wrong type, empty, bad paths), or a flag dropped or a
conflicting one added. ``run_cli`` runs it through ``fmoe_cli.main.main`` under a
timeout and returns what happened; ``check_contract`` asserts the rules: exit 0, or
exit 2 with exactly one stderr line; never a traceback; never a leftover temporary file
or (on failure) a new or changed file in the output folder.

``{out}`` in an argv is the example's own output folder (holding ``existing.txt`` and a
FIFO ``fifo``); ``{fx}`` the module's fixture folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

SWITCH = str(Path(__file__).parent / "fixtures" / "switch_base_8_router_trace.json")

# -- the hostile value classes ------------------------------------------------------------------
SPECIAL = ["-1", "0", "nan", "NaN", "inf", "-inf", "1e308", "1e-320", "", " ", "abc", "1.5",
           "0x10", "99999999999999999999", "1e30", "-0", "1,2", "None", "true"]  # fmt: skip


def hostile_numbers() -> st.SearchStrategy[str]:
    """Text of numbers from the hostile classes: specials, any float (NaN and inf too),
    any integer up to 2**80 either sign, and short junk text."""
    return st.one_of(
        st.sampled_from(SPECIAL),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(min_value=-(2**80), max_value=2**80).map(str),
        st.text(alphabet="0123456789.-e+naifx,", max_size=6),
    )


BAD_PATHS = ["{out}", "{out}/existing.txt/x", "/proc/fmoe_nope/x", "{out}/fifo", "",
             "{out}/missing/deeper/x", "{out}/new"]  # fmt: skip
BAD_INPUTS = ["{fx}/missing", "{fx}", "{fx}/empty.bin", "{fx}/random.bin", "{out}/existing.txt",
              "{out}/fifo"]  # fmt: skip


@dataclass(frozen=True)
class Command:
    """A valid cheap argv, the flags to make hostile (numbers), its output-path flags and
    input-path flags, and flags whose removal or addition makes a conflict."""

    argv: tuple[str, ...]
    numbers: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    extra: tuple[tuple[str, ...], ...] = ()


COMMANDS: dict[str, Command] = {
    "models": Command(("models", "tiny-mixtral"), inputs=("models",)),
    "hardware": Command(("hardware", "cpu-local"), inputs=("hardware",)),
    "policies": Command(("policies",), extra=(("--bogus",), ("--json", "x"))),
    "trace synth": Command(
        (
            "trace",
            "synth",
            "--model",
            "tiny-mixtral",
            "--num-requests",
            "2",
            "--max-prompt-len",
            "6",
            "--max-output-len",
            "3",
            "--out",
            "{out}/t.fmoe",
        ),
        numbers=(
            "--num-requests",
            "--max-prompt-len",
            "--max-output-len",
            "--seed",
            "--arrival-rate",
            "--routing-noise",
            "--gate-temperature",
            "--affinity",
            "--popularity-skew",
            "--temporal-locality",
            "--num-topics",
            "--embedding-dim",
            "--length-sigma",
            "--prompt-len-mean",
        ),
        outputs=("--out",),
        inputs=("--config", "--fit", "--model"),
        extra=(("--fit",), ("--config",), ("--model", "nope")),
    ),  # fmt: skip
    "trace info": Command(("trace", "info", "{fx}/valid.fmoe"), inputs=("info",)),
    "trace stats": Command(
        ("trace", "stats", "{fx}/valid.fmoe", "--plot", "{out}/h.png"),
        outputs=("--plot",),
        inputs=("stats",),
    ),
    "trace prompts": Command(("trace", "prompts", "gsm8k", "--n", "2"), numbers=("--n",)),
    "trace import": Command(
        ("trace", "import", SWITCH, "--format", "switch-json", "--out", "{out}/i.fmoe"),
        numbers=("--prompt-len", "--layers"),
        outputs=("--out",),
        inputs=("import", "--metadata", "--manifest"),
        extra=(("--format", "nope"), ("--field", "x")),
    ),  # fmt: skip
    "trace capture": Command(
        (
            "trace",
            "capture",
            "--model",
            "tiny-mixtral",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--out",
            "{out}/c.fmoe",
        ),
        numbers=(
            "--num-prompts",
            "--max-new-tokens",
            "--max-prompt-tokens",
            "--batch-size",
            "--seed",
        ),
        outputs=("--out",),
        inputs=("--prompts", "--model"),
    ),  # fmt: skip
    "sim": Command(
        (
            "sim",
            "--model",
            "tiny-mixtral",
            "--hardware",
            "cpu-local",
            "--synth",
            "--synth-requests",
            "2",
            "--policy",
            "lru",
            "--cache-experts",
            "8",
        ),
        numbers=(
            "--synth-requests",
            "--synth-rate",
            "--cache-experts",
            "--batch-size",
            "--prefetch-distance",
            "--chunk-mb",
            "--kv-reserve-gb",
            "--seed",
            "--train-fraction",
        ),
        outputs=("--chrome-trace", "--requests-out"),
        inputs=("--trace", "--train", "--model", "--hardware"),
        extra=(
            ("--cache-gb", "1"),
            ("--trace", "{fx}/valid.fmoe"),
            ("--offline",),
            ("--policy", "nope"),
            ("--policy-opt", "x"),
            ("--policy-opt", "d=NaN"),
        ),
    ),  # fmt: skip
    "sweep": Command(
        (
            "sweep",
            "--model",
            "tiny-mixtral",
            "--hardware",
            "cpu-local",
            "--synth",
            "--synth-requests",
            "2",
            "--policies",
            "lru",
            "--cache-experts",
            "8",
            "--out",
            "{out}/sw",
            "--no-plots",
            "--quiet",
        ),
        numbers=(
            "--synth-requests",
            "--cache-experts",
            "--cache-gb",
            "--workers",
            "--kv-reserve-gb",
            "--synth-rate",
        ),
        outputs=("--out",),
        inputs=("--traces", "--train"),
        extra=(
            ("--policies", ","),
            ("--ray", "nohost"),
            ("--ray", "127.0.0.1:9"),
            ("--format", "x"),
            ("--cache-gb", "1"),
        ),
    ),  # fmt: skip
    "run": Command(
        (
            "run",
            "--model",
            "tiny-mixtral",
            "--policy",
            "lru",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "2",
            "--cache-experts",
            "8",
        ),
        numbers=(
            "--max-new-tokens",
            "--cache-experts",
            "--batch-size",
            "--threads",
            "--num-devices",
            "--link-gbps",
            "--link-latency-us",
            "--reserve-gb",
            "--seed",
            "--link-time-limit-s",
            "--num-prompts",
        ),
        outputs=("--trace-out",),
        inputs=("--train-trace", "--prompts", "--model"),
        extra=(
            ("--cache-gb", "1"),
            ("--device", "tpu"),
            ("--policy", "nope"),
            ("--link-gbps", "1e-9"),
            ("--store-dir", "{out}/existing.txt"),
        ),
    ),  # fmt: skip
    "serve": Command(
        (
            "serve",
            "--model",
            "tiny-mixtral",
            "--policy",
            "lru",
            "--cache-experts",
            "8",
            "--port",
            "0",
        ),
        numbers=(
            "--cache-experts",
            "--max-batch",
            "--max-queue",
            "--grace-s",
            "--port",
            "--link-gbps",
            "--link-latency-us",
            "--threads",
            "--seed",
            "--reserve-gb",
        ),
        outputs=("--capture",),
        inputs=("--train-trace", "--model"),
        extra=(("--cache-gb", "1"), ("--policy", "nope"), ("--link-gbps", "1e-9")),
    ),  # fmt: skip
    "calibrate bench": Command(
        (
            "calibrate",
            "bench",
            "--model",
            "tiny-mixtral",
            "--repeats",
            "1",
            "--out",
            "{out}/p.json",
        ),
        numbers=(
            "--repeats",
            "--max-tokens",
            "--max-context",
            "--overhead-rounds",
            "--threads",
            "--link-gbps",
            "--link-latency-us",
            "--seed",
        ),
        outputs=("--out",),
        inputs=("--model",),
        extra=(("--policies", ","), ("--policies", "nope"), ("--link-gbps", "1e-9")),
    ),  # fmt: skip
    "calibrate validate": Command(
        (
            "calibrate",
            "validate",
            "--profile",
            "{fx}/profile.json",
            "--model",
            "tiny-mixtral",
            "--policies",
            "lru",
        ),
        numbers=(
            "--num-prompts",
            "--max-new-tokens",
            "--repeats",
            "--batch-size",
            "--cache-experts",
            "--seed",
        ),
        outputs=("--out",),
        inputs=("--profile", "--prompts"),
        extra=(("--policies", "nope"),),
    ),  # fmt: skip
    "demo": Command(
        (
            "demo",
            "--model",
            "tiny-mixtral",
            "--hardware",
            "cpu-local",
            "--num-requests",
            "4",
            "--workers",
            "1",
            "--out",
            "{out}/demo",
        ),
        numbers=("--num-requests", "--workers", "--cache-gb", "--seed"),
        outputs=("--out",),
        inputs=("--model", "--hardware"),
    ),  # fmt: skip
}

# positionals named in ``inputs`` by their subcommand word: the token after it
_POSITIONAL = {"models", "hardware", "info", "stats", "import"}


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in _POSITIONAL:
        i = argv.index(flag) + 1
        if i < len(argv):
            return [*argv[:i], value, *argv[i + 1 :]]
        return [*argv, value]
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i], flag, value, *argv[i + 2 :]]
    return [*argv, flag, value]


def _drop(argv: list[str], i: int) -> list[str]:
    """argv without token i (and its value, when token i is a flag followed by one)."""
    if argv[i].startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        return argv[:i] + argv[i + 2 :]
    return argv[:i] + argv[i + 1 :]


@st.composite
def argv_for(draw: st.DrawFn, name: str) -> list[str]:
    """A hostile argv of command ``name`` (a key of COMMANDS)."""
    c = COMMANDS[name]
    argv = list(c.argv)
    kinds = ["drop", "extra"] + ["number"] * bool(c.numbers) + ["output"] * bool(c.outputs)
    kinds += ["input"] * bool(c.inputs)
    kind = draw(st.sampled_from(kinds))
    if kind == "number":
        return _set(argv, draw(st.sampled_from(c.numbers)), draw(hostile_numbers()))
    if kind == "output":
        return _set(argv, draw(st.sampled_from(c.outputs)), draw(st.sampled_from(BAD_PATHS)))
    if kind == "input":
        return _set(argv, draw(st.sampled_from(c.inputs)), draw(st.sampled_from(BAD_INPUTS)))
    if kind == "drop" and len(argv) > 1:
        return _drop(argv, draw(st.integers(1, len(argv) - 1)))
    return argv + list(draw(st.sampled_from(c.extra or (("--bogus",),))))


# -- running ----------------------------------------------------------------------------------
class Hang(BaseException):
    """The timeout guard fired (a BaseException, so no `except Exception` swallows it)."""


class Reached(BaseException):
    """A stubbed executor was called: the input passed every check before the work."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise Hang in the main thread after ``seconds`` (SIGALRM)."""

    def fire(signum: int, frame: object) -> None:
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    reached: bool = False


def run_cli(argv: list[str], timeout_s: float = 30.0) -> Outcome:
    """``fmoe_cli.main.main(argv)`` in this process with stdout/stderr captured."""
    from fmoe_cli.main import main

    out, err = io.StringIO(), io.StringIO()
    reached = False
    with redirect_stdout(out), redirect_stderr(err), time_limit(timeout_s):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse refuses the value itself
            code = exc.code if isinstance(exc.code, int) else 2
        except Reached:
            code, reached = 0, True
    return Outcome(int(code), out.getvalue(), err.getvalue(), reached)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def new_case_folder(parent: Path) -> Path:
    """A fresh output folder holding ``existing.txt`` and a FIFO ``fifo``."""
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=parent, prefix="case."))
    (folder / "existing.txt").write_text("keep me\n")
    os.mkfifo(folder / "fifo")
    return folder


def fill(argv: list[str], out: Path, fx: Path) -> list[str]:
    return [a.replace("{out}", str(out)).replace("{fx}", str(fx)) for a in argv]


def check_contract(argv: list[str], outcome: Outcome, before: dict[str, str], folder: Path) -> None:
    """The rules every run obeys (see the module docstring)."""
    err = outcome.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, f"{argv}: traceback\n{err}"
    assert outcome.code in (0, 2), f"{argv}: exit {outcome.code}\n{err}"
    if outcome.code == 2:
        assert len(lines) == 1, f"{argv}: {len(lines)} stderr lines\n{err}"
        assert "error" in lines[0], f"{argv}: {lines[0]}"
    after = snapshot(folder)
    temps = [n for n in after if Path(n).name.startswith(".")]
    assert not temps, f"{argv}: temporary files left: {temps}"
    if outcome.code != 0:
        assert after == before, f"{argv}: a failed run changed {before} -> {after}"
