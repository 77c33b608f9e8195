"""Hostile-input corpus: several hundred bad argv and file cases against every command.

Each case runs ``python -m fmoe_cli.main ARGV`` in its own process (memory-capped, with
a timeout) in a fresh output folder holding one pre-existing file, and is classed as

- ``clean_error``: exit 2 with exactly one line on stderr and no traceback;
- ``valid``: exit 0 (the input was acceptable);
- ``traceback``: a Python traceback on stderr, or any other exit status;
- ``hang``: still running after the timeout (killed);
- ``partial_file``: a failed run left a new file behind or changed the existing one, or
  any run left a temporary file.

Trace-file integrity (corrupt trace contents) has its own corpus (the traces engineer's);
only a few whole-file cases (empty, random bytes, a directory) are here, to check the
command boundary. Usage::

    python benchmarks/hostile_inputs.py [--only sim,run] [--timeout 60] [--list] [-v]

Prints counts per class and per command, and the failing cases. (Over 450 lines: most
of the file is the corpus itself, data kept in one place so the figures come from one
definition.)

Over 450 lines on purpose: most of it is the table of hostile cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
MEM_CAP = 6 * 2**30  # bytes of address space per case: a runaway allocation fails, not the host

# -- hostile values ---------------------------------------------------------------------------
INT_BAD = ["-1", "0", "abc", "1.5", "99999999999999999999", ""]
FLOAT_BAD = ["-1", "0", "nan", "inf", "-inf", "1e308", "abc"]
FRACTION_BAD = ["-0.1", "1.5", "nan", "inf", "x"]
NAME_BAD = ["", "no-such-thing", "../../etc/passwd", "\x00"]


@dataclass
class Case:
    command: str
    argv: list[str]
    label: str
    # placeholders: {out} the case's output folder, {fx} the fixtures folder
    result: str = ""
    detail: str = ""
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)


def _cases(fx: Path) -> list[Case]:
    """The fixed corpus. ``{out}`` is a fresh folder per case holding ``existing.txt``."""
    tr = str(fx / "valid.fmoe")
    out: list[Case] = []

    def add(command: str, argv: list[str], label: str) -> None:
        out.append(Case(command, argv, label))

    def flag_values(
        command: str, base: list[str], flag: str, values: list[str], replace: bool = True
    ) -> None:
        for v in values:
            argv = list(base)
            if replace and flag in argv:
                i = argv.index(flag)
                argv[i + 1] = v
            else:
                argv += [flag, v]
            add(command, argv, f"{flag} {v!r}")

    def out_paths(command: str, base: list[str], flag: str, suffix: str) -> None:
        """An output flag pointed at a directory, an unwritable place, a path under a
        regular file, a FIFO (not a regular file) and an empty path. (Never a device
        such as /dev/full: a rename-into-place as root would replace the device node.)"""
        bad = {
            "a directory": "{out}",
            "under a file": "{out}/existing.txt/x" + suffix,
            "unwritable": "/proc/fmoe_nope/x" + suffix,
            "a FIFO": "{out}/fifo",
            "empty": "",
        }
        for what, p in bad.items():
            argv = list(base)
            argv[argv.index(flag) + 1] = p
            add(command, argv, f"{flag} {what}")

    # -- models / hardware / policies ------------------------------------------------------
    add("models", ["models"], "list")
    add("models", ["models", "tiny-mixtral", "--json"], "preset")
    for name in NAME_BAD:
        add("models", ["models", name], f"name {name!r}")
    add("hardware", ["hardware"], "list")
    for name in NAME_BAD:
        add("hardware", ["hardware", name], f"name {name!r}")
    add("policies", ["policies", "--json"], "list")
    add("policies", ["policies", "--bogus"], "unknown flag")
    for f in SPEC_FILES:
        add("models", ["models", f"{fx}/{f}"], f"spec file {f}")
    for f in PROFILE_FILES:
        add("hardware", ["hardware", f"{fx}/{f}"], f"profile file {f}")
    add("models", ["models", str(fx)], "spec path is a directory")
    add("hardware", ["hardware", f"{fx}/missing.json"], "profile missing")
    add("hardware", ["hardware", f"{fx}/valid.fmoe/x.json"], "profile under a file")

    # -- trace synth ------------------------------------------------------------------------
    synth = ["trace", "synth", "--model", "tiny-mixtral", "--num-requests", "3"]
    synth += ["--max-prompt-len", "8", "--max-output-len", "4", "--out", "{out}/t.fmoe"]
    add("trace synth", synth, "valid")
    for flag in ["--num-requests", "--max-prompt-len", "--max-output-len", "--num-topics"]:
        flag_values("trace synth", synth, flag, INT_BAD)
    for flag in [
        "--prompt-len-mean",
        "--arrival-rate",
        "--gate-temperature",
        "--routing-noise",
        "--affinity",
        "--popularity-skew",
    ]:
        flag_values("trace synth", synth, flag, FLOAT_BAD)
    for flag in ["--temporal-locality", "--lookahead-noise"]:
        flag_values("trace synth", synth, flag, FRACTION_BAD)
    flag_values("trace synth", synth, "--popularity-skew", ["1,nan", "1,,2", "1,inf"])
    flag_values("trace synth", synth, "--num-requests", ["10000000000", "1000000000"])
    flag_values("trace synth", synth, "--max-prompt-len", ["1000000000"])
    flag_values("trace synth", synth, "--kinds-per-topic", ["100000000"])
    out_paths("trace synth", synth, "--out", ".fmoe")
    add("trace synth", synth[:-2] + ["--out", "{out}/existing.txt"], "--out existing file")
    for f in CONFIG_FILES:
        add("trace synth", [*synth, "--config", f"{fx}/{f}"], f"config {f}")
    add("trace synth", [*synth, "--config", str(fx)], "config is a directory")
    add("trace synth", [*synth, "--model", f"{fx}/spec_huge_experts.json"], "spec huge")
    add("trace synth", ["trace", "synth", "--out", "{out}/t.fmoe"], "no --model")
    add("trace synth", [*synth[:-2]], "no --out")
    add("trace synth", [*synth, "--fit", str(fx)], "--fit a directory")
    add("trace synth", [*synth, "--fit", f"{fx}/random.bin"], "--fit random bytes")
    for f in SPEC_FILES:
        add("trace synth", [*synth, "--model", f"{fx}/{f}"], f"spec file {f}")

    # -- trace info / stats / prompts / import ------------------------------------------------
    for sub in ["info", "stats"]:
        add(f"trace {sub}", ["trace", sub, tr], "valid")
        for what, p in BAD_TRACE_PATHS.items():
            add(f"trace {sub}", ["trace", sub, p.format(fx=fx)], f"trace {what}")
    stats = ["trace", "stats", tr, "--plot", "{out}/h.png"]
    add("trace stats", stats, "valid plot")
    out_paths("trace stats", stats, "--plot", ".png")
    add("trace prompts", ["trace", "prompts", "mt-bench", "--n", "2"], "valid")
    flag_values("trace prompts", ["trace", "prompts", "gsm8k"], "--n", INT_BAD)
    add("trace prompts", ["trace", "prompts", "nope"], "unknown set")
    imp = ["trace", "import", str(FIX / "switch_base_8_router_trace.json")]
    imp += ["--format", "switch-json", "--out", "{out}/i.fmoe"]
    add("trace import", imp, "valid")
    out_paths("trace import", imp, "--out", ".fmoe")
    flag_values("trace import", imp, "--layers", ["-1", "abc", "99999999999"], replace=False)
    flag_values("trace import", imp, "--prompt-len", INT_BAD, replace=False)
    for what, p in BAD_TRACE_PATHS.items():
        argv = list(imp)
        argv[2] = p.format(fx=fx)
        add("trace import", argv, f"input {what}")
    rj = ["trace", "import", str(FIX / "vllm_qwen1.5_moe_routes_excerpt.jsonl")]
    rj += ["--format", "routing-jsonl", "--out", "{out}/i.fmoe"]
    add("trace import", rj, "valid routing-jsonl")
    flag_values("trace import", rj, "--field", ["noequals", "=", "x=y"], replace=False)
    flag_values("trace import", rj, "--model", ["nope", f"{fx}/spec_negative.json"], False)

    # -- trace capture ------------------------------------------------------------------------
    cap = ["trace", "capture", "--model", "tiny-mixtral", "--prompt", "hi"]
    cap += ["--num-prompts", "1", "--max-new-tokens", "2", "--out", "{out}/c.fmoe"]
    add("trace capture", cap, "valid")
    for flag in ["--num-prompts", "--max-new-tokens", "--max-prompt-tokens", "--batch-size"]:
        flag_values("trace capture", cap, flag, INT_BAD)
    flag_values("trace capture", cap, "--max-new-tokens", ["100000000"])
    flag_values("trace capture", cap, "--seed", ["abc", "1e3", "99999999999999999999"])
    out_paths("trace capture", cap, "--out", ".fmoe")
    for f in PROMPT_FILES:
        add("trace capture", [*cap[:4], "--prompts", f"{fx}/{f}", *cap[6:]], f"prompts {f}")
    add("trace capture", [*cap[:4], "--prompts", str(fx), *cap[6:]], "prompts a directory")
    add("trace capture", [*cap[:2], "--model", str(fx), *cap[4:]], "model a directory")

    # -- sim ----------------------------------------------------------------------------------
    sim = ["sim", "--model", "tiny-mixtral", "--hardware", "cpu-local", "--synth"]
    sim += ["--synth-requests", "4", "--policy", "lru", "--cache-experts", "8"]
    add("sim", sim, "valid synth")
    add("sim", ["sim", "--hardware", "cpu-local", "--trace", tr, "--policy", "fmoe"], "valid trace")
    for flag in ["--synth-requests", "--cache-experts", "--batch-size", "--prefetch-distance"]:
        flag_values("sim", sim, flag, INT_BAD)
    flag_values("sim", sim, "--synth-requests", ["100000000000"])
    for flag in ["--synth-rate", "--kv-reserve-gb", "--chunk-mb"]:
        flag_values("sim", sim, flag, FLOAT_BAD, replace=False)
    for flag in ["--cache-gb", "--per-gpu-cache-gb"]:
        flag_values("sim", sim[:-2], flag, FLOAT_BAD, replace=False)
    flag_values("sim", sim, "--train-fraction", FRACTION_BAD, replace=False)
    flag_values("sim", sim, "--seed", ["abc", "-1", "99999999999999999999"], replace=False)
    flag_values("sim", sim, "--policy", ["nope", ""])
    flag_values("sim", sim, "--policy-opt", ["noequals", "x=1", "prefetch_distance=nan"], False)
    add("sim", [*sim, "--cache-gb", "1"], "conflicting cache flags")
    add("sim", [*sim, "--trace", tr], "conflicting workload flags")
    add("sim", [*sim, "--offline", "--train-fraction", "0.5"], "conflicting offline flags")
    add("sim", ["sim", "--hardware", "cpu-local", "--policy", "lru"], "no workload")
    add("sim", ["sim", "--hardware", "cpu-local", "--synth", "--policy", "lru"], "synth no model")
    add("sim", sim[:3] + sim[5:], "no hardware")
    for what, p in BAD_TRACE_PATHS.items():
        add(
            "sim",
            ["sim", "--hardware", "cpu-local", "--trace", p.format(fx=fx), "--policy", "lru"],
            f"trace {what}",
        )
        add("sim", [*sim, "--train", p.format(fx=fx)], f"train {what}")
    for f in SPEC_FILES:
        add("sim", ["sim", "--model", f"{fx}/{f}", *sim[3:]], f"spec {f}")
    for f in PROFILE_FILES:
        add("sim", [*sim[:3], "--hardware", f"{fx}/{f}", *sim[5:]], f"profile {f}")
    for flag, suffix in [("--chrome-trace", ".json"), ("--requests-out", ".csv")]:
        base = [*sim, flag, "{out}/o" + suffix]
        add("sim", base, f"valid {flag}")
        out_paths("sim", base, flag, suffix)
        add("sim", [*sim, flag, "{out}/existing.txt"], f"{flag} existing file")

    # -- sweep --------------------------------------------------------------------------------
    sw = ["sweep", "--model", "tiny-mixtral", "--hardware", "cpu-local", "--synth"]
    sw += ["--synth-requests", "3", "--policies", "lru", "--cache-experts", "8"]
    sw += ["--out", "{out}/sweep", "--no-plots", "--quiet"]
    add("sweep", sw, "valid")
    add("sweep", [a for a in sw if a != "--no-plots"], "valid with plots")
    flag_values("sweep", sw, "--cache-experts", ["0", "-1", "1,,x", "8,nan", ""])
    flag_values("sweep", sw, "--cache-gb", ["nan", "inf", "-1", "1,abc"], replace=False)
    flag_values("sweep", sw, "--workers", INT_BAD + ["100000"], replace=False)
    flag_values("sweep", sw, "--synth-rate", ["nan", "inf", "-1"], replace=False)
    flag_values("sweep", sw, "--kv-reserve-gb", ["inf", "nan", "-1", "1e308"], replace=False)
    flag_values("sweep", sw, "--policies", ["", ",", "nope", "lru,nope"])
    flag_values("sweep", sw, "--ray", ["10.255.255.1:6379", "nohost:1", "garbage"], False)
    out_paths("sweep", sw, "--out", "")
    add(
        "sweep",
        [*sw[:-4], "--out", "{out}/existing.txt", "--no-plots", "--quiet"],
        "--out an existing file",
    )
    add("sweep", [*sw, "--format", "xlsx"], "bad format")
    add("sweep", [a for a in sw if a not in ("--out", "{out}/sweep")], "no --out")

    # -- run ----------------------------------------------------------------------------------
    run = ["run", "--model", "tiny-mixtral", "--policy", "lru", "--prompt", "hi"]
    run += ["--max-new-tokens", "2", "--cache-experts", "8"]
    add("run", run, "valid")
    add("run", [*run, "--link-gbps", "1"], "valid emulated link")
    for flag in [
        "--max-new-tokens",
        "--cache-experts",
        "--batch-size",
        "--threads",
        "--num-devices",
    ]:
        flag_values("run", run, flag, INT_BAD, replace=flag in run)
    flag_values("run", run, "--link-gbps", FLOAT_BAD + ["1e-9", "1e-6"], replace=False)
    flag_values("run", run, "--link-latency-us", ["-1", "nan", "inf", "1e12"], replace=False)
    flag_values("run", run[:-2], "--cache-gb", FLOAT_BAD + ["auto"], replace=False)
    flag_values("run", run, "--reserve-gb", ["-1", "nan", "inf"], replace=False)
    flag_values("run", run, "--max-new-tokens", ["100000000"])
    flag_values("run", run, "--policy", ["nope"])
    add("run", [*run, "--cache-gb", "1"], "conflicting budgets")
    add("run", run[2:], "no --model")
    add("run", [*run, "--device", "tpu"], "bad device")
    for flag, suffix in [("--trace-out", ".fmoe")]:
        base = [*run, flag, "{out}/t" + suffix]
        add("run", base, f"valid {flag}")
        out_paths("run", base, flag, suffix)
    for what, p in BAD_TRACE_PATHS.items():
        add(
            "run",
            [*run[:4], "--policy", "fmoe", *run[6:], "--train-trace", p.format(fx=fx)],
            f"train-trace {what}",
        )
    add("run", [*run, "--store", "file", "--store-dir", "{out}/existing.txt"], "store-dir a file")
    add("run", [*run, "--store", "file", "--store-dir", "/proc/fmoe_nope"], "store-dir unwritable")
    for f in PROMPT_FILES:
        add("run", [*run[:6], "--prompts", f"{fx}/{f}", *run[6:]], f"prompts {f}")

    # -- calibrate ----------------------------------------------------------------------------
    bench = ["calibrate", "bench", "--model", "tiny-mixtral", "--repeats", "1"]
    bench += ["--max-tokens", "4", "--max-context", "8", "--overhead-rounds", "1"]
    bench += ["--interference-rounds", "1", "--policies", "lru", "--no-progress"]
    bench += ["--out", "{out}/p.json"]
    add("calibrate bench", bench, "valid")
    for flag in ["--repeats", "--max-tokens", "--max-context", "--overhead-rounds", "--threads"]:
        flag_values(
            "calibrate bench", bench, flag, ["-1", "0", "abc", "99999999999"], replace=flag in bench
        )
    flag_values("calibrate bench", bench, "--link-gbps", FLOAT_BAD + ["1e-9"], replace=False)
    flag_values("calibrate bench", bench, "--link-latency-us", ["-1", "nan", "inf"], False)
    flag_values("calibrate bench", bench, "--policies", ["", ",", "nope"])
    out_paths("calibrate bench", bench, "--out", ".json")
    add("calibrate bench", [*bench[:2], "--model", str(fx), *bench[4:]], "model a directory")
    val = ["calibrate", "validate", "--profile", f"{fx}/profile.json", "--model", "tiny-mixtral"]
    val += ["--no-progress"]
    val += ["--num-prompts", "1", "--max-new-tokens", "2", "--policies", "lru"]
    val += ["--cache-experts", "8"]
    for flag in ["--num-prompts", "--max-new-tokens", "--repeats", "--batch-size"]:
        flag_values("calibrate validate", val, flag, ["-1", "0", "abc"], replace=flag in val)
    flag_values("calibrate validate", val, "--cache-experts", ["0", "-1", "8,x", ""])
    flag_values("calibrate validate", val, "--policies", ["", "nope"])
    add("calibrate validate", val, "valid")
    for f in PROFILE_FILES:
        argv = list(val)
        argv[3] = f"{fx}/{f}"
        add("calibrate validate", argv, f"profile {f}")
    add("calibrate validate", [*val, "--out", "{out}/existing.txt"], "--out an existing file")
    add("calibrate validate", [*val, "--out", "/proc/fmoe_nope"], "--out unwritable")
    add("calibrate", ["calibrate", "bench"], "bench no --out")

    # -- demo ---------------------------------------------------------------------------------
    demo = ["demo", "--model", "tiny-mixtral", "--hardware", "cpu-local", "--num-requests", "4"]
    demo += ["--workers", "1", "--cache-gb", "0.001", "--json", "--out", "{out}/demo"]
    add("demo", demo, "valid")
    flag_values("demo", demo, "--num-requests", INT_BAD + ["100000000"])
    flag_values("demo", demo, "--workers", ["0", "-1", "100000"])
    flag_values("demo", demo, "--cache-gb", FLOAT_BAD)
    flag_values("demo", demo, "--seed", ["abc", "1.5"])
    flag_values("demo", demo, "--model", ["nope", f"{fx}/spec_negative.json"])
    flag_values("demo", demo, "--hardware", ["nope", f"{fx}/profile_inf_bandwidth.json"])
    out_paths("demo", demo, "--out", "")
    add("demo", [*demo[:-1], "{out}/existing.txt"], "--out an existing file")

    # -- global -------------------------------------------------------------------------------
    add("main", [], "no command")
    add("main", ["nope"], "unknown command")
    add("main", ["--debug"], "debug alone")
    add("main", ["sim", "--bogus"], "unknown flag")
    return out


# -- fixture files ----------------------------------------------------------------------------
BAD_TRACE_PATHS = {
    "missing": "{fx}/missing.fmoe",
    "a directory": "{fx}",
    "empty": "{fx}/empty.fmoe",
    "random bytes": "{fx}/random.bin",
    "text": "{fx}/text.fmoe",
    "under a file": "{fx}/valid.fmoe/x",
}
SPEC_FILES: dict[str, object] = {}
PROFILE_FILES: dict[str, object] = {}
CONFIG_FILES: dict[str, object] = {}
PROMPT_FILES: dict[str, str | bytes] = {}


def _spec_variants(spec: dict) -> dict[str, object]:
    def edit(**kv: object) -> dict:
        return {**spec, **kv}

    return {
        "spec_valid.json": spec,
        "spec_negative.json": edit(num_experts=-8),
        "spec_zero_layers.json": edit(num_layers=0),
        "spec_huge_experts.json": edit(num_experts=10**12),
        "spec_huge_hidden.json": edit(hidden_size=10**15),
        "spec_float_experts.json": edit(num_experts=8.5),
        "spec_string_layers.json": edit(num_layers="four"),
        "spec_topk_gt_experts.json": edit(top_k=99),
        "spec_sources_int.json": edit(sources=7),
        "spec_sources_nested.json": edit(sources=[{"a": 1}]),
        "spec_name_list.json": edit(name=["x"]),
        "spec_expert_bytes_huge.json": edit(expert_bytes=10**30),
        "spec_extra_field.json": edit(bogus=1),
        "spec_not_object.json": [1, 2, 3],
        "spec_null.json": None,
        "spec_not_json.json": "RAW:{not json",
        "spec_binary.json": b"\xff\xfe\x00\x01garbage",
        "spec_nan.json": "RAW:"
        + json.dumps(spec).replace('"vocab_size": ', '"vocab_size": NaN, "x_": '),
        "spec_dense_layers_bad.json": edit(dense_layers=[-1]),
        "spec_dtype_bad.json": edit(dtype="int3"),
    }


def _profile_variants(prof: dict) -> dict[str, object]:
    def edit_link(**kv: object) -> dict:
        return {**prof, "link": {**prof["link"], **kv}}

    def edit_gpu(**kv: object) -> dict:
        return {**prof, "gpu": {**prof["gpu"], **kv}}

    raw = json.dumps(prof)
    return {
        "profile.json": prof,
        "profile_inf_bandwidth.json": "RAW:"
        + json.dumps(edit_link(pinned_bandwidth_Bps=1.0)).replace(
            '"pinned_bandwidth_Bps": 1.0', '"pinned_bandwidth_Bps": Infinity'
        ),
        "profile_nan_latency.json": "RAW:"
        + json.dumps(edit_link(latency_s=0.5)).replace('"latency_s": 0.5', '"latency_s": NaN'),
        "profile_zero_bandwidth.json": edit_link(pinned_bandwidth_Bps=0),
        "profile_tiny_bandwidth.json": edit_link(
            pinned_bandwidth_Bps=1e-300, pageable_bandwidth_Bps=1e-300
        ),
        "profile_negative_memory.json": edit_gpu(memory_bytes=-1),
        "profile_huge_gpus.json": {**prof, "num_gpus": 10**9},
        "profile_sources_int.json": {**prof, "sources": 5},
        "profile_notes_list.json": {**prof, "notes": ["a"]},
        "profile_name_int.json": {**prof, "name": 3},
        "profile_kind_bad.json": {**prof, "kind": "guessed"},
        "profile_schema_9.json": {**prof, "schema_version": 9},
        "profile_no_gpu.json": {k: v for k, v in prof.items() if k != "gpu"},
        "profile_not_json.json": "RAW:" + raw[: len(raw) // 2],
        "profile_list.json": [prof],
        "profile_huge_tflops.json": edit_gpu(tflops=1e308),
        "profile_fit_errors_str.json": {
            **prof,
            "compute": {**prof.get("compute", {}), "fit_errors": "x"},
        },
    }


def _config_variants() -> dict[str, object]:
    return {
        "cfg_valid.json": {"num_requests": 3, "max_prompt_len": 8, "max_output_len": 4},
        "cfg_negative.json": {"num_requests": -3},
        "cfg_huge.json": {"num_requests": 10**12},
        "cfg_nan.json": "RAW:" + '{"arrival_rate": NaN}',
        "cfg_inf.json": "RAW:" + '{"routing_noise": Infinity}',
        "cfg_wrong_type.json": {"num_requests": "many"},
        "cfg_unknown.json": {"bogus": 1},
        "cfg_list.json": [1],
        "cfg_not_json.json": "RAW:{",
        "cfg_binary.json": b"\x00\xff\xfe",
        "cfg_skew_list_bad.json": {"popularity_skew": ["a", 1]},
        "cfg_huge_lengths.json": {"max_prompt_len": 10**12, "prompt_len_mean": 1e11},
    }


def _prompt_variants() -> dict[str, str | bytes]:
    return {
        "prompts_valid.txt": "Name three rivers.\nWhat is 2+2?\n",
        "prompts_empty.txt": "",
        "prompts_blank.txt": "\n\n  \n",
        "prompts_binary.txt": b"\xff\xfe\x00garbage\x00",
        "prompts_bad.jsonl": "{not json\n",
        "prompts_number.jsonl": '{"prompt": 42}\n',
        "prompts_no_field.jsonl": '{"text": "hi"}\n',
        "prompts_list.jsonl": "[1, 2]\n",
        "prompts_null.jsonl": '{"prompt": null}\n',
    }


def _write(path: Path, payload: object) -> None:
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    elif isinstance(payload, str) and path.suffix in {".txt", ".jsonl"}:
        path.write_text(payload)
    elif isinstance(payload, str) and payload.startswith("RAW:"):
        path.write_text(payload[4:])
    else:
        path.write_text(json.dumps(payload))


def make_fixtures(fx: Path, env: dict[str, str]) -> None:
    """Write the valid and hostile input files the corpus refers to."""
    fx.mkdir(parents=True, exist_ok=True)
    spec = json.loads((ROOT / "specs/presets/models/tiny-mixtral.json").read_text())
    prof = json.loads((ROOT / "specs/presets/hardware/cpu-local.json").read_text())
    SPEC_FILES.update(_spec_variants(spec))
    PROFILE_FILES.update(_profile_variants(prof))
    CONFIG_FILES.update(_config_variants())
    PROMPT_FILES.update(_prompt_variants())
    for files in (SPEC_FILES, PROFILE_FILES, CONFIG_FILES, PROMPT_FILES):
        for name, payload in files.items():
            _write(fx / name, payload)
    (fx / "empty.fmoe").write_bytes(b"")
    (fx / "random.bin").write_bytes(os.urandom(4096))
    (fx / "text.fmoe").write_text("this is not a trace\n")
    argv = ["trace", "synth", "--model", "tiny-mixtral", "--num-requests", "4"]
    argv += ["--max-prompt-len", "8", "--max-output-len", "4", "--out", str(fx / "valid.fmoe")]
    subprocess.run(
        [sys.executable, "-m", "fmoe_cli.main", *argv], env=env, check=True, capture_output=True
    )


# -- running ----------------------------------------------------------------------------------
def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))
    os.setsid()


def _snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _is_temp(name: str) -> bool:
    base = Path(name).name
    return base.startswith(".") or ".tmp" in base or base.endswith("~")


def run_case(case: Case, work: Path, env: dict[str, str], timeout: float) -> None:
    folder = Path(tempfile.mkdtemp(dir=work, prefix="case."))
    (folder / "existing.txt").write_text("keep me\n")
    os.mkfifo(folder / "fifo")
    before = _snapshot(folder)
    argv = [a.replace("{out}", str(folder)) for a in case.argv]
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fmoe_cli.main", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=_limits,
            cwd=folder,
        )
    except ValueError as exc:  # an argv with a NUL byte cannot reach a process at all
        case.result, case.detail = "clean_error", f"(not passable to a process: {exc})"
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        _, err_b = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        case.result, case.detail = "hang", f"killed after {timeout:g} s"
        case.seconds = time.perf_counter() - t0
        shutil.rmtree(folder, ignore_errors=True)
        return
    case.seconds = time.perf_counter() - t0
    err = err_b.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    after = _snapshot(folder)
    temps = [n for n in after if _is_temp(n)]
    new = [n for n in after if n not in before]
    changed = [n for n in before if after.get(n) != before[n] and n in after]
    gone = [n for n in before if n not in after]
    if "Traceback (most recent call last)" in err or proc.returncode not in (0, 2):
        case.result = "traceback"
        case.detail = f"rc {proc.returncode}: " + (lines[-1] if lines else "(no stderr)")
    elif temps or (proc.returncode != 0 and (new or changed or gone)):
        case.result = "partial_file"
        case.detail = f"rc {proc.returncode}; temp {temps} new {new} changed {changed} gone {gone}"
    elif proc.returncode == 0:
        case.result, case.detail = "valid", ""
    elif len(lines) == 1:
        case.result, case.detail = "clean_error", lines[0]
    else:
        case.result = "traceback"  # a multi-line error counts as not clean
        case.detail = f"{len(lines)} stderr lines: " + " | ".join(lines[-3:])
    shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated command prefixes (e.g. sim,run,trace)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is a hang")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case")
    ap.add_argument("--json", metavar="PATH", help="also write every case's result as JSON")
    args = ap.parse_args()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RAY_DISABLE_USAGE_STATS": "1",
    }
    work = Path(tempfile.mkdtemp(prefix="fmoe_hostile."))
    try:
        fx = work / "fx"
        make_fixtures(fx, env)
        cases = _cases(fx)
        if args.only:
            wanted = tuple(args.only.split(","))
            cases = [c for c in cases if c.command.startswith(wanted)]
        if args.list:
            for c in cases:
                print(f"{c.command:20s} {c.label}")
            print(f"{len(cases)} cases")
            return 0
        t0 = time.perf_counter()
        for i, c in enumerate(cases):
            run_case(c, work, env, args.timeout)
            if args.verbose or c.result not in ("clean_error", "valid"):
                print(
                    f"[{i + 1}/{len(cases)}] {c.result:12s} {c.command:18s} {c.label}: "
                    f"{c.detail[:200]} ({c.seconds:.1f} s)",
                    flush=True,
                )
        totals = Counter(c.result for c in cases)
        per_cmd: dict[str, Counter] = {}
        for c in cases:
            per_cmd.setdefault(c.command, Counter())[c.result] += 1
        classes = ["clean_error", "valid", "traceback", "hang", "partial_file"]
        print()
        print(f"{'command':20s} " + " ".join(f"{k:>12s}" for k in classes))
        for cmd, cnt in per_cmd.items():
            print(f"{cmd:20s} " + " ".join(f"{cnt[k]:12d}" for k in classes))
        print(f"{'TOTAL':20s} " + " ".join(f"{totals[k]:12d}" for k in classes))
        print(
            f"{len(cases)} cases in {time.perf_counter() - t0:.0f} s (timeout {args.timeout:g} s)"
        )
        if args.json:
            from specs.jsonio import write_json_atomic

            write_json_atomic(args.json, [c.__dict__ for c in cases])
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
