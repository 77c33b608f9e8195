"""Bounds for a simulated run: Belady's MIN hit rate and a TPOT floor (docs/bounds.md).

Both come from the workload and the config alone (the run's demand sequence is the
trace's routing in the batch schedule, which no policy changes), so they sit beside every
policy's figures in one table.

- ``bound_hit_belady``: the hit rate of MIN (Belady) on the run's demand sequence with the
  run's cache: the same slots per GPU, each GPU caching the experts the placement puts on
  it (global scope per device), the experts of one layer step pinned together, the same
  start (empty, or the warm-start / preload contents). MIN loads only on demand, so this
  is the most hits any policy that loads only on demand can get; a policy that prefetches
  may exceed it (a prefetched expert is a hit that still cost a copy). What binds every
  policy is the loads: ``bound_loads_min`` (MIN's misses) is the fewest copies any
  schedule can make, so ``loads >= bound_loads_min`` (tested wherever the cache holds a
  whole layer step; with waves MIN's choices inside a step are checked only against the
  brute force of the model, not against the simulator's wave order).
- ``bound_tpot_s``: a floor on the mean TPOT. For each request, its decode (from its first
  token to its last) takes at least (a) the compute of those iterations on the
  simulator's cost model with no stall, no executor overhead and no copy interference,
  and at least (b) the time the links need for the fewest copies that must land inside
  that window: MIN's misses over the window from the best possible cache contents at its
  start (any ``capacity`` experts, free), each copy at the link's full bandwidth with no
  latency, every link in parallel, and under the host-side cap when the profile has one.
  Compute and copies may overlap perfectly, so the floor is max(a, b) per request,
  divided by its ``output_len - 1`` and averaged as ``tpot_mean_s`` is.

Schedules: the batch schedule is replayed from the config (FCFS, the run's batcher) when
it does not depend on time: batch size 1, closed-loop arrivals, static batching, or a
served trace's recorded admissions (``arrivals="schedule"``). With
continuous batching of several requests on trace arrivals, who shares an iteration
depends on timing and so on the policy: the bounds are then None (``bound_note`` says so).

Large runs compute the same numbers through a temporary file, in memory that does not
grow with the run (:mod:`sim.bounds_stream`, see :func:`run_bounds`); this module holds
the in-memory path and the parts both share (the schedule replay, the compute model).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.batching import make_batcher, schedule_batcher
from sim.config import SimConfig
from sim.timing import Timing
from traces.cachesim import min_run
from traces.demand import (
    JIT_MIN_DEMANDS,
    DemandSequence,
    Schedule,
    demand_sequence,
    next_use,
)
from traces.types import Request, Workload

BOUND_KEYS = ("bound_hit_belady", "bound_loads_min", "bound_tpot_s")


def no_bounds(note: str) -> dict[str, Any]:
    """The bound keys, None, with ``bound_note`` saying why they were not computed."""
    return {**dict.fromkeys(BOUND_KEYS), "bound_note": note}


# From this many demands (an upper bound from the request lengths) on, the bounds run
# through a temporary file (sim/bounds_stream.py): memory no longer grows with the run.
# Below it the whole sequence is a few MB and the in-memory path skips numba's import.
SPILL_MIN_DEMANDS = JIT_MIN_DEMANDS
MEMO_ENTRIES = 1 << 16  # compute-time memo entries kept (a pure function: clearing is safe)


@dataclass(frozen=True)
class RunPlan:
    """The iterations a run makes. ``order``: request indices by first iteration;
    ``first_iteration[i]``: request i's first iteration; ``schedule``: the iterations
    (request index, rows), None for a one-request-at-a-time plan (built on demand there)."""

    order: list[int]
    first_iteration: list[int]
    schedule: Schedule | None


def timing_free(workload: Workload, config: SimConfig, closed: bool) -> bool:
    """Whether the batch schedule can be replayed without timing (see the module doc)."""
    return (
        config.batch_size == 1
        or closed
        or config.arrivals == "schedule"
        or config.batching == "static"
    )


def _fcfs_order(workload: Workload, config: SimConfig, closed: bool) -> list[int]:
    reqs = workload.requests
    if closed or config.arrivals == "schedule":
        return list(range(len(reqs)))
    return sorted(range(len(reqs)), key=lambda i: (reqs[i].arrival_s, i))


def one_at_a_time(config: SimConfig) -> bool:
    """Whether the plan runs one request at a time (no schedule to replay)."""
    return config.batch_size == 1 and config.arrivals != "schedule"


def replay_schedule(
    workload: Workload, config: SimConfig, closed: bool, first: list[int] | np.ndarray
) -> Iterator[list[tuple[int, slice]]]:
    """The replayed batcher's iterations, one at a time (request index, rows); sets
    ``first[i]`` to request i's first iteration when it is admitted. Contract: the
    schedule is timing free (:func:`timing_free`)."""
    reqs = workload.requests
    count = 0
    batcher = (
        schedule_batcher(workload, lambda: count)
        if config.arrivals == "schedule"
        else make_batcher(config.batching, config.batch_size)
    )
    waiting = list(reversed(_fcfs_order(workload, config, closed)))
    running: list[list[int]] = []  # [request index, next iteration]
    while waiting or running:
        for _ in range(batcher.admit(len(waiting), len(running), False)):
            i = waiting.pop()
            first[i] = count
            running.append([i, 0])
        if not running:  # cannot happen with these batchers; guards the loop
            raise RuntimeError("batcher admitted nothing with nothing running")
        yield [(i, reqs[i].iteration_rows(it)) for i, it in running]
        count += 1
        for s in running:
            s[1] += 1
        running = [s for s in running if s[1] < reqs[s[0]].num_iterations]


def plan_iterations(workload: Workload, config: SimConfig, closed: bool) -> RunPlan | None:
    """Replay the batcher (see the module doc); None when the schedule depends on time.

    ``--arrivals schedule`` (a served trace's own admissions) replays
    :class:`sim.batching.ScheduleBatcher`, which counts iterations, not seconds."""
    if not timing_free(workload, config, closed):
        return None
    reqs = workload.requests
    first = [0] * len(reqs)
    if one_at_a_time(config):  # one at a time, FCFS, with either batcher
        order = _fcfs_order(workload, config, closed)
        n = 0
        for i in order:
            first[i] = n
            n += reqs[i].num_iterations
        return RunPlan(order, first, None)
    schedule = list(replay_schedule(workload, config, closed, first))
    order = sorted(range(len(reqs)), key=lambda i: first[i])
    return RunPlan(order, first, schedule)


def demand_sequence_for(workload: Workload, plan: RunPlan) -> DemandSequence:
    """The run's demand sequence under ``plan``: L steps per iteration, in iteration then
    layer order, so iteration i's steps are ``i * L .. (i + 1) * L - 1``."""
    if plan.schedule is None:  # the fast path: one request at a time, in the plan's order
        return demand_sequence(Workload(workload.spec, [workload.requests[i] for i in plan.order]))
    return demand_sequence(workload, plan.schedule)


class Compute:
    """Compute time of an iteration with every expert resident: the engine's arithmetic
    without executor overhead, copy interference or stalls (memoised by shape)."""

    def __init__(self, timing: Timing, workload: Workload, num_gpus: int) -> None:
        spec = workload.spec
        self.timing, self.spec, self.n = timing, spec, num_gpus
        L, J = spec.num_moe_layers, spec.num_experts
        self.off = (np.arange(L, dtype=np.int64) * J)[None, :, None]
        self.dev_of = np.arange(L * J) % num_gpus
        self.lay_of = np.arange(L * J) // J
        stages = [i * num_gpus // spec.num_layers for i in range(spec.num_layers)]
        self.handoffs = sum(a != b for a, b in zip(stages, stages[1:], strict=False))
        self._dense: dict[tuple[int, float], float] = {}
        self._fixed: dict[tuple[int, int], float] = {}

    def rest(self, rows: int, nreq: int, context: float) -> float:
        """Everything but the routed experts: head, hand-offs, dense layers, exchanges."""
        t = self.timing
        key = (rows, context)
        d = self._dense.get(key)
        if d is None:
            if len(self._dense) >= MEMO_ENTRIES:  # batched contexts rarely repeat: stay bounded
                self._dense.clear()
            d = self._dense[key] = self.spec.num_layers * t.dense(rows, context)
        f = self._fixed.get((rows, nreq))
        if f is None:
            hand = self.handoffs * t.handoff(rows) if self.n > 1 else 0.0
            f = t.head(nreq) + hand + self.spec.num_moe_layers * t.exchange(rows)
            self._fixed[(rows, nreq)] = f
        return d + f

    def experts(self, ids: np.ndarray) -> float:
        """Routed experts of one iteration's rows [R, L, K]: per layer the slowest GPU."""
        L, n = self.spec.num_moe_layers, self.n
        keys = ids.astype(np.int64) + self.off
        tok = np.bincount(keys.ravel(), minlength=self.dev_of.size)
        nz = np.flatnonzero(tok)
        counts, inv = np.unique(tok[nz], return_inverse=True)  # few distinct token counts
        t = np.array([self.timing.expert(int(c)) for c in counts])[inv]
        per = np.zeros((L, n))
        np.add.at(per, (self.lay_of[nz], self.dev_of[nz]), t)
        return float(per.max(axis=1).sum())

    def single_rows(self, ids: np.ndarray) -> np.ndarray:
        """Routed experts of one-row iterations, rows [M, L, K] at once: per layer, the
        GPU with the most of the row's experts, each over one token."""
        dev = (ids.astype(np.int64) + self.off) % self.n
        counts = (dev[..., None] == np.arange(self.n)).sum(axis=2)  # [M, L, n]
        return counts.max(axis=2).sum(axis=1) * self.timing.expert(1)


def request_compute(comp: Compute, req: Request) -> np.ndarray:
    """Compute time of each iteration of ``req`` run alone (prefill, then each decode)."""
    p, ids = req.prompt_len, req.routing.topk_ids
    pre = comp.rest(p, 1, (p + 1) / 2) + comp.experts(ids[:p])
    dec = comp.single_rows(ids[p:]) if ids.shape[0] > p else np.zeros(0)
    dec = dec + np.array([comp.rest(1, 1, float(c)) for c in range(p + 1, ids.shape[0] + 1)])
    return np.concatenate([[pre], dec])


def batch_compute(comp: Compute, reqs: list[Request], it: list[tuple[int, slice]]) -> float:
    """Compute time of one iteration of several requests' rows."""
    rows, ctx = 0, 0.0
    for _, sl in it:
        rows += sl.stop - sl.start
        ctx += sl.stop * (sl.stop + 1) / 2 if sl.start == 0 else sl.stop
    parts = [reqs[i].routing.topk_ids[sl] for i, sl in it]
    ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return comp.rest(rows, len(it), ctx / rows) + comp.experts(ids)


def _iteration_compute(comp: Compute, workload: Workload, plan: RunPlan) -> np.ndarray:
    """Compute time of each iteration of ``plan``, in iteration order."""
    reqs = workload.requests
    if plan.schedule is None:
        parts = [request_compute(comp, reqs[i]) for i in plan.order]
        return np.concatenate(parts) if parts else np.zeros(0)
    out = np.empty(len(plan.schedule))
    for idx, it in enumerate(plan.schedule):
        out[idx] = batch_compute(comp, reqs, it)
    return out


def _tpot_floor(
    workload: Workload,
    config: SimConfig,
    plan: RunPlan,
    per_device: list[tuple[DemandSequence, np.ndarray, int]],
    jit: bool,
) -> float | None:
    """Mean over requests with output_len > 1 of their decode floor / (output_len - 1)
    (``jit``: numba for the windows' MIN, see :func:`traces.cachesim.min_run`)."""
    spec, hw = config.model, config.hardware
    timing = Timing(hw, spec, config.pinned)
    comp = _iteration_compute(Compute(timing, workload, hw.num_gpus), workload, plan)
    csum = np.concatenate([[0.0], np.cumsum(comp)])
    L = spec.num_moe_layers
    eb = spec.expert_bytes
    cap_Bps = hw.host_bandwidth_cap_Bps
    floors = []
    for i, req in enumerate(workload.requests):
        out = req.output_len
        if out < 2:
            continue
        a, b = plan.first_iteration[i] + 1, plan.first_iteration[i] + out  # decode iterations
        compute = csum[b] - csum[a]
        loads = [
            min_run(seq, c, nxt=nxt, steps=(a * L, b * L), free_start=True, jit=jit)[1]
            for seq, nxt, c in per_device
        ]
        link = max(n * eb / timing.bandwidth_Bps for n in loads)
        if cap_Bps:
            link = max(link, sum(loads) * eb / cap_Bps)
        floors.append(max(compute, link) / (out - 1))
    return float(np.mean(floors)) if floors else None


def run_bounds(
    workload: Workload,
    config: SimConfig,
    capacities: list[int],
    closed: bool,
    initial: list[list[tuple[int, int]]] | None = None,
    *,
    spill: bool | None = None,
) -> dict[str, Any]:
    """The bound metrics of a run (see the module doc) and ``bound_wall_s``.

    ``capacities``: expert slots per GPU, as the run's caches; ``initial``: the keys each
    GPU's cache holds at the start (warm start or preload), else empty; ``closed``:
    whether requests are served closed loop. Keys: ``bound_hit_belady``,
    ``bound_loads_min``, ``bound_tpot_s`` (None when the schedule depends on time, with
    ``bound_note`` saying why). ``spill``: compute them through a temporary file in
    memory independent of the run's length (:mod:`sim.bounds_stream`), or in memory;
    by default through the file from ``SPILL_MIN_DEMANDS`` demands on (an upper bound
    from the request lengths). Both give the same numbers.
    """
    t0 = time.perf_counter()
    if not timing_free(workload, config, closed):
        return {
            **no_bounds("continuous batching on trace arrivals: the schedule depends on timing"),
            "bound_wall_s": time.perf_counter() - t0,
        }
    if spill is None:
        from sim.bounds_stream import spill_sizes

        spill = spill_sizes(workload)[0] >= SPILL_MIN_DEMANDS
    if spill:
        from sim.bounds_stream import stream_bounds

        order = _fcfs_order(workload, config, closed)
        out = stream_bounds(workload, config, capacities, closed, initial, order)
        return {**out, "bound_wall_s": time.perf_counter() - t0}
    plan = plan_iterations(workload, config, closed)
    assert plan is not None  # timing free
    spec = config.model
    J, n = spec.num_experts, len(capacities)
    seq = demand_sequence_for(workload, plan)
    jit = seq.num_demands >= JIT_MIN_DEMANDS  # numba for every pass once the run is large
    hits = demands = loads = 0
    per_device = []
    for d, cap in enumerate(capacities):
        sub = seq.for_device(d, n)
        nxt = next_use(sub)
        init = None
        if initial is not None and initial[d]:
            init = np.array([lay * J + e for lay, e in initial[d]], dtype=np.int64)
        h, m = min_run(sub, cap, nxt=nxt, initial=init, jit=jit)
        hits, demands, loads = hits + h, demands + h + m, loads + m
        per_device.append((sub, nxt, cap))
    return {
        "bound_hit_belady": hits / demands if demands else None,
        "bound_loads_min": loads,
        "bound_tpot_s": _tpot_floor(workload, config, plan, per_device, jit),
        "bound_wall_s": time.perf_counter() - t0,
    }


def window_hit_rates(
    workload: Workload,
    config: SimConfig,
    capacities: list[int],
    closed: bool,
    windows: list[int],
    initial: list[list[tuple[int, int]]] | None = None,
) -> dict[int, float] | None:
    """Hit rate of window-MIN (:func:`traces.horizon.window_min_run`) for each window in
    ``windows`` (iterations seen, counted from the current one; 0 is LRU), on the run's
    demand sequence with ``bound_hit_belady``'s cache: the same plan, slots per GPU
    (global scope per device), step pinning and start (``initial``, else empty). A
    window of at least the run's iterations gives ``bound_hit_belady``.

    A reference, not a bound: an online policy may beat a short window (docs/bounds.md).
    None when the schedule depends on timing, or a layer step is larger than a GPU's
    cache (MIN runs such a step in waves; window-MIN does not model them). Contract: the
    arguments are :func:`run_bounds`'s, ``windows`` >= 0 each. In memory (no spill).
    """
    plan = plan_iterations(workload, config, closed)
    if plan is None:
        return None
    from traces.horizon import window_min_run

    spec = config.model
    L, J, n = spec.num_moe_layers, spec.num_experts, len(capacities)
    seq = demand_sequence_for(workload, plan)
    iteration_start = np.arange(0, seq.num_steps + 1, L, dtype=np.int64)
    hits = dict.fromkeys(windows, 0)
    demands = 0
    for d, cap in enumerate(capacities):
        sub = seq.for_device(d, n)
        if sub.num_steps and int(sub.step_sizes().max()) > cap:
            return None
        nxt = next_use(sub)
        init = None
        if initial is not None and initial[d]:
            init = np.array([lay * J + e for lay, e in initial[d]], dtype=np.int64)
        demands += sub.num_demands
        for w in windows:
            hits[w] += window_min_run(sub, cap, w, iteration_start, nxt, init)[0]
    return {w: h / demands for w, h in hits.items()} if demands else None
