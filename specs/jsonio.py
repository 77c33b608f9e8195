"""Files for pydantic models and results: atomic writes and loads with one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from specs.errors import InputError

M = TypeVar("M", bound=BaseModel)


def _check_target(path: Path) -> None:
    """InputError unless ``path`` is absent or a regular file: a rename into place would
    replace a directory's name or a device node (/dev/full as root) with a file."""
    if path.is_symlink() and path.resolve().is_file():
        return
    if path.exists() and not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise InputError(f"{path}: is {what}; cannot write a file there")


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it goes.

    Writers (plots, tables) write to the yielded path, so a failure never leaves a
    half-written ``path`` behind.
    """
    path = Path(path)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(fig: Any, path: str | Path, dpi: int = 110, tight: bool = True) -> Path:
    """Write a matplotlib figure to ``path`` as a PNG atomically, then close it (also
    when writing fails). Returns the path. matplotlib is imported only here."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_output(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename: never a half-written file."""
    path = Path(path)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def validation_message(err: ValidationError) -> str:
    """First problem of a pydantic ValidationError as 'field: message'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ())) or "<root>"
    given = first.get("input")
    shown = "" if isinstance(given, dict | list) else f" (got {given!r:.60})"
    return f"{loc}: {first.get('msg', 'invalid')}{shown}"


def load_model_json(cls: type[M], path: str | Path) -> M:
    """Load and validate ``cls`` from a JSON file; any problem becomes an InputError naming the file."""
    path = Path(path)
    if path.exists() and not path.is_dir() and not path.is_file():
        # a FIFO or device: reading one can block forever
        raise InputError(f"{path}: not a regular file (expected a JSON file)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory (expected a JSON file)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (expected a JSON file)") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise InputError(f"{path}: field {validation_message(exc)}") from None
