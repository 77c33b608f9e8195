"""Argument types of every command, with their ranges, in one place.

Each type is an argparse ``type=`` callable: it parses the text, checks the value is
finite and inside its range, and otherwise raises ``ArgumentTypeError``, which argparse
prints as one line naming the flag (``fmoe sim: error: argument --synth-rate: ...``) and
exit status 2. Ranges are sanity bounds (nothing a real run needs is near them); what a
size costs in memory or time is checked against the machine separately (specs.limits).

Output paths are checked when parsed, before any work: not a directory (or, for a
folder, not a file), not a special file, and a writable folder (probed with a temporary
file that is removed at once), so a long run never fails at its last step.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

# -- the bounds (one place) -------------------------------------------------------------------
MAX_COUNT = 10**7  # requests, prompts, experts of a cache
MAX_TOKENS = 2**20  # token lengths and context
MAX_BATCH = 2**16  # rows of one batch
MAX_ROUNDS = 10**4  # benchmark repeats and rounds
MAX_WORKERS = 1024  # local processes
MAX_THREADS = 1024
MAX_DEVICES = 1024
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy both take [0, 2**63)
MAX_GB = 2.0**20  # 1 PiB: any cache or reserve size
MAX_RATE = 1e9  # arrivals per second
MAX_GBPS = 1e6  # an emulated link (GB/s)
MAX_LATENCY_US = 1e7  # an emulated link's per-transfer latency (10 s)
MAX_CHUNK_MB = 2.0**20
MAX_COPY_BYTES = 2**40  # one timed copy (memory is checked separately)


def _fail(kind: str, text: str, why: str = "") -> argparse.ArgumentTypeError:
    shown = repr(text) if isinstance(text, str) else str(text)
    return argparse.ArgumentTypeError(f"expected {kind}, got {shown}{why}")


def _fmt(x: float) -> str:
    """A bound as people write it: 1048576, not 1.04858e+06; 1e+09 stays short."""
    if float(x).is_integer() and abs(x) < 1e7:
        return str(int(x))
    return f"{x:g}"


def _range_words(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"<= {_fmt(hi)}"
    return ""


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (decimal digits only: '1.5', '1e3', 'nan' are refused)."""
    if lo == 1:
        kind = "a positive integer" + (f" <= {hi}" if hi is not None else "")
    elif lo is not None and hi is not None:
        kind = f"an integer in [{lo}, {hi}]"
    else:
        kind = f"an integer {_range_words(lo, hi, False)}".strip()

    def parse(text: str) -> int:
        try:
            v = int(text.strip(), 10)
        except (ValueError, AttributeError):
            raise _fail(kind, text) from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _fail(kind, text)
        return v

    parse.__name__ = "positive_int" if lo is not None and lo >= 1 else "int"
    return parse


def number(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> Callable[[str], float]:
    """A finite number in [lo, hi] ((lo, hi] with ``lo_open``); nan and inf are refused."""
    if lo == 0 and lo_open:
        kind = "a positive number" + (f" <= {_fmt(hi)}" if hi is not None else "")
    elif lo == 0:
        kind = "a number >= 0" + (f" and <= {_fmt(hi)}" if hi is not None else "")
    else:
        kind = f"a finite number {_range_words(lo, hi, lo_open)}".strip()

    def parse(text: str) -> float:
        try:
            v = float(text)
        except (ValueError, TypeError):
            raise _fail(kind, text) from None
        if not math.isfinite(v):
            raise _fail(kind, text)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _fail(kind, text)
        if hi is not None and v > hi:
            raise _fail(kind, text)
        return v

    parse.__name__ = "positive_float" if lo is not None and lo >= 0 and lo_open else "float"
    return parse


def listed(item: Callable[[str], object], what: str) -> Callable[[str], list]:
    """Comma-separated values of ``item``; empty items and an empty list are refused."""

    def parse(text: str) -> list:
        parts = [t.strip() for t in text.split(",")]
        if not parts or any(not p for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
        try:
            return [item(p) for p in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}; in {text!r}: {exc}"
            ) from None

    parse.__name__ = "list"
    return parse


def names(text: str) -> list[str]:
    """A non-empty comma-separated list of names."""
    parts = [t.strip() for t in text.split(",")]
    out = [p for p in parts if p]
    if not out or len(out) != len(parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return out


# Shared instances (flag type -> bound), so each kind of value has one definition.
count = integer(1, MAX_COUNT)
tokens = integer(1, MAX_TOKENS)
batch = integer(1, MAX_BATCH)
rounds = integer(1, MAX_ROUNDS)
workers = integer(1, MAX_WORKERS)
threads = integer(1, MAX_THREADS)
devices = integer(1, MAX_DEVICES)
seed = integer(0, MAX_SEED)
layers = integer(1, 10**4)
gib = number(0, MAX_GB, lo_open=True)
gib_or_zero = number(0, MAX_GB)
rate = number(0, MAX_RATE)
fraction = number(0, 1)
gbps = number(0, MAX_GBPS, lo_open=True)
latency_us = number(0, MAX_LATENCY_US)
chunk_mb = number(0, MAX_CHUNK_MB, lo_open=True)


def gib_or_auto(text: str) -> float | str:
    """A positive number of GiB, or ``auto`` (the real executor's cache from free memory)."""
    return "auto" if text == "auto" else gib(text)


gib_or_auto.__name__ = "positive_float"


# -- paths ---------------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (an existing directory), else why not."""
    base = _nearest_existing(folder)
    if base != folder:
        return f"directory {folder} does not exist"
    if not base.is_dir():
        return f"{base} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fmoe-probe.", dir=base)
    except OSError as exc:
        return f"cannot write in {base} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(tmp)
    return None


def output_file(text: str) -> str:
    """A file to write: not empty, not a directory or special file, in an existing
    writable folder (a typo in a folder name is an error, not a new folder)."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    path = Path(text)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:  # e.g. a path under a regular file (ENOTDIR), or too long
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is a directory (expected a file path)")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a regular file")
    why = _probe_writable(path.parent if str(path.parent) else Path("."))
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: not empty, not an existing file; an existing writable
    folder, or a new one (created when written) inside an existing writable folder."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
    path = Path(text)
    try:
        st = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    why = _probe_writable(path if st is not None else path.parent)
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return text


def input_file(text: str) -> str:
    """A file to read: not a directory, a FIFO or a device (reading a FIFO blocks for
    ever). A missing file passes here: the reader names it ("no such file") with the
    role it plays (trace, training trace, config)."""
    if not text or not text.strip():
        raise argparse.ArgumentTypeError("expected a file path, got an empty string")
    path = Path(text)
    try:
        st = path.stat()
    except FileNotFoundError:
        return text
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is a directory (expected a file)")
    if not stat.S_ISREG(st.st_mode):
        raise argparse.ArgumentTypeError(f"{text} is not a regular file")
    return text


input_file.__name__ = "path"
output_file.__name__ = "path"
output_dir.__name__ = "path"


# -- a Ray cluster address --------------------------------------------------------------------
RAY_CONNECT_TIMEOUT_S = 5.0


def ray_address(text: str) -> str:
    """``local`` (start Ray here) or ``[ray://]HOST:PORT`` of a running cluster."""
    if text == "local":
        return text
    rest = text.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected 'local' or HOST:PORT (optionally ray://HOST:PORT), got {text!r}"
        )
    return text


def probe_ray(address: str, flag: str = "--ray", timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Raise InputError unless a TCP connection to ``address`` opens within ``timeout_s``
    (Ray's own client retries for minutes on an address nothing answers)."""
    import socket

    from specs.errors import InputError

    if address == "local":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except TimeoutError:
        raise InputError(
            f"{flag} {address}: no answer within {timeout_s:g} s (is the Ray cluster up and "
            "the address HOST:PORT of its head node?)"
        ) from None
    except OSError as exc:
        raise InputError(
            f"{flag} {address}: cannot connect ({exc.strerror or exc}); is the Ray cluster up?"
        ) from None


# -- a pydantic field's own range --------------------------------------------------------------
def for_field(field: object, base: type) -> Callable[[str], object]:
    """The argparse type of a pydantic model field of type ``base`` (int or float):
    its ge/gt/le/lt bounds, and finite for floats, so a flag and the model agree."""
    lo = hi = None
    lo_open = False
    for m in getattr(field, "metadata", ()):
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        elif getattr(m, "gt", None) is not None:
            lo, lo_open = m.gt, True
        elif getattr(m, "le", None) is not None:
            hi = m.le
        elif getattr(m, "lt", None) is not None:
            hi = m.lt
    if base is int:
        if lo is not None and lo_open:
            lo, lo_open = int(lo) + 1, False
        return integer(lo, hi)
    if base is float:
        return number(lo, hi, lo_open=lo_open)
    return base  # type: ignore[return-value]
