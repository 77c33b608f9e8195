"""How long `fmoe --help` and other light commands take to start, next to `python -c pass`.

Prints the median over rounds of each command's wall time, and whether torch (or another
heavy library) was imported. The goal (issue 19): median `fmoe --help` under 0.5 s.

    python benchmarks/cli_startup.py [--rounds 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "fmoe --help": [sys.executable, "-m", "fmoe_cli.main", "--help"],
    "fmoe sim --help": [sys.executable, "-m", "fmoe_cli.main", "sim", "--help"],
    "fmoe run --help": [sys.executable, "-m", "fmoe_cli.main", "run", "--help"],
    "fmoe models": [sys.executable, "-m", "fmoe_cli.main", "models"],
    "fmoe policies": [sys.executable, "-m", "fmoe_cli.main", "policies"],
}
HEAVY = ("torch", "transformers", "simpy", "pandas", "matplotlib")
_PROBE = (
    "import sys, contextlib, io\n"
    "from fmoe_cli.main import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try: main(sys.argv[1:])\n"
    "    except SystemExit: pass\n"
    f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
)


def wall_times(argv: list[str], rounds: int) -> list[float]:
    """Wall seconds of ``rounds`` runs of argv (output discarded)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def heavy_imports(argv: list[str]) -> str:
    """The heavy libraries a command imports ('' when none)."""
    if argv[1] != "-m":
        return ""
    probe = [sys.executable, "-c", _PROBE, *argv[3:]]
    return subprocess.run(probe, capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for name, argv in COMMANDS.items():
        times = wall_times(argv, args.rounds)
        rows.append(
            {
                "command": name,
                "median_s": round(statistics.median(times), 4),
                "min_s": round(min(times), 4),
                "heavy_imports": heavy_imports(argv),
            }
        )
    base = rows[0]["median_s"]
    for row in rows:
        row["x_python"] = round(row["median_s"] / base, 2)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'command':<18} {'median s':>9} {'min s':>7} {'x python':>9}  heavy imports")
    for row in rows:
        print(
            f"{row['command']:<18} {row['median_s']:>9.3f} {row['min_s']:>7.3f} "
            f"{row['x_python']:>9.2f}  {row['heavy_imports'] or '-'}"
        )
    help_s = rows[1]["median_s"]
    print(
        f"goal: fmoe --help median < 0.5 s: {'met' if help_s < 0.5 else 'missed'} ({help_s:.3f} s)"
    )


if __name__ == "__main__":
    main()
