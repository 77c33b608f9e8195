"""Turn a GPU check's results into what gets committed (docs/gpu.md says when).

    python scripts/gpu_report.py RESULTS_DIR [--name h200-measured]
        [--presets specs/presets/hardware] [--docs docs/gpu.md] [--allow-dry-run]

RESULTS_DIR is what scripts/gpu_check.sh wrote (``results.json``, ``profile.json``; from
a device call, the folder its files came back to). Writes, atomically:

1. the measured profile as a hardware preset ``<presets>/<name>.json``: the fitted
   profile with its name, and its sources and notes saying it was measured (the GPU,
   the date, the method: ``fmoe calibrate bench`` on the check's random-weight model,
   with the command line and commit), not taken from published figures;
2. the results section of ``docs/gpu.md`` (between the ``gpu-check results`` markers):
   the run's goals, CUDA tests, bench figures (link against copy size, expert FFN of
   real shapes), the validation table per cell and the executor overhead.

Results of a dry run (``--device cpu``) are refused unless ``--allow-dry-run`` (tests),
and are then labelled as not measured on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.gpu_report import render_summary  # noqa: E402
from specs.errors import InputError  # noqa: E402
from specs.hardware import HardwareProfile  # noqa: E402

BEGIN = "<!-- gpu-check results: begin (written by scripts/gpu_report.py) -->"
END = "<!-- gpu-check results: end -->"


def load_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise InputError(f"{folder}: no results.json (the folder scripts/gpu_check.sh wrote)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON ({exc})") from None
    if results.get("schema") != "fmoe-gpu-check/1":
        raise InputError(f"{path}: schema {results.get('schema')!r}, expected fmoe-gpu-check/1")
    return results


def measured_preset(folder: Path, results: dict[str, Any], name: str) -> HardwareProfile:
    """The check's fitted profile as a preset marked measured (see the module docstring)."""
    path = folder / "profile.json"
    if not path.is_file():
        raise InputError(f"{folder}: no profile.json (the bench stage did not finish)")
    prof = HardwareProfile.from_json(path)
    env = results.get("env") or {}
    ck = results.get("checkpoint") or {}
    cmd = " ".join((results.get("stages", {}).get("bench") or {}).get("cmd", [])[1:])
    where = (
        "a dry run on the CPU (NOT a GPU measurement)"
        if results.get("dry_run")
        else env.get("gpu_name")
    )
    source = (
        f"measured {results.get('started_utc')} on {where} by scripts/gpu_check.sh "
        f"(commit {env.get('commit')}; torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, "
        f"transformers {env.get('transformers')}): `{cmd}`"
    )
    notes = (
        f"Measured, not published figures. Method: `fmoe calibrate bench` on a random-weight "
        f"checkpoint with {ck.get('like')}'s expert shapes, {ck.get('layers')} MoE layers and a "
        f"{ck.get('vocab')}-token vocabulary ({ck.get('dtype')}); link figures from pinned and "
        f"pageable H2D copies timed with CUDA events (lower quartiles of the repeats); the "
        f"compute fits hold for that model ({prof.compute.fitted_for_model}). docs/gpu.md "
        f"has the run's tables. {prof.notes}"
    )
    return prof.model_copy(
        update={"name": name, "sources": [source, *prof.sources], "notes": notes}
    )


def docs_section(results: dict[str, Any]) -> str:
    """The results block for docs/gpu.md: the run's summary, headings one level down."""
    body = render_summary(results)
    lines = [("#" + ln if ln.startswith("#") else ln) for ln in body.splitlines()]
    return "\n".join([BEGIN, *lines, END])


def update_docs(path: Path, section: str) -> None:
    """Replace the marked block of ``path`` with ``section`` (appended when absent)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="the folder scripts/gpu_check.sh wrote")
    ap.add_argument("--name", default="h200-measured", help="preset name (default h200-measured)")
    ap.add_argument("--presets", default=str(ROOT / "specs/presets/hardware"))
    ap.add_argument("--docs", default=str(ROOT / "docs/gpu.md"))
    ap.add_argument("--allow-dry-run", action="store_true", help="accept CPU dry-run results")
    args = ap.parse_args(argv)
    try:
        folder = Path(args.results)
        results = load_results(folder)
        if results.get("dry_run") and not args.allow_dry_run:
            raise InputError(f"{folder}: a dry run on the CPU; nothing to commit as GPU figures")
        if results.get("bench"):
            preset = measured_preset(folder, results, args.name)
            out = Path(args.presets) / f"{args.name}.json"
            preset.to_json(out)
            print(f"wrote {out}")
        update_docs(Path(args.docs), docs_section(results))
        print(f"updated {args.docs}")
    except InputError as exc:
        print(f"gpu_report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
