"""Wheels the GPU machine lacks, carried with the device call (docs/gpu.md).

The GPU machine has no network and its own Python (3.12) with torch, transformers,
numpy, pandas, matplotlib, safetensors, tqdm, pytest and hypothesis, but not every
package this project needs. Two subcommands:

- ``download`` (here, with network): ``pip download`` each of :data:`WHEELS` (pinned to the
  versions this project is tested with) for CPython 3.12 on manylinux x86-64 into
  ``wheels/`` (ignored by git; pass ``wheels`` in the device call's ``carry``).
- ``missing DIR`` (there): print the wheels in DIR whose distribution is not installed or
  is installed at an older version, one path per line, for ``pip install --target``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

WHEELS = {
    "simpy": "4.1.2",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",  # compiled: the manylinux cp312 wheel
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",  # pydantic needs a recent one; installed only if older
    # the image's 5.17 predates what the executor needs (>= 5.18, realrun.offload); 5.24 is
    # the newest whose requirements the image meets (huggingface-hub >= 1.31, tokenizers 0.23)
    "transformers": "5.24.0",
}
"""Distributions the project imports at run time that the GPU image lacks (KINDS.md's
package list has none of simpy, pydantic, pydantic-core, annotated-types,
typing-inspection) or has too old (transformers 5.17), at the versions of this project's
development environment where the image's other packages allow (transformers: 5.24, not
the 5.25 here, which needs huggingface-hub 2)."""

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    parts = path.name.split("-")
    if len(parts) < 5 or not path.name.endswith(".whl"):
        raise ValueError(f"{path.name}: not a wheel file name")
    return _norm(parts[0]), parts[1]


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in re.split(r"[.+-]", v))


def missing(folder: Path, installed=None) -> list[Path]:
    """Wheels in ``folder`` whose distribution is absent or older than the wheel's.
    ``installed(name)`` gives an installed version or None (default: importlib.metadata)."""

    def current(name: str) -> str | None:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    installed = installed or current
    out = []
    for w in sorted(folder.glob("*.whl")):
        name, version = wheel_dist(w)
        have = installed(name)
        if have is None or _version_key(have) < _version_key(version):
            out.append(w)
    return out


def download(folder: Path) -> int:
    folder.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(folder)]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in WHEELS.items()]
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="pip download the wheels into a folder (default wheels/)")
    d.add_argument("folder", nargs="?", default="wheels")
    m = sub.add_parser("missing", help="print wheels whose distribution is absent or older")
    m.add_argument("folder")
    args = ap.parse_args(argv)
    if args.cmd == "download":
        return download(Path(args.folder))
    for w in missing(Path(args.folder)):
        print(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
