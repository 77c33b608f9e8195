"""A batched decode point: what a B-row decode step costs beyond a profile's fitted terms.

A diagnostic, not part of `fmoe calibrate bench`: the profile's compute fits come from one
sequence (experts on ``n`` tokens routed alike, dense layers on one sequence's tokens,
the executor's overhead from batch-1 sessions), and batched validation under-predicts
TPOT at batch size 4. :func:`measure_batched_decode` times, in the same round, a 1-row
and a B-row decode of a real session with every expert resident (no copies), with the
routing each step saw; :func:`batch_residuals` compares both with the profile's
prediction of the same steps (:func:`predicted_step_s`). Run
``python -m calibration.bench_batch --profile P.json`` for per-round figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calibration.stopwatch import Tick, _no_tick
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec


@dataclass(frozen=True)
class DecodeStep:
    """One decode step of ``rows`` sequences (one row each) at mean KV length ``context``:
    ``seconds`` of wall time, ``counts[l]`` the rows routed to each expert used in MoE
    layer ``l`` (sorted, nonzero)."""

    rows: int
    context: float
    seconds: float
    counts: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class BatchRound:
    """One round: the decode steps of a 1-row session and of a ``batch``-row one."""

    single: list[DecodeStep]
    batched: list[DecodeStep]


def predicted_step_s(hw: HardwareProfile, spec: ModelSpec, policy: str, step: DecodeStep) -> float:
    """The simulator's compute time of ``step`` with every expert resident (what
    sim.engine adds up for a decode iteration): head, every decoder layer's dense part,
    the MoE layers' executor overhead and the expert calls of the routing it saw."""
    from specs import costs

    c = hw.compute
    t = costs.head_time_s(hw, spec, step.rows)
    t += spec.num_layers * costs.dense_layer_time_s(hw, spec, step.rows, step.context)  # type: ignore[arg-type]
    t += spec.num_moe_layers * c.layer_overhead(policy, step.rows)
    return t + sum(costs.expert_time_s(hw, spec, n) for layer in step.counts for n in layer)


def batch_residuals(
    hw: HardwareProfile, spec: ModelSpec, policy: str, rounds: Sequence[BatchRound]
) -> tuple[float, list[float]]:
    """(seconds per MoE layer step and decode row beyond the first, per-round values):
    what a per-row term would have to add for the profile to predict the batched steps.

    Per round: the batched steps' mean residual (measured minus :func:`predicted_step_s`)
    less the single steps' mean residual (what the fits miss at one row, already in
    their terms), over ``(B - 1) * MoE layers``. The result is the median over rounds if it
    stands out of their spread (above two standard errors of the median), else 0; never
    negative. Rounds whose batch has one row are ignored."""
    from calibration.bench_compute import median_standard_error

    per_round = []
    for r in rounds:
        if not r.single or not r.batched or r.batched[0].rows < 2:
            continue
        res = [
            statistics.fmean(s.seconds - predicted_step_s(hw, spec, policy, s) for s in steps)
            for steps in (r.single, r.batched)
        ]
        rows = r.batched[0].rows
        per_round.append((res[1] - res[0]) / ((rows - 1) * spec.num_moe_layers))
    if not per_round:
        return 0.0, per_round
    med = statistics.median(per_round)
    keep = med > 2 * median_standard_error(per_round)
    return (max(0.0, med) if keep else 0.0), per_round


class _RoutingLog:
    """Rows per expert of every MoE layer call, in call order (a forward hook's target)."""

    def __init__(self, num_experts: int) -> None:
        self.E = num_experts
        self.calls: list[tuple[int, ...]] = []

    def hook(self, mod: torch.nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        idx = args[1] if len(args) >= 2 else kwargs["top_k_index"]
        ids = idx.detach().cpu().numpy().reshape(-1)
        cnt = np.bincount(ids[ids < self.E], minlength=self.E)
        self.calls.append(tuple(sorted(int(n) for n in cnt if n > 0)))


def measure_batched_decode(
    om,  # realrun.offload.OffloadedModel
    devices: Sequence[torch.device],
    policy_name: str,
    batch: int,
    prompt_tokens: int,
    new_tokens: int,
    rounds: int,
    tick: Tick = _no_tick,
    seed: int = 0,
) -> list[BatchRound]:
    """Per round (after an unmeasured one), a session of ``policy_name`` with every expert
    resident serves one random prompt alone, then ``batch`` of them as a static batch
    (``prompt_tokens`` each, so no padding), ``new_tokens`` tokens; their decode steps with
    the routing each saw. ``batch >= 2``, ``new_tokens >= 2``."""
    from calibration.bench_compute import resident_session
    from realrun.prompting import Prompt

    if batch < 2 or new_tokens < 2:
        raise ValueError("measure_batched_decode needs batch >= 2 and new_tokens >= 2")
    spec = om.loaded.spec
    gen = torch.Generator().manual_seed(seed + 1)
    vocab = om.loaded.model.get_input_embeddings().num_embeddings
    log = _RoutingLog(spec.num_experts)
    handles = [m.register_forward_hook(log.hook, with_kwargs=True) for m in om.modules]
    prompt: Callable[[], list[int]] = lambda: torch.randint(  # noqa: E731
        0, vocab, (prompt_tokens,), generator=gen
    ).tolist()
    out: list[BatchRound] = []
    try:
        for r in range(rounds + 1):  # round 0 warms up
            sides = []
            with resident_session(om, devices, policy_name, seed) as s:
                s.generate(f"bwarm{r}", prompt(), 2)
                for rows in (1, batch):
                    reqs = [Prompt(f"b{r}_{rows}_{i}", prompt()) for i in range(rows)]
                    log.calls.clear()
                    g = s.generate_batch(reqs, new_tokens)[0]
                    sides.append(_steps(g.decode_s, log.calls, rows, prompt_tokens, spec))
            tick(1)
            if r:
                out.append(BatchRound(*sides))
    finally:
        for h in handles:
            h.remove()
    return out


def _steps(
    decode_s: list[float], calls: list[tuple[int, ...]], rows: int, prompt: int, spec: ModelSpec
) -> list[DecodeStep]:
    """Decode step k (1-based) of prompts of ``prompt`` tokens: KV length prompt + k, as
    the simulator counts it; its MoE layer calls follow the prefill's."""
    L = spec.num_moe_layers
    return [
        DecodeStep(rows, float(prompt + k), dt, tuple(calls[k * L : (k + 1) * L]))
        for k, dt in enumerate(decode_s, start=1)
    ]


def main(argv: list[str] | None = None) -> int:
    """Measure and print per-round step times, predictions and residuals for a profile."""
    import argparse

    from realrun.models import load
    from realrun.offload import offload_model

    ap = argparse.ArgumentParser(prog="python -m calibration.bench_batch")
    ap.add_argument("--profile", required=True, help="calibrated profile JSON")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (as the bench)")
    a = ap.parse_args(argv)
    hw = HardwareProfile.from_json(a.profile)
    model = hw.compute.fitted_for_model
    if model is None:
        raise SystemExit("the profile names no model (not calibrated)")
    torch.set_num_threads(a.threads)
    loaded = load(model, seed=0)
    with torch.no_grad():  # one-time kernel setup, as the bench does
        loaded.model(input_ids=torch.tensor([[0, 1]]), logits_to_keep=1)
    om = offload_model(loaded, store="auto", dense_device=hw.device)
    try:
        dev = [torch.device(hw.device)]
        rounds = measure_batched_decode(
            om, dev, a.policy, a.batch, a.prompt_tokens, a.new_tokens, a.rounds
        )
    finally:
        om.close()
    spec = loaded.spec
    for i, r in enumerate(rounds):
        figs = []
        for steps in (r.single, r.batched):
            real = statistics.fmean(s.seconds for s in steps)
            pred = statistics.fmean(predicted_step_s(hw, spec, a.policy, s) for s in steps)
            figs.append(
                f"{steps[0].rows} rows: real {real * 1e3:.2f} ms, predicted {pred * 1e3:.2f} ms"
            )
        print(f"round {i + 1}: " + "; ".join(figs))
    kept, per_round = batch_residuals(hw, spec, a.policy, rounds)
    print("per row and MoE layer step, per round (ms):", [round(x * 1e3, 3) for x in per_round])
    print(f"median kept if significant: {kept * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
