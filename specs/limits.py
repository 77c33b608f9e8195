"""Limits that stop hostile sizes from hanging or exhausting the machine.

Sizes that come from arguments or files are checked here *before* anything is allocated
or started: :func:`require_memory` compares an estimate with the memory this process can
still get, :func:`require_time` an estimated duration with a limit the caller names.
Both raise :class:`~specs.errors.InputError` with the figure, the limit and how to raise
it, so a typo such as ``--num-requests 10000000000`` or ``--link-gbps 1e-9`` is one line
and exit status 2, not a swap storm or a run that never ends.
"""

from __future__ import annotations

import math
import os
import resource
import shutil

from specs.errors import InputError

# Share of the available memory one estimate may claim: the rest covers what the
# estimate leaves out (interpreter, libraries, temporaries it does not model).
MEMORY_SHARE = 0.8
# Environment variable that overrides the memory this process may use (GiB).
MEMORY_ENV = "FMOE_MEMORY_LIMIT_GB"


def available_memory_bytes() -> int:
    """Bytes this process can still allocate: ``FMOE_MEMORY_LIMIT_GB`` when set, else the
    smaller of the kernel's MemAvailable and the address-space limit (RLIMIT_AS)."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise InputError(f"{MEMORY_ENV}={env!r}: expected a number of GiB") from None
        if not (math.isfinite(gb) and gb > 0):
            raise InputError(f"{MEMORY_ENV}={env!r}: expected a positive finite number of GiB")
        return int(gb * 2**30)
    avail = _meminfo_available()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft not in (resource.RLIM_INFINITY, -1):
        avail = min(avail, soft)
    return avail


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 2**62  # unknown: do not refuse


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def require_memory(what: str, need_bytes: float, how_to_lower: str) -> None:
    """Raise InputError when ``need_bytes`` (an estimate) exceeds the share of memory this
    process may use. ``what`` names the input (flag or file and field); ``how_to_lower``
    says what to change."""
    limit = available_memory_bytes() * MEMORY_SHARE
    if not math.isfinite(need_bytes) or need_bytes > limit:
        shown = _gib(need_bytes) if math.isfinite(need_bytes) else "an unbounded amount"
        raise InputError(
            f"{what}: needs about {shown} of memory, more than the {_gib(limit)} this "
            f"machine has free ({MEMORY_SHARE:.0%} of what is available); {how_to_lower}, "
            f"or set {MEMORY_ENV} to raise the limit"
        )


def require_time(what: str, seconds: float, limit_s: float, how_to_raise: str) -> None:
    """Raise InputError when an estimated duration ``seconds`` exceeds ``limit_s``."""
    if not math.isfinite(seconds) or seconds > limit_s:
        shown = f"{seconds:.3g} s" if math.isfinite(seconds) else "forever"
        raise InputError(
            f"{what}: would take about {shown}, past the limit of {limit_s:g} s; {how_to_raise}"
        )


def require_disk(what: str, need_bytes: float, folder: str, how_to_lower: str) -> None:
    """Raise InputError when ``need_bytes`` (an estimate of a file to write) exceeds the
    free space of the file system holding ``folder``."""
    try:
        free = shutil.disk_usage(folder or ".").free
    except OSError:
        return  # the output check reports an unusable folder
    if not math.isfinite(need_bytes) or need_bytes > free:
        shown = _gib(need_bytes) if math.isfinite(need_bytes) else "an unbounded amount"
        raise InputError(
            f"{what}: needs about {shown} of disk, more than the {_gib(free)} free under "
            f"{folder or '.'}; {how_to_lower}"
        )
