"""Hostile input at every command: generated argv and files get exit 0, or exit 2 with
one line on stderr; never a traceback, a hang or a partial file (tests/hostile.py).

The simulator commands (sim, sweep, trace synth/info/stats/import, models, hardware)
run for real on tiny inputs. Commands that run a real model or many simulations (run,
trace capture, calibrate, demo) have their executor stubbed: an argv that passes every
check before the work counts as accepted there (their real runs are tested elsewhere,
and benchmarks/hostile_inputs.py runs them all for real).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmoe_cli.main import main
from tests.hostile import (
    COMMANDS,
    Reached,
    argv_for,
    check_contract,
    fill,
    new_case_folder,
    run_cli,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]
STUBBED = {
    "realrun.runner": "run",
    "realrun.capture": "capture",
    "calibration.bench": "prepare_bench",
    "calibration.validate": "prepare_validation",
    "sim.paper": "run_policies",
    "realrun.serve.server": "serve",
}
EXAMPLES = 12  # per command: 16 commands x 12 = 192 generated argv


def _reached(*args: object, **kwargs: object) -> None:
    raise Reached()


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Valid inputs (a tiny trace, a profile) and junk files (empty, random bytes)."""
    d = tmp_path_factory.mktemp("hostile_fx")
    argv = ["trace", "synth", "--model", "tiny-mixtral", "--num-requests", "3"]
    argv += ["--max-prompt-len", "6", "--max-output-len", "3", "--out", str(d / "valid.fmoe")]
    assert run_cli(argv).code == 0
    shutil.copy(ROOT / "specs/presets/hardware/cpu-local.json", d / "profile.json")
    (d / "empty.bin").write_bytes(b"")
    (d / "random.bin").write_bytes(bytes(range(256)) * 8)
    return d


@pytest.fixture(scope="module")
def stubs() -> object:
    """Executors of the heavy commands raise Reached instead of working."""
    import importlib

    mp = pytest.MonkeyPatch()
    for module, attr in STUBBED.items():
        mp.setattr(importlib.import_module(module), attr, _reached)
    yield
    mp.undo()


def _check(argv: list[str], parent: Path, fx: Path) -> None:
    folder = new_case_folder(parent)
    try:
        before = snapshot(folder)
        real = fill(argv, folder, fx)
        check_contract(real, run_cli(real), before, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_generated_argv_meet_the_contract(
    command: str, fx: Path, stubs: object, tmp_path: Path, one_torch_thread: None
) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(argv=argv_for(command))
    def case(argv: list[str]) -> None:
        _check(argv, tmp_path, fx)

    case()


# -- files with hostile fields ------------------------------------------------------------------
def _edit(doc: dict, path: tuple[str, ...], value: object) -> dict:
    out = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


HOSTILE_VALUES = st.one_of(
    st.sampled_from([-1, 0, 10**30, -(10**30), 1e308, 1.5, "x", "", None, [], {}, [1], True]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=4),
)


def _fields(doc: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out += _fields(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


SPEC = json.loads((ROOT / "specs/presets/models/tiny-mixtral.json").read_text())
PROFILE = json.loads((ROOT / "specs/presets/hardware/cpu-local.json").read_text())


def _write_json(path: Path, doc: object) -> None:
    # allow_nan: the hostile files hold NaN and Infinity literals, as Python writes them
    path.write_text(json.dumps(doc, allow_nan=True))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(field=st.sampled_from(_fields(SPEC)), value=HOSTILE_VALUES)
def test_model_spec_fields_are_validated(tmp_path_factory, field, value) -> None:
    """A spec file with one hostile field: `models FILE` and `sim --model FILE` either
    accept it (a value in range) or refuse it in one line naming the file."""
    d = tmp_path_factory.mktemp("spec")
    path = d / "spec.json"
    _write_json(path, _edit(SPEC, field, value))
    for argv in (
        ["models", str(path)],
        ["sim", "--model", str(path), "--hardware", "cpu-local", "--synth"]
        + ["--synth-requests", "2", "--policy", "lru"],
    ):
        before = snapshot(d)
        outcome = run_cli(argv)
        check_contract(argv, outcome, before, d)
        if outcome.code == 2:
            assert "spec.json" in outcome.stderr, outcome.stderr


@settings(max_examples=30, deadline=None, derandomize=True)
@given(field=st.sampled_from(_fields(PROFILE)), value=HOSTILE_VALUES)
def test_hardware_profile_fields_are_validated(tmp_path_factory, field, value) -> None:
    """A profile with one hostile field: accepted, or one line naming the file and field."""
    d = tmp_path_factory.mktemp("profile")
    path = d / "hw.json"
    _write_json(path, _edit(PROFILE, field, value))
    argv = ["sim", "--model", "tiny-mixtral", "--hardware", str(path), "--synth"]
    argv += ["--synth-requests", "2", "--policy", "lru"]
    before = snapshot(d)
    outcome = run_cli(argv)
    check_contract(argv, outcome, before, d)
    if outcome.code == 2:
        assert "hw.json: field " + ".".join(field[:1]) in outcome.stderr, outcome.stderr


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    lines=st.lists(
        st.one_of(
            st.text(max_size=8),
            st.builds(
                json.dumps, st.dictionaries(st.sampled_from(["prompt", "id"]), HOSTILE_VALUES)
            ),
            st.sampled_from(["{", "[1]", "null", '{"prompt": 4}', "\x00"]),
        ),
        max_size=3,
    ),
    suffix=st.sampled_from([".jsonl", ".txt"]),
)
def test_prompt_files_are_validated(tmp_path_factory, stubs, lines, suffix) -> None:
    """A prompts file of hostile lines reaches the run, or is refused in one line."""
    d = tmp_path_factory.mktemp("prompts")
    path = d / f"p{suffix}"
    path.write_text("\n".join(lines))
    argv = ["run", "--model", "tiny-mixtral", "--policy", "lru", "--prompts", str(path)]
    outcome = run_cli(argv)
    check_contract(argv, outcome, snapshot(d), d)


# -- messages, --debug, interrupts ---------------------------------------------------------------
def test_messages_name_the_flag(fx: Path) -> None:
    for flag, value in [("--synth-rate", "nan"), ("--kv-reserve-gb", "inf"), ("--seed", "-1")]:
        argv = ["sim", "--model", "tiny-mixtral", "--hardware", "cpu-local", "--synth"]
        outcome = run_cli([*argv, "--policy", "lru", flag, value])
        assert outcome.code == 2 and f"argument {flag}: expected" in outcome.stderr


def test_debug_reraises_and_internal_errors_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """--debug re-raises (bad input and bugs alike); a bug (not an input problem) exits 1
    with one line that says it is one."""
    import fmoe_cli.profiles as profiles
    from specs.errors import InputError

    def boom(args: object) -> None:
        raise TypeError("a bug")

    monkeypatch.setattr(profiles, "_models", boom)
    outcome = run_cli(["models"])
    assert outcome.code == 1 and "internal error: TypeError: a bug" in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1 and "--debug" in outcome.stderr
    with pytest.raises(TypeError):
        main(["--debug", "models"])
    with pytest.raises(TypeError):
        main(["models", "--debug"])

    def bad(args: object) -> None:
        raise InputError("x.json: field y: bad")

    monkeypatch.setattr(profiles, "_models", bad)
    with pytest.raises(InputError):
        main(["--debug", "models"])


@pytest.mark.parametrize(
    "argv, target, patch",
    [
        (["--requests-out", "{t}"], "r.csv", "pandas.DataFrame.to_csv"),
        (["--chrome-trace", "{t}"], "c.json", "json.dump"),
    ],
)
def test_interrupted_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], target: str, patch: str
) -> None:
    """Ctrl-C in the middle of writing an output: exit 130, the existing file untouched,
    no temporary file left."""
    import importlib

    out = tmp_path / target
    out.write_text("old\n")
    module_name, _, attr = patch.rpartition(".")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError:  # a class attribute: pandas.DataFrame.to_csv
        mod, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(mod), cls)

    def half_then_interrupt(*args: object, **kwargs: object) -> None:
        dest = next((a for a in (*args, *kwargs.values()) if hasattr(a, "write")), None)
        if dest is None:
            dest_path = next(a for a in args if isinstance(a, str | Path))
            Path(dest_path).write_text("half")
        else:
            dest.write("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, attr, half_then_interrupt)
    base = ["sim", "--model", "tiny-mixtral", "--hardware", "cpu-local", "--synth"]
    base += ["--synth-requests", "2", "--policy", "lru"]
    outcome = run_cli([*base, *[a.replace("{t}", str(out)) for a in argv]])
    assert outcome.code == 130
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target]


def test_limits_refuse_before_work(
    stubs: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A link so slow or a workload so large that it could not finish or fit: refused in
    one line that gives the limit and how to raise it; raising it lets the run start."""
    run = ["run", "--model", "tiny-mixtral", "--policy", "lru", "--prompt", "hi"]
    outcome = run_cli([*run, "--link-gbps", "1e-9"])
    assert outcome.code == 2 and "past the limit of 600 s" in outcome.stderr
    assert "--link-time-limit-s" in outcome.stderr
    assert run_cli([*run, "--link-gbps", "1e-6", "--link-time-limit-s", "1e5"]).reached
    out = tmp_path / "never-written.fmoe"
    synth = ["trace", "synth", "--model", "tiny-mixtral", "--out", str(out)]
    outcome = run_cli([*synth, "--num-requests", "9999999"])
    assert outcome.code == 2 and "needs about" in outcome.stderr and "GiB of " in outcome.stderr
    monkeypatch.setenv("FMOE_MEMORY_LIMIT_GB", "0.01")  # 100 requests need more than 10 MiB
    outcome = run_cli(synth)
    assert outcome.code == 2 and "FMOE_MEMORY_LIMIT_GB" in outcome.stderr
    assert not out.exists()
