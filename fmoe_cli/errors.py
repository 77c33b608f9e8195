"""Exceptions at the command boundary -> (exit status, one line).

Bad input raises :class:`~specs.errors.InputError` wherever it is found; what reaches
the boundary otherwise is sorted here: file-system errors on a named path, text that is
not UTF-8, JSON that does not parse, a pydantic model refusing a value, a request for
more memory than there is and a ValueError or OverflowError (numpy refusing a size read
from a file) are the user's input (status 2, ``error: ...``); anything else
is a bug in fmoe (status 1, ``internal error: ...`` and a hint to rerun with ``--debug``,
which re-raises so the traceback shows).
"""

from __future__ import annotations

import errno
import json

from pydantic import ValidationError

from specs.errors import InputError
from specs.jsonio import validation_message

BAD_INPUT = 2
INTERNAL = 1

# errno values whose OSError describes a path the user gave (missing, a directory, ...)
_PATH_ERRNOS = {
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "already exists",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many symbolic links",
    errno.EXDEV: "on another file system",
    errno.EBUSY: "device or resource busy",
    errno.EDQUOT: "disk quota exceeded",
}


def one_line(text: str) -> str:
    """``text`` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def _is_torch_oom(exc: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (or its OutOfMemoryError)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def classify(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one-line message (without the ``fmoe CMD:`` prefix) of an
    exception that reached the command boundary."""
    if isinstance(exc, InputError):
        return BAD_INPUT, "error: " + one_line(str(exc))
    if isinstance(exc, ValidationError):
        return BAD_INPUT, "error: " + one_line(validation_message(exc))
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _PATH_ERRNOS):
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        why = exc.strerror or _PATH_ERRNOS.get(exc.errno or 0, type(exc).__name__)
        return BAD_INPUT, one_line(f"error: {where}: {why.lower()}" if where else f"error: {why}")
    if isinstance(exc, ConnectionError | TimeoutError):  # an address the user gave
        return BAD_INPUT, one_line(f"error: cannot connect ({exc or type(exc).__name__})")
    if isinstance(exc, UnicodeDecodeError):
        return BAD_INPUT, one_line(f"error: input is not UTF-8 text ({exc.reason})")
    if isinstance(exc, json.JSONDecodeError):
        return BAD_INPUT, one_line(f"error: input is not valid JSON ({exc})")
    if isinstance(exc, MemoryError) or _is_torch_oom(exc):
        return BAD_INPUT, one_line(
            f"error: out of memory ({exc or 'allocation failed'}); the input asks for more "
            "than this machine holds: use smaller sizes"
        )
    if isinstance(exc, (ValueError, OverflowError)):
        # numpy and the standard library refuse values they cannot hold this way
        # (an array size past the limit, a number too large for a C integer); the value
        # came from the input, which the validation layer should have caught first
        return BAD_INPUT, one_line(
            f"error: {exc or type(exc).__name__} (a value from the input was refused; "
            "rerun with --debug for where)"
        )
    return INTERNAL, one_line(
        f"internal error: {type(exc).__name__}: {exc} (a bug in fmoe, not your input; "
        "rerun with --debug for the traceback and report it)"
    )
