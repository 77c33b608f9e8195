"""`fmoe calibrate validate`: the simulator's error against the real executor, same workload.

1. The real model (built once, experts offloaded) runs the prompts greedily with every
   expert resident and its routing recorded: that trace is the workload of every run
   (outputs are bitwise those of the unmodified model, so every real run routes alike).
   The capture runs at the validation's batch size, so its routing is that of the runs.
2. For each policy x cache size, the real executor serves the prompts under ``batching``
   with ``batch_size`` (closed loop; ``static``: a batch starts when the previous one has
   finished; ``continuous``: a waiting prompt joins at the next iteration after a request
   finishes; cold cache; the profile's link emulation on the CPU), and the simulator runs
   the captured trace with the profile, the same policy, cache size, batch size,
   batching, closed-loop arrivals and copy chunk size. (At batch size 1 static and
   continuous batching admit alike.) ``output_lens`` (realrun.output_lens) sets each
   request's token limit on the real side; the captured trace records each request's
   output length, so the simulator replays the same lengths. The real executor pads a static batch's prompts to
   one length; the simulator has no padding, so a padded prefill's extra dense work is
   error it shows. Continuous batching packs rows without padding (realrun.continuous).
   With ``repeats`` > 1 every cell's real side runs that many times (repeats outermost,
   so a cell's runs fall in different phases of a shared machine) and its figures are
   the medians (:mod:`calibration.repeats`), with the runs' spread beside the errors.
3. Errors per metric (:mod:`calibration.sim_error`): per-request TTFT/TPOT/e2e MAPE,
   hit-rate absolute error, stall time; a table, CSV files and a PNG
   (:mod:`calibration.validate_plot`).
4. Drift. Before each real run a probe times the model's decode steps without experts
   against the profile (``compute_slowdown``: 1 = as fast as when benched). Beside the
   errors above (the profile as benched), every cell is simulated once more on the
   profile's compute scaled by its median slowdown (``sim_<k>_drift`` columns; summary
   ``drift_corrected``): errors left there are not the machine's drift since the bench.

Sits on top of realrun and sim; they never import it. :func:`prepare_validation` checks
the profile (device, model, schema) and every other input before any weight is built.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from calibration.bench import NullProgress, Progress
from calibration.repeats import SPREAD_METRICS, RealRun, median_run, spread
from calibration.stopwatch import load_average
from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.jsonio import write_json_atomic
from specs.model_spec import ModelSpec

DEFAULT_POLICIES = ["lru", "mixtral-offloading", "fmoe"]
CAPTURE_POLICY = "lru"


@dataclass
class ValidateConfig:
    """Every knob of a validation (CLI flags map one to one)."""

    profile: str
    model: str | None = None
    device: str | None = None
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    cache_experts: list[int] | None = None
    prompts: str = "mt-bench"
    num_prompts: int = 4
    max_new_tokens: int = 16
    max_prompt_tokens: int = 64
    batch_size: int = 1
    batching: str = "static"  # or "continuous", on both sides
    output_lens: str = "fixed"  # or "reference" (realrun.output_lens)
    repeats: int = 1  # real runs per policy x cache cell (calibration.repeats)
    chunk_bytes: int = 1 << 20
    store: str = "auto"
    seed: int = 0
    out: str | None = None


@dataclass
class PreparedValidation:
    cfg: ValidateConfig
    profile: HardwareProfile
    model_ref: str
    spec: ModelSpec
    caches: list[int]
    devices: list[torch.device]
    link: Any  # realrun.copy_engine.LinkEmulation | None
    prompts: list[Any]  # realrun.prompting.PromptText
    max_prompt_tokens: int
    threads: int
    limits: list[int] = field(default_factory=list)  # per request; set once tokenized


@dataclass
class ValidationResult:
    """Per-run and per-request frames (real and simulated side by side) and the summary."""

    runs: pd.DataFrame
    requests: pd.DataFrame
    summary: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "runs": json.loads(self.runs.to_json(orient="records")),
            "files": self.files,
        }


# -- inputs ---------------------------------------------------------------------------------
def load_profile(ref: str) -> HardwareProfile:
    """A profile from a JSON path or a preset name (missing field, bad JSON, unknown
    schema version: InputError naming the file)."""
    from specs.presets import load_hardware

    return load_hardware(ref)


def check_profile(profile: HardwareProfile, ref: str, model: str, device: str) -> None:
    """InputError when ``profile`` was measured on another device or fitted for another model."""
    if profile.device != device:
        raise InputError(f"{ref}: profile measured on {profile.device}, not {device}")
    fitted = profile.compute.fitted_for_model
    if fitted is not None and fitted != model:
        raise InputError(f"{ref}: profile fitted for {fitted}, not {model}")


def default_cache_sizes(spec: ModelSpec) -> list[int]:
    """A quarter, half and three quarters of all experts (at least top-K, distinct)."""
    total = spec.total_experts
    sizes = {max(spec.top_k, round(total * f)) for f in (0.25, 0.5, 0.75)}
    return sorted(s for s in sizes if s < total) or [total]


def _link_of(profile: HardwareProfile) -> Any:
    from realrun.copy_engine import LinkEmulation

    lk = profile.link
    if profile.device != "cpu" or not lk.emulated:
        return None
    gbps = lk.emulated_gbps or lk.pinned_bandwidth_Bps / 1e9
    lat = lk.emulated_latency_us if lk.emulated_gbps is not None else lk.latency_s * 1e6
    return LinkEmulation(gbps, lat or 0.0)


def prepare_validation(cfg: ValidateConfig) -> PreparedValidation:
    """Check every input before any work; InputError names the first problem."""
    from policies.registry import policy_class
    from realrun.models import resolve_model
    from realrun.output_lens import check_output_lens
    from realrun.placement import budget_experts, resolve_devices
    from realrun.prompting import check_lengths, prompt_texts
    from realrun.runner import RunConfig, torch_threads
    from realrun.serving import check_batching
    from realrun.session import refuse_future_readers

    profile = load_profile(cfg.profile)
    device = cfg.device or profile.device
    model = cfg.model or profile.compute.fitted_for_model
    if model is None:
        raise InputError(
            f"{cfg.profile}: profile is not fitted for any model; give --model "
            "(or calibrate one with `fmoe calibrate bench`)"
        )
    spec, hf_config, _ = resolve_model(model)
    check_profile(profile, cfg.profile, spec.name, device)
    if not cfg.policies:
        raise InputError("--policies needs at least one policy")
    caches = list(cfg.cache_experts) if cfg.cache_experts else default_cache_sizes(spec)
    caches = [budget_experts(spec, c) for c in caches]
    for p in cfg.policies:
        cls = policy_class(p)
        refuse_future_readers(cls)
        small = [c for c in caches if c < spec.total_experts]
        if cls.preload_all and small:
            raise InputError(
                f"policy {p!r} keeps every expert resident: it needs a cache of "
                f"{spec.total_experts} experts, got {small[0]}"
            )
    devices = resolve_devices(device, profile.num_gpus)
    if min(caches) < len(devices):
        raise InputError(
            f"a cache of {min(caches)} experts leaves some of {len(devices)} devices with no slot"
        )
    if cfg.store not in ("auto", "ram", "file"):
        raise InputError(f"unknown --store {cfg.store!r} (known: auto, ram, file)")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.repeats < 1:
        raise InputError(f"--repeats must be >= 1, got {cfg.repeats}")
    check_batching(cfg.batching)
    max_prompt = check_lengths(hf_config, cfg.max_prompt_tokens, cfg.max_new_tokens)
    prompts = prompt_texts(cfg.prompts, None, cfg.num_prompts)
    check_output_lens(cfg.output_lens, prompts, explicit=False)
    threads = profile.compute.torch_threads or torch_threads(RunConfig(model=model, device=device))
    if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise InputError(f"--out {cfg.out}: exists and is not a directory")
    return PreparedValidation(
        cfg, profile, model, spec, caches, devices, _link_of(profile), prompts, max_prompt, threads
    )


# -- the work -------------------------------------------------------------------------------
def run_validation(cfg: ValidateConfig, progress: Progress | None = None) -> ValidationResult:
    """prepare + execute."""
    return execute_validation(prepare_validation(cfg), progress)


def execute_validation(
    prep: PreparedValidation, progress: Progress | None = None
) -> ValidationResult:
    """Capture, run real and simulated pairs, compute errors, write files (see module doc)."""
    before = torch.get_num_threads()
    torch.set_num_threads(prep.threads)
    try:
        return _execute(prep, progress if progress is not None else NullProgress())
    finally:
        torch.set_num_threads(before)


def _execute(prep: PreparedValidation, bar: Progress) -> ValidationResult:
    from calibration import sim_error
    from realrun.models import load
    from realrun.offload import offload_model
    from realrun.output_lens import new_token_limits
    from realrun.prompting import encode

    cfg, spec = prep.cfg, prep.spec
    load_start = load_average()
    # cache-major, so a slow phase of a shared machine does not land on one policy alone
    pairs = [(p, c) for c in prep.caches for p in cfg.policies]
    bar.reset(total=len(prep.prompts) * (1 + len(pairs) * cfg.repeats))
    bar.write(f"building {spec.name} and offloading its experts")
    loaded = load(prep.model_ref, seed=cfg.seed)
    with torch.no_grad():  # one-time kernel setup, as the real run does before offloading
        loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    om = offload_model(loaded, store=cfg.store, dense_device=prep.devices[0])
    prompts = encode(loaded.tokenizer, prep.prompts, prep.max_prompt_tokens)
    prep.limits = new_token_limits(
        loaded.tokenizer, prep.prompts, cfg.output_lens, cfg.max_new_tokens
    )
    run_rows, req_rows = [], []
    drift_runs, drift_reqs = [], []  # the simulator on compute scaled by the cell's slowdown
    reals: dict[tuple[str, int], list[RealRun]] = {pair: [] for pair in pairs}
    slowdowns: dict[tuple[str, int], list[float]] = {pair: [] for pair in pairs}
    try:
        workload, ref_sha = _capture(prep, om, prompts, bar)
        # repeats outermost: a cell's runs fall in different phases of a shared machine
        for _ in range(cfg.repeats):
            for pair in pairs:
                slowdown = _compute_slowdown(prep, om)
                if slowdown is not None:
                    slowdowns[pair].append(slowdown)
                reals[pair].append(_real_run(prep, om, prompts, *pair, bar))
        for policy, cache in pairs:
            runs_of = reals[(policy, cache)]
            real = median_run(runs_of)
            sim, sim_reqs = _sim_run(prep, workload, policy, cache)
            same = all(r.metrics["tokens_sha256"] == ref_sha for r in runs_of)
            row = _run_row(policy, cache, real.metrics, sim, same)
            sd = slowdowns[(policy, cache)]
            row["compute_slowdown"] = float(statistics.median(sd)) if sd else None
            for m in SPREAD_METRICS:
                row[f"real_{m.removesuffix('_s')}_spread"] = spread(runs_of, m)
            if sd:
                dsim, dreqs = _sim_run(prep, workload, policy, cache, row["compute_slowdown"])
                drift_runs.append(_run_row(policy, cache, real.metrics, dsim, same))
                drift_reqs += _request_rows(policy, cache, real.requests, dreqs)
                for k in DRIFT_COLUMNS:
                    row[f"sim_{k}_drift"] = dsim.get(k)
            run_rows.append(row)
            req_rows += _request_rows(policy, cache, real.requests, sim_reqs)
            bar.write(_pair_line(row))
    finally:
        om.close()
    runs = _in_table_order(pd.DataFrame(run_rows), cfg.policies)
    requests = _in_table_order(pd.DataFrame(req_rows), cfg.policies)
    sim_error.add_errors(requests, runs)
    summary = sim_error.summarise(requests, runs)
    summary.update(
        per_policy=sim_error.per_policy(requests, runs),
        profile=prep.profile.name,
        model=spec.name,
        device=prep.profile.device,
        emulated_link=prep.link.describe() if prep.link is not None else None,
        policies=cfg.policies,
        cache_experts=prep.caches,
        num_prompts=len(prompts),
        batch_size=cfg.batch_size,
        batching=cfg.batching,
        max_new_tokens=cfg.max_new_tokens,
        output_lens=cfg.output_lens,
        new_token_limits=prep.limits,
        repeats=cfg.repeats,
        # run-to-run spread of the real side, (max - min) / median over a cell's repeats,
        # the median over cells (None with one run): errors within it are noise
        real_tpot_spread_median=_median_or_none(runs["real_tpot_mean_spread"]),
        real_ttft_spread_median=_median_or_none(runs["real_ttft_mean_spread"]),
        # the simulator replays the capture's output lengths: true when they are the limits
        output_lens_match=bool((requests["output_len"] == requests["real_output_len"]).all()),
        torch_threads=prep.threads,
        mape_over="requests (every request of every run); *_run_means: over run means",
        routing_matches_capture=bool(runs["routing_matches_capture"].all()),
        compute_slowdown_median=float(runs["compute_slowdown"].median()),
        # the same errors with each cell's simulation on compute scaled by that cell's
        # measured slowdown: what remains once the machine's drift is taken out
        drift_corrected=_drift_corrected(drift_reqs, drift_runs, len(run_rows)),
        load_average=[load_start, load_average()],
    )
    result = ValidationResult(runs, requests, summary)
    if cfg.out:
        result.files = write_outputs(result, cfg.out, workload)
    return result


def _median_or_none(col: pd.Series) -> float | None:
    vals = col.dropna()
    return float(vals.median()) if len(vals) else None


def _request_rows(
    policy: str, cache: int, real: list[dict[str, Any]], sim: pd.DataFrame
) -> list[dict[str, Any]]:
    """One row per request: the real and simulated TTFT, TPOT and e2e side by side."""
    from calibration.sim_error import LATENCIES

    sim_by_id = sim.set_index("id")
    rows = []
    for r in real:
        s = sim_by_id.loc[r["id"]]
        rows.append(
            {
                "policy": policy,
                "cache_experts": cache,
                "request_id": r["id"],
                "prompt_len": int(s["prompt_len"]),
                "output_len": int(s["output_len"]),
                "real_output_len": r["output_len"],
                **{f"real_{m}_s": r[m] for m in LATENCIES},
                **{f"sim_{m}_s": float(s[f"{m}_s"]) for m in LATENCIES},
            }
        )
    return rows


def _in_table_order(df: pd.DataFrame, policies: list[str]) -> pd.DataFrame:
    """Rows by policy (in the order given), then cache size; stable within."""
    rank = {p: i for i, p in enumerate(policies)}
    df = df.assign(_rank=df["policy"].map(rank))
    df = df.sort_values(["_rank", "cache_experts"], kind="stable")
    return df.drop(columns="_rank").reset_index(drop=True)


def _capture(prep: PreparedValidation, om: Any, prompts: list[Any], bar: Progress):
    """The workload every run shares: the prompts with every expert resident, recorded."""
    from policies.registry import make_policy
    from realrun.capture import make_workload
    from realrun.metrics import tokens_sha256
    from realrun.session import RunSession, SessionOptions

    opts = SessionOptions(None, prep.devices, None, prep.cfg.chunk_bytes, record=True)
    with RunSession(om, make_policy(CAPTURE_POLICY), opts) as s:
        _serve(s, prompts, prep, bar)
        assert s.recorder is not None
        requests, gens = s.recorder.requests, s.generations
    w = make_workload(prep.spec, requests, prep.cfg.seed, source="calibration.validate capture")
    return w, tokens_sha256(gens)


def _real_run(
    prep: PreparedValidation, om: Any, prompts: list[Any], policy: str, cache: int, bar: Progress
) -> RealRun:
    from policies.registry import make_policy
    from realrun.session import RunSession, SessionOptions

    opts = SessionOptions(cache, prep.devices, prep.link, prep.cfg.chunk_bytes, seed=prep.cfg.seed)
    with RunSession(om, make_policy(policy), opts) as s:
        _prefault_slots(s)
        _serve(s, prompts, prep, bar)
        metrics = s.metrics()
        reqs = [
            {
                "id": g.request_id,
                "ttft": g.ttft_s,
                "tpot": g.tpot_s,
                "e2e": g.e2e_s,
                "output_len": len(g.output_ids),
            }
            for g in s.generations
        ]
    return RealRun(metrics, reqs)


def _serve(session: Any, prompts: list[Any], prep: PreparedValidation, bar: Progress) -> None:
    """The prompts under the validation's batching and token limits, in order (as `fmoe run`)."""
    session.serve(
        prompts,
        prep.limits,
        prep.cfg.batch_size,
        prep.cfg.batching,
        on_done=lambda _p, _g: bar.update(1),
    )


PROBE_PROMPT, PROBE_TOKENS = 16, 8


def _compute_slowdown(prep: PreparedValidation, om: Any) -> float | None:
    """Measured / profiled time of the model's decode steps without experts, just before a
    real run: how much slower compute is now than when the profile was measured (other
    processes on a shared machine). A diagnostic column, never applied to the simulator.
    None when the profile has no fitted dense and head costs."""
    from calibration.bench_compute import zero_experts
    from realrun.generate import greedy_generate

    c, spec = prep.profile.compute, prep.spec
    if c.dense is None or c.head is None:
        return None
    ids = list(range(1, PROBE_PROMPT + 1))
    with zero_experts(om):
        g = greedy_generate(om.loaded.model, "probe", ids, PROBE_TOKENS)
    predicted = [
        c.head(1) + spec.num_layers * c.dense(1, PROBE_PROMPT + i + 1)
        for i in range(len(g.decode_s))
    ]
    ratios = [m / p for m, p in zip(g.decode_s, predicted, strict=True) if p > 0]
    return float(statistics.median(ratios)) if ratios else None


def _prefault_slots(session: Any) -> None:
    """Touch every slot page before the timed run. A new slot pool is untouched memory, so
    the first copy into each slot also takes the kernel's page faults (measured here: 25
    to 80 ms instead of 25 ms for a 50 MB expert at 2 GB/s), which no device has and the
    simulator does not model; the bench times copies into reused buffers likewise."""
    for d in session.res.devs:
        d.pool.rows.fill_(0)


def _sim_run(
    prep: PreparedValidation, workload: Any, policy: str, cache: int, slowdown: float = 1.0
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The simulator on the captured trace; with ``slowdown`` != 1 on the profile's
    compute scaled by it (:meth:`ComputeModel.scaled`)."""
    from sim.config import SimConfig
    from sim.run import simulate

    profile = prep.profile
    if slowdown != 1.0:
        profile = profile.model_copy(update={"compute": profile.compute.scaled(slowdown)})
    cfg = SimConfig(
        model=prep.spec,
        hardware=profile,
        policy=policy,
        cache_experts=cache,
        batch_size=prep.cfg.batch_size,
        batching=prep.cfg.batching,
        arrivals="closed",
        chunk_bytes=prep.cfg.chunk_bytes,
        seed=prep.cfg.seed,
    )
    res = simulate(workload, cfg)
    return res.metrics, res.requests


DRIFT_COLUMNS = ["ttft_mean_s", "tpot_mean_s", "hit_rate"]
"""Simulated figures of each cell also reported on drift-corrected compute (``sim_<k>_drift``)."""
DRIFT_SUMMARY = ["ttft_mape", "tpot_mape", "e2e_mape", "hit_rate_abs_error_max",
                 "hit_rate_abs_error_mean"]  # fmt: skip


def _drift_corrected(
    req_rows: list[dict[str, Any]], run_rows: list[dict[str, Any]], cells: int
) -> dict[str, Any] | None:
    """The headline errors of the drift-corrected simulations; None unless every cell had
    a slowdown measured (a profile without dense and head fits has none)."""
    from calibration import sim_error

    if not run_rows or len(run_rows) != cells:
        return None
    requests, runs = pd.DataFrame(req_rows), pd.DataFrame(run_rows)
    sim_error.add_errors(requests, runs)
    errors = sim_error.summarise(requests, runs)
    return {k: errors[k] for k in DRIFT_SUMMARY}


RUN_METRICS = ["ttft_mean_s", "tpot_mean_s", "e2e_mean_s", "hit_rate", "stall_s", "bytes_h2d"]
# cache counters side by side: where a hit-rate gap comes from (late or wasted prefetches)
RUN_COUNTERS = ["demand_loads", "prefetches_issued", "prefetches_used", "prefetches_wasted",
                "prefetches_cancelled", "evictions"]  # fmt: skip


def _run_row(
    policy: str, cache: int, real: dict[str, Any], sim: dict[str, Any], same_routing: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {"policy": policy, "cache_experts": cache}
    for k in RUN_METRICS + RUN_COUNTERS:
        row[f"real_{k}"] = real.get(k)
        row[f"sim_{k}"] = sim.get(k)
    n = real["requests"]
    row["real_e2e_total_s"] = (real["e2e_mean_s"] or 0.0) * n
    row["sim_e2e_total_s"] = (sim["e2e_mean_s"] or 0.0) * n
    row["routing_matches_capture"] = same_routing
    return row


def _pair_line(row: dict[str, Any]) -> str:
    def pair(k: str) -> str:
        return f"{row[f'real_{k}']:.4g}/{row[f'sim_{k}']:.4g}"

    return (
        f"{row['policy']} cache {row['cache_experts']}: real/sim ttft {pair('ttft_mean_s')} s, "
        f"tpot {pair('tpot_mean_s')} s, hit {pair('hit_rate')}, stall {pair('stall_s')} s"
    )


def write_outputs(
    result: ValidationResult, out: str | Path, workload: Any | None = None
) -> dict[str, str]:
    """runs.csv, requests.csv, summary.json, sim_vs_real.png and, given the captured
    ``workload``, captured.fmoe (to re-simulate without the model) under ``out``; every
    file is written atomically."""
    from calibration.validate_plot import plot_sim_vs_real

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "runs_csv": str(d / "runs.csv"),
        "requests_csv": str(d / "requests.csv"),
        "summary_json": str(d / "summary.json"),
        "plot_png": str(d / "sim_vs_real.png"),
    }
    _write_csv(result.runs, Path(files["runs_csv"]))
    _write_csv(result.requests, Path(files["requests_csv"]))
    write_json_atomic(files["summary_json"], result.summary)
    s = result.summary
    title = f"{s['model']} on {s['profile']}: simulated vs measured"
    plot_sim_vs_real(result.requests, result.runs, files["plot_png"], title)
    if workload is not None:
        from realrun.capture import write_workload

        files["trace"] = str(d / "captured.fmoe")
        write_workload(workload, files["trace"])
    return files


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
