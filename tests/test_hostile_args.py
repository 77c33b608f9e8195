"""The argument types (fmoe_cli.args), the limits (specs.limits) and the atomic writers:
every value is either returned in range or refused with ArgumentTypeError/InputError."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmoe_cli import args as argt
from specs.errors import InputError
from specs.jsonio import atomic_output, write_json_atomic
from specs.limits import MEMORY_ENV, require_memory, require_time
from tests.hostile import hostile_numbers

BOUNDS = st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False))


@settings(max_examples=40, deadline=None)
@given(text=hostile_numbers(), lo=BOUNDS, hi=BOUNDS, lo_open=st.booleans())
def test_number_is_finite_and_in_range_or_refused(text, lo, hi, lo_open) -> None:
    parse = argt.number(lo, hi, lo_open=lo_open)
    try:
        v = parse(text)
    except argparse.ArgumentTypeError as exc:
        assert repr(text) in str(exc) or text in str(exc)
        return
    assert math.isfinite(v) and v == float(text)
    assert lo is None or (v > lo if lo_open else v >= lo)
    assert hi is None or v <= hi


@settings(max_examples=40, deadline=None)
@given(
    text=hostile_numbers(),
    lo=st.one_of(st.none(), st.integers(-100, 100)),
    hi=st.one_of(st.none(), st.integers(-100, 10**6)),
)
def test_integer_is_in_range_or_refused(text, lo, hi) -> None:
    parse = argt.integer(lo, hi)
    try:
        v = parse(text)
    except argparse.ArgumentTypeError:
        return
    assert isinstance(v, int) and v == int(text.strip(), 10)
    assert (lo is None or v >= lo) and (hi is None or v <= hi)


def test_integer_refuses_what_int_accepts_loosely() -> None:
    for text in ["1.0", "1e3", "nan", "0x10", "", " "]:
        with pytest.raises(argparse.ArgumentTypeError):
            argt.count(text)
    assert argt.count(" 7 ") == 7


@settings(max_examples=25, deadline=None)
@given(items=st.lists(hostile_numbers(), min_size=1, max_size=4))
def test_lists_are_all_valid_or_refused(items) -> None:
    text = ",".join(items)
    try:
        vals = argt.listed(argt.count, "counts")(text)
    except argparse.ArgumentTypeError:
        return
    assert len(vals) == len(text.split(",")) and all(1 <= v <= argt.MAX_COUNT for v in vals)


def test_output_paths(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    ok = [tmp_path / "new.json", tmp_path / "f.txt"]
    for p in ok:
        assert argt.output_file(str(p)) == str(p)
    bad = {
        str(tmp_path): "is a directory",
        str(tmp_path / "f.txt" / "x"): "Not a directory",
        str(tmp_path / "fifo"): "not a regular file",
        "": "empty",
        "/proc/fmoe_nope/x.json": "does not exist",
        "/proc/x.json": "cannot write",
        str(tmp_path / "a" / "b" / "new.json"): "does not exist",
    }
    for p, why in bad.items():
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            argt.output_file(p)
    assert argt.output_dir(str(tmp_path / "new_dir")) == str(tmp_path / "new_dir")
    bad_dirs = [tmp_path / "f.txt", tmp_path / "fifo", "", "/proc/fmoe_nope", tmp_path / "a/b"]
    for p in map(str, bad_dirs):
        with pytest.raises(argparse.ArgumentTypeError):
            argt.output_dir(p)
    assert not (tmp_path / "a").exists() and not (tmp_path / "new_dir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "fifo"]  # probes removed


def test_input_paths(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    assert argt.input_file(str(tmp_path / "f.txt"))
    assert argt.input_file(str(tmp_path / "nope"))  # the reader names a missing file
    for p in [str(tmp_path), str(tmp_path / "fifo"), str(tmp_path / "f.txt" / "x"), ""]:
        with pytest.raises(argparse.ArgumentTypeError):
            argt.input_file(p)


def test_ray_address() -> None:
    for ok in ["local", "127.0.0.1:6379", "ray://head:10001", "[::1]:6379"]:
        assert argt.ray_address(ok) == ok
    for bad in ["", "garbage", "host:", ":1", "host:0", "host:70000", "host:x"]:
        with pytest.raises(argparse.ArgumentTypeError):
            argt.ray_address(bad)
    with pytest.raises(InputError, match="cannot connect|no answer"):
        argt.probe_ray("127.0.0.1:9", timeout_s=2)  # the discard port: nothing listens


def test_limits_name_the_figure_and_how_to_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MEMORY_ENV, "1")
    require_memory("x", 0.5 * 2**30, "lower it")
    with pytest.raises(InputError, match=r"x: needs about 2 GiB .* lower it, or set FMOE_MEMORY"):
        require_memory("x", 2 * 2**30, "lower it")
    with pytest.raises(InputError, match="unbounded"):
        require_memory("x", math.inf, "lower it")
    require_time("t", 5, 10, "raise it")
    with pytest.raises(InputError, match=r"t: would take about 20 s, past the limit of 10 s"):
        require_time("t", 20, 10, "raise it")
    monkeypatch.setenv(MEMORY_ENV, "nan")
    with pytest.raises(InputError, match=MEMORY_ENV):
        require_memory("x", 1, "lower it")


def test_atomic_writers_refuse_special_targets_and_clean_up(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match="not a regular file"):
        write_json_atomic(tmp_path / "fifo", {})
    with pytest.raises(InputError, match="directory"):
        with atomic_output(tmp_path):
            pass
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "keep.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("fails mid-write")
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "keep.json"]
