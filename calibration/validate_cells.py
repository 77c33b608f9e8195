"""`fmoe calibrate validate`, one cell's runs: the capture every run shares, a real run
under a policy and cache size, the compute-slowdown probe taken before it, and the
simulator on the captured trace (with the profile's compute optionally scaled by the
cell's slowdown: the drift correction)."""

from __future__ import annotations

import statistics
from typing import Any

import pandas as pd

from calibration.bench import Progress
from calibration.repeats import RealRun
from calibration.validate_config import CAPTURE_POLICY, PreparedValidation


def capture(
    prep: PreparedValidation, om: Any, prompts: list[Any], bar: Progress
) -> tuple[Any, str]:
    """The workload every run shares: the prompts with every expert resident, recorded.
    Returns the captured workload and the sha256 of its generated tokens (every real run
    must produce the same, or it routed differently)."""
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


def real_run(
    prep: PreparedValidation, om: Any, prompts: list[Any], policy: str, cache: int, bar: Progress
) -> RealRun:
    """One real run of the prompts under ``policy`` with ``cache`` experts (cold cache, the
    profile's link emulation): the run's metrics and per-request TTFT, TPOT, e2e, length."""
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


def compute_slowdown(prep: PreparedValidation, om: Any) -> float | None:
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


def sim_run(
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
