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

import statistics

import pandas as pd
import torch

from calibration.bench import NullProgress, Progress
from calibration.repeats import SPREAD_METRICS, RealRun, median_run, spread
from calibration.stopwatch import load_average
from calibration.validate_cells import capture, compute_slowdown, real_run, sim_run
from calibration.validate_config import (
    CAPTURE_POLICY,
    DEFAULT_POLICIES,
    PreparedValidation,
    ValidateConfig,
    check_profile,
    default_cache_sizes,
    load_profile,
    prepare_validation,
)
from calibration.validate_report import (
    DRIFT_COLUMNS,
    DRIFT_SUMMARY,
    RUN_COUNTERS,
    RUN_METRICS,
    ValidationResult,
    drift_corrected,
    in_table_order,
    median_or_none,
    pair_line,
    request_rows,
    run_row,
    write_outputs,
)

__all__ = [
    "CAPTURE_POLICY",
    "DEFAULT_POLICIES",
    "DRIFT_COLUMNS",
    "DRIFT_SUMMARY",
    "RUN_COUNTERS",
    "RUN_METRICS",
    "PreparedValidation",
    "ValidateConfig",
    "ValidationResult",
    "check_profile",
    "default_cache_sizes",
    "execute_validation",
    "load_profile",
    "prepare_validation",
    "run_validation",
    "write_outputs",
]


def run_validation(cfg: ValidateConfig, progress: Progress | None = None) -> ValidationResult:
    """prepare + execute."""
    return execute_validation(prepare_validation(cfg), progress)


def execute_validation(
    prep: PreparedValidation, progress: Progress | None = None
) -> ValidationResult:
    """Capture, run real and simulated pairs, compute errors, write files (see module doc)."""
    from realrun.runner import threads_set

    with threads_set(prep.threads):
        return _execute(prep, progress if progress is not None else NullProgress())


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
        workload, ref_sha = capture(prep, om, prompts, bar)
        # repeats outermost: a cell's runs fall in different phases of a shared machine
        for _ in range(cfg.repeats):
            for pair in pairs:
                slowdown = compute_slowdown(prep, om)
                if slowdown is not None:
                    slowdowns[pair].append(slowdown)
                reals[pair].append(real_run(prep, om, prompts, *pair, bar))
        for policy, cache in pairs:
            runs_of = reals[(policy, cache)]
            real = median_run(runs_of)
            sim, sim_reqs = sim_run(prep, workload, policy, cache)
            same = all(r.metrics["tokens_sha256"] == ref_sha for r in runs_of)
            row = run_row(policy, cache, real.metrics, sim, same)
            sd = slowdowns[(policy, cache)]
            row["compute_slowdown"] = float(statistics.median(sd)) if sd else None
            for m in SPREAD_METRICS:
                row[f"real_{m.removesuffix('_s')}_spread"] = spread(runs_of, m)
            if sd:
                dsim, dreqs = sim_run(prep, workload, policy, cache, row["compute_slowdown"])
                drift_runs.append(run_row(policy, cache, real.metrics, dsim, same))
                drift_reqs += request_rows(policy, cache, real.requests, dreqs)
                for k in DRIFT_COLUMNS:
                    row[f"sim_{k}_drift"] = dsim.get(k)
            run_rows.append(row)
            req_rows += request_rows(policy, cache, real.requests, sim_reqs)
            bar.write(pair_line(row))
    finally:
        om.close()
    runs = in_table_order(pd.DataFrame(run_rows), cfg.policies)
    requests = in_table_order(pd.DataFrame(req_rows), cfg.policies)
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
        real_tpot_spread_median=median_or_none(runs["real_tpot_mean_spread"]),
        real_ttft_spread_median=median_or_none(runs["real_ttft_mean_spread"]),
        # the simulator replays the capture's output lengths: true when they are the limits
        output_lens_match=bool((requests["output_len"] == requests["real_output_len"]).all()),
        torch_threads=prep.threads,
        mape_over="requests (every request of every run); *_run_means: over run means",
        routing_matches_capture=bool(runs["routing_matches_capture"].all()),
        compute_slowdown_median=float(runs["compute_slowdown"].median()),
        # the same errors with each cell's simulation on compute scaled by that cell's
        # measured slowdown: what remains once the machine's drift is taken out
        drift_corrected=drift_corrected(drift_reqs, drift_runs, len(run_rows)),
        load_average=[load_start, load_average()],
    )
    result = ValidationResult(runs, requests, summary)
    if cfg.out:
        result.files = write_outputs(result, cfg.out, workload)
    return result
