"""The GPU check (issue 24): every CUDA measurement of the project from one command.

Run through ``scripts/gpu_check.sh`` (which installs the project first; docs/gpu.md says
how wheels travel). Stages, each a subprocess with its own time limit cut from one total
budget (``--budget-s``), so a stage that hangs or fails leaves the others' results:

1. ``env``: versions, the GPU, free memory;
2. ``cuda_tests``: ``pytest -m cuda`` (tests/test_cuda.py: exactness on the GPU, slot
   fences, ``cache_gb='auto'``), counted from a JUnit file;
3. ``checkpoint``: a random-weight checkpoint with a real model's expert shapes and a
   few layers (realrun.checkpoints), the model of the three stages below;
4. ``bench``: ``fmoe calibrate bench`` on it (link vs copy size, expert FFN, dense
   layers, interference, overhead) plus the expert FFN of real shapes; the fitted
   profile;
5. ``validate``: ``fmoe calibrate validate`` with that profile: 3 policies x 3 cache
   sizes, simulated against measured TTFT, TPOT and hit rate, errors per cell;
6. ``overhead``: benchmarks/realrun_overhead.py, the executor with every expert
   resident against the unmodified model.

``--device cpu`` is the dry run: the same stages and flags at the smallest sizes (and an
emulated link, which a CUDA bench refuses), so a typo cannot cost device time; CI runs
it (tests/test_gpu_check.py). Results go to OUT (``$OUT`` or the positional folder):
``results.json``, ``summary.md``, ``profile.json``, ``runs.csv``, ``requests.csv``,
``junit.xml``, ``log.txt`` (seven files, flat: the device tool returns at most eight).
``results.json`` and ``summary.md`` are rewritten after every stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibration.gpu_report import goals, render_summary  # noqa: E402
from specs.jsonio import write_json_atomic  # noqa: E402

SCHEMA = "fmoe-gpu-check/1"


@dataclass(frozen=True)
class Sizes:
    """What each stage runs at on one kind of device."""

    checkpoint: dict[str, Any]
    bench: list[str]
    validate: list[str]
    overhead: list[str]
    planned_s: dict[str, float] = field(default_factory=dict)


SHAPES = "mixtral-8x7b,qwen3-30b-a3b,deepseek-v3"
LINK_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"

SIZES: dict[str, Sizes] = {
    # Qwen3-30B-A3B's experts (2048 x 768, 128 per layer, top-8; 9.4 MB each in bf16),
    # two MoE layers, a 32K vocabulary (the real one is 152K: embedding and head are not
    # what this measures). --search-store-rows 16: the async policy's search timing fills
    # its expert map store with iterations of up to 256 token rows; at these dimensions
    # 256 stored iterations took minutes of CPU on the development VM
    "cuda": Sizes(
        checkpoint={"like": "qwen3-30b-a3b", "layers": 2, "vocab": 32768, "dtype": "bf16"},
        bench=["--repeats", "7", "--max-tokens", "128", "--max-context", "512",
               "--link-sizes", LINK_SIZES, "--expert-shapes", SHAPES,
               "--search-store-rows", "16"],
        validate=["--num-prompts", "8", "--max-new-tokens", "32", "--max-prompt-tokens", "64",
                  "--repeats", "2"],
        overhead=["--reps", "5", "--prompts", "3", "--prompt-tokens", "32", "--new-tokens", "16"],
        planned_s={"cuda_tests": 100, "checkpoint": 45, "bench": 120, "validate": 130,
                   "overhead": 60},
    ),
    # the dry run: the same stages on a tiny model of the same family (96 KB experts), and
    # an emulated link slow enough (10 MB/s: 0.4 to 10 ms a copy) that copy time grows with
    # size well above a busy 2-core machine's scheduling noise
    "cpu": Sizes(
        checkpoint={"like": "qwen3-30b-a3b", "layers": 2, "vocab": 256, "dtype": "bf16",
                    "hidden_size": 128, "moe_intermediate_size": 128, "intermediate_size": 128,
                    "num_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 32},
        bench=["--repeats", "3", "--max-tokens", "4", "--max-context", "4", "--policies", "lru",
               "--overhead-rounds", "1", "--interference-rounds", "1", "--search-store-rows", "4",
               "--link-gbps", "0.01", "--link-latency-us", "10", "--link-sizes", "4K,32K,128K",
               "--expert-shapes", "qwen3-30b-a3b", "--shape-tokens", "1"],
        validate=["--num-prompts", "1", "--max-new-tokens", "2", "--max-prompt-tokens", "8",
                  "--cache-experts", "4,8,12"],
        overhead=["--reps", "1", "--prompts", "1", "--prompt-tokens", "8", "--new-tokens", "2"],
        planned_s={"cuda_tests": 60, "checkpoint": 30, "bench": 90, "validate": 90,
                   "overhead": 60},
    ),
}  # fmt: skip

POLICIES = "lru,mixtral-offloading,fmoe"
STAGES = ("cuda_tests", "bench", "validate", "overhead")  # the checkpoint comes with the last 3


def cuda_test_files() -> list[str]:
    """Test modules that hold CUDA tests (``pytest.mark.cuda``). Only these are collected:
    other modules import packages the GPU image may lack (ray, fastapi), and one
    collection error would stop the whole session."""
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in p.read_text()
    )


def stages_of(text: str | None) -> list[str]:
    """``--stages``: a comma list of :data:`STAGES` (default all); validate brings bench."""
    if not text:
        return list(STAGES)
    got = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in got if t not in STAGES]
    if bad or not got:
        raise SystemExit(f"--stages: unknown {bad or text!r} (known: {', '.join(STAGES)})")
    if "validate" in got and "bench" not in got:
        got.append("bench")
    return [t for t in STAGES if t in got]


class Check:
    """One run: the stages, their results, the files under ``out``."""

    def __init__(self, device: str, out: Path, budget_s: float, work: Path) -> None:
        self.device, self.out, self.budget_s, self.work = device, out, budget_s, work
        self.sizes = SIZES[device]
        self.t0 = time.monotonic()
        self.log = (out / "log.txt").open("a")
        self.results: dict[str, Any] = {
            "schema": SCHEMA,
            "device": device,
            "dry_run": device != "cuda",
            "started_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "budget_s": budget_s,
            "stages": {},
        }

    # -- bookkeeping ------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def say(self, msg: str) -> None:
        line = f"[gpu_check {time.monotonic() - self.t0:6.1f} s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def save(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.results["goals"] = goals(self.results)
        write_json_atomic(self.out / "results.json", self.results)
        text = render_summary(self.results)
        tmp = self.out / ".summary.md.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.out / "summary.md")

    def run(
        self, name: str, argv: list[str], later: list[str], json_out: bool = True
    ) -> subprocess.CompletedProcess | None:
        """Run one stage's command under its time limit; None when it did not finish.
        Its stderr goes to the log, and its stdout too unless ``json_out`` (then it is
        returned: the stage's JSON document)."""
        planned = self.sizes.planned_s[name]
        reserve = sum(self.sizes.planned_s[n] for n in later)
        left = self.remaining()
        timeout = max(left - reserve, min(planned, left))
        stage: dict[str, Any] = {"cmd": argv, "timeout_s": round(timeout, 1)}
        self.results["stages"][name] = stage
        if timeout < 5:
            stage["status"] = "skipped: out of time"
            self.say(f"{name}: skipped, {left:.0f} s left")
            self.save()
            return None
        self.say(f"{name}: {' '.join(argv)} (limit {timeout:.0f} s)")
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE if json_out else self.log, stderr=self.log,
            text=True, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            stage.update(status="timeout", wall_s=round(time.monotonic() - t0, 1))
            self.say(f"{name}: timed out after {timeout:.0f} s")
            self.save()
            return None
        stage.update(rc=proc.returncode, wall_s=round(time.monotonic() - t0, 1))
        stage["status"] = "ok" if proc.returncode == 0 else "failed"
        self.say(f"{name}: {stage['status']} (rc {proc.returncode}) in {stage['wall_s']} s")
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, "")

    def json_of(self, name: str, cp: subprocess.CompletedProcess | None) -> Any:
        """The stage's stdout as JSON (None, and the stage marked failed, when it is not)."""
        if cp is None or cp.returncode != 0:
            return None
        try:
            return json.loads(cp.stdout)
        except json.JSONDecodeError as exc:
            self.results["stages"][name].update(status="failed", error=f"stdout not JSON: {exc}")
            return None

    # -- stages ---------------------------------------------------------------------------
    def env(self) -> None:
        self.results["env"] = environment(self.device)
        e = self.results["env"]
        self.say(f"python {e['python']}, torch {e['torch']}, transformers {e['transformers']}, "
                 f"gpu {e.get('gpu_name')}")  # fmt: skip
        self.save()

    def cuda_tests(self, later: list[str]) -> None:
        junit = self.work / "junit.xml"
        # -v: each test's outcome reaches the log as it ends, also when the stage is cut off
        argv = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider",
                f"--junitxml={junit}", *cuda_test_files()]  # fmt: skip
        cp = self.run("cuda_tests", argv, later, json_out=False)
        if junit.exists():
            shutil.copy(junit, self.out / "junit.xml")
            self.results["cuda_tests"] = junit_counts(junit)
        if cp is not None and cp.returncode == 5:  # pytest: nothing collected
            self.results["stages"]["cuda_tests"]["status"] = "failed: no tests collected"
        self.save()

    def checkpoint(self, later: list[str]) -> Path | None:
        spec = dict(self.sizes.checkpoint)
        like, layers = spec.pop("like"), spec.pop("layers")
        name = f"{like}-{layers}l-random"
        path = self.work / name
        kwargs = {"like": like, "out": str(path), "layers": layers, "device": self.device, **spec}
        code = (
            "import json, sys; from realrun.checkpoints import write_random_checkpoint as w; "
            "w(**json.loads(sys.argv[1]))"
        )
        argv = [sys.executable, "-c", code, json.dumps(kwargs)]
        cp = self.run("checkpoint", argv, later, json_out=False)
        self.results["checkpoint"] = {"name": name, **kwargs}
        self.save()
        return path if cp is not None and cp.returncode == 0 else None

    def bench(self, model: Path, later: list[str]) -> Path | None:
        profile = self.work / "profile.json"
        argv = [sys.executable, "-m", "fmoe_cli.main", "calibrate", "bench", "--device",
                self.device, "--model", str(model), "--out", str(profile), "--json",
                "--no-progress", "--name", f"measured-{self.device}-{model.name}",
                *self.sizes.bench]  # fmt: skip
        self.results["bench"] = self.json_of("bench", self.run("bench", argv, later))
        ok = self.results["bench"] is not None and profile.exists()
        if ok:
            shutil.copy(profile, self.out / "profile.json")
        self.save()
        return profile if ok else None

    def validate(self, model: Path, profile: Path, later: list[str]) -> None:
        vout = self.work / "validate"
        argv = [sys.executable, "-m", "fmoe_cli.main", "calibrate", "validate", "--profile",
                str(profile), "--model", str(model), "--device", self.device, "--policies",
                POLICIES, "--out", str(vout), "--json", "--no-progress",
                *self.sizes.validate]  # fmt: skip
        self.results["validate"] = self.json_of("validate", self.run("validate", argv, later))
        for f in ("runs.csv", "requests.csv"):
            if (vout / f).exists():
                shutil.copy(vout / f, self.out / f)
        self.save()

    def overhead(self, model: Path, later: list[str]) -> None:
        argv = [sys.executable, "benchmarks/realrun_overhead.py", "--device", self.device,
                "--model", str(model), "--only", "overhead", "--json",
                *self.sizes.overhead]  # fmt: skip
        got = self.json_of("overhead", self.run("overhead", argv, later))
        self.results["overhead"] = got["overhead"] if got else None
        self.save()

    def skip(self, name: str, why: str) -> None:
        self.results["stages"][name] = {"status": f"skipped: {why}"}
        self.save()


def environment(device: str) -> dict[str, Any]:
    """Versions, the host and (CUDA) the GPU and its free memory."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    out: dict[str, Any] = {
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        **{d: version(d) for d in ("transformers", "numpy", "pandas", "pydantic", "simpy",
                                   "safetensors", "fmoe-sim")},
        "commit": git_commit(),
    }  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        out.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_bytes=int(total),
            gpu_free_bytes=int(free),
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_multiprocessors=props.multi_processor_count,
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max"
            r = subprocess.run([smi, q, "--format=csv,noheader"], capture_output=True, text=True)
            out["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    return out


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return r.stdout.strip() or None


def junit_counts(path: Path) -> dict[str, Any]:
    """Tests, failures, errors, skips and the failing tests' first message lines."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failing = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            for bad in [*case.findall("failure"), *case.findall("error")]:
                msg = (bad.get("message") or bad.text or "").strip().splitlines()
                failing.append(
                    {"test": f"{case.get('classname')}::{case.get('name')}",
                     "message": msg[0][:300] if msg else ""}
                )  # fmt: skip
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failing": failing}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help="results folder (default: $OUT, else gpu_check_out)")
    ap.add_argument("--device", choices=sorted(SIZES), default="cuda")
    ap.add_argument("--budget-s", type=float, help="total seconds (default: 480 cuda, 420 cpu)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (checkpoint)")
    ap.add_argument("--stages", help=f"comma list of {', '.join(STAGES)} (default all)")
    args = ap.parse_args(argv)
    stages = stages_of(args.stages)
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (480.0 if args.device == "cuda" else 420.0)
    work = Path(tempfile.mkdtemp(prefix="fmoe-gpu-check-"))
    check = Check(args.device, out, budget, work)
    try:
        check.env()
        if args.device == "cuda" and not check.results["env"]["cuda_available"]:
            check.say(
                "no CUDA device visible: nothing to measure (use --device cpu for the dry run)"
            )
            check.save()
            return 2
        model_stages = [s for s in stages if s != "cuda_tests"]
        if "cuda_tests" in stages:
            check.cuda_tests(["checkpoint", *model_stages] if model_stages else [])
        model = check.checkpoint(model_stages) if model_stages else None
        if model_stages and model is None:
            for s in model_stages:
                check.skip(s, "no checkpoint")
        elif model is not None:
            profile = check.bench(model, model_stages[1:]) if "bench" in stages else None
            if "validate" in stages:
                if profile is None:
                    check.skip("validate", "no profile")
                else:
                    check.validate(model, profile, ["overhead"] if "overhead" in stages else [])
            if "overhead" in stages:
                check.overhead(model, [])
    finally:
        check.save()
        check.log.close()
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    bad = [n for n, s in check.results["stages"].items() if s.get("status") != "ok"]
    print(f"gpu_check: {len(check.results['stages']) - len(bad)} stages ok"
          + (f", not ok: {', '.join(bad)}" if bad else "") + f"; results in {out}")  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
