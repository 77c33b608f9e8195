"""The run bounds of :mod:`sim.bounds` for large runs, in memory independent of the
number of requests (docs/bounds.md, "Cost").

One pass over the run's iterations (the replayed schedule, never held whole) writes the
demand sequence to a temporary :class:`traces.demand_file.DemandFile` and sums the
compute floor; the file's backward pass gives each demand's next use; one forward pass
(:func:`traces.cachesim_stream.min_stream`, numba) runs MIN per GPU and, for each request,
MIN over its decode window from the best free start. The numbers are those of the
in-memory path (``sim.bounds``), bit for bit: the same per-iteration compute summed in
the same order, the same MIN counts (see :mod:`traces.cachesim_stream`), the same
arithmetic for the floor.

What stays in memory grows with the requests, not with their tokens: per request its
first iteration, two running compute sums and its window's loads per GPU (about
8 x (3 + GPUs) bytes), plus the chunk table of the file.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sim.bounds import (
    Compute,
    batch_compute,
    no_bounds,
    one_at_a_time,
    replay_schedule,
    request_compute,
)
from sim.config import SimConfig
from sim.timing import Timing
from specs.errors import InputError
from traces.cachesim_stream import min_stream
from traces.demand import _iteration_keys, _request_steps
from traces.demand_file import DemandFile, check_disk
from traces.types import Workload


def spill_sizes(workload: Workload) -> tuple[int, int]:
    """Upper bounds on (demands, steps) of a run of ``workload`` in any schedule: every
    row demands at most K experts per layer (batching only merges demands)."""
    spec = workload.spec
    L, K = spec.num_moe_layers, spec.top_k
    tokens = sum(r.prompt_len + r.output_len - 1 for r in workload.requests)
    iterations = sum(r.output_len for r in workload.requests)
    return tokens * L * K, iterations * L


class _Pass:
    """Pass 1: the demand file and each request's running compute sums at its decode
    window's ends (``ca[i]`` = the sum before its first decode, ``cb[i]`` after its last),
    exactly the values ``np.cumsum`` over every iteration's compute would hold there."""

    def __init__(self, workload: Workload, config: SimConfig, dfile: DemandFile) -> None:
        spec, hw = config.model, config.hardware
        self.workload, self.config, self.dfile = workload, config, dfile
        self.comp = Compute(Timing(hw, spec, config.pinned), workload, hw.num_gpus)
        n = len(workload.requests)
        self.first = np.zeros(n, np.int64)  # each request's first iteration
        self.ca = np.zeros(n)
        self.cb = np.zeros(n)
        self.total = 0.0  # running compute sum, added in iteration order

    def one_at_a_time(self, order: list[int]) -> None:
        spec = self.workload.spec
        L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
        count = 0
        for i in order:
            req = self.workload.requests[i]
            self.first[i] = count
            count += req.num_iterations
            pre, *dec = _request_steps(req.routing.topk_ids, req.prompt_len, J)
            self.dfile.append(pre, np.bincount(pre // J, minlength=L))
            if dec:
                self.dfile.append(dec[0], np.full(dec[0].size // K, K, np.int64))
            seg = np.cumsum(np.concatenate([[self.total], request_compute(self.comp, req)]))
            out = req.output_len
            if out > 1:
                self.ca[i], self.cb[i] = seg[1], seg[out]
            self.total = float(seg[-1])

    def batched(self, closed: bool) -> None:
        spec = self.workload.spec
        L, J = spec.num_moe_layers, spec.num_experts
        reqs = self.workload.requests
        off = (np.arange(L, dtype=np.int64) * J)[None, :, None]
        marks: dict[int, list[tuple[int, bool]]] = {}  # iteration -> (request, is end)
        seen = 0
        for idx, it in enumerate(replay_schedule(self.workload, self.config, closed, self.first)):
            for i, rows in it:
                out = reqs[i].output_len
                if rows.start == 0 and out > 1:  # admitted now: its window's two ends
                    marks.setdefault(idx + 1, []).append((i, False))
                    marks.setdefault(idx + out, []).append((i, True))
            for i, end in marks.pop(idx, ()):
                (self.cb if end else self.ca)[i] = self.total
            parts = [reqs[i].routing.topk_ids[rows] for i, rows in it]
            ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
            keys = _iteration_keys(ids.astype(np.int64) + off)
            self.dfile.append(keys, np.bincount(keys // J, minlength=L))
            self.total += float(batch_compute(self.comp, reqs, it))  # as np.cumsum adds
            seen = idx + 1
        for i, end in marks.pop(seen, ()):
            (self.cb if end else self.ca)[i] = self.total
        if marks:
            raise RuntimeError("a request's decode window ends past the schedule")


def stream_bounds(
    workload: Workload,
    config: SimConfig,
    capacities: list[int],
    closed: bool,
    initial: list[list[tuple[int, int]]] | None,
    order: list[int],
    folder: str | None = None,
) -> dict[str, Any]:
    """``bound_hit_belady``, ``bound_loads_min`` and ``bound_tpot_s`` as
    :func:`sim.bounds.run_bounds` computes them, through a temporary file under ``folder``
    (default the system's). ``order``: the one-at-a-time plan's request order (ignored
    for a batched plan). A temp folder too small for the file gives None bounds with
    ``bound_note`` saying so (the run's own results stand); so does a temp folder that
    cannot be written."""
    spec = config.model
    L, J = spec.num_moe_layers, spec.num_experts
    max_demands, max_steps = spill_sizes(workload)
    try:
        check_disk(max_demands, max_steps, L * J, folder)
    except InputError as exc:  # no room: the run's own results stand
        return _none(str(exc))
    try:
        return _stream(workload, config, capacities, closed, initial, order, folder)
    except OSError as exc:  # the temp folder cannot be written (a bad trace stays an error)
        return _none(f"the bounds' temporary demand file: {exc}")


def _none(why: str) -> dict[str, Any]:
    return no_bounds(f"bounds not computed: {why}")


def _stream(
    workload: Workload,
    config: SimConfig,
    capacities: list[int],
    closed: bool,
    initial: list[list[tuple[int, int]]] | None,
    order: list[int],
    folder: str | None,
) -> dict[str, Any]:
    spec, hw = config.model, config.hardware
    L, J = spec.num_moe_layers, spec.num_experts
    with DemandFile(L * J, folder) as dfile:
        p = _Pass(workload, config, dfile)
        if one_at_a_time(config):
            p.one_at_a_time(order)
        else:
            p.batched(closed)
        dfile.finish()
        reqs = workload.requests
        outs = np.array([r.output_len for r in reqs], np.int64)
        first = p.first
        dec = np.flatnonzero(outs > 1)  # requests with a decode window, in workload order
        ws, we = (first[dec] + 1) * L, (first[dec] + outs[dec]) * L
        init = None
        if initial is not None:
            init = [np.array([lay * J + e for lay, e in keys], np.int64) for keys in initial]
        res = min_stream(dfile, capacities, init, (ws, we))
        demands = dfile.num_demands
    hits, loads = int(res.hits.sum()), int(res.misses.sum())
    timing = Timing(hw, spec, config.pinned)
    eb, cap_Bps = spec.expert_bytes, hw.host_bandwidth_cap_Bps
    floors = []
    for w, i in enumerate(dec.tolist()):
        wl = [int(x) for x in res.window_loads[w]]
        link = max(n * eb / timing.bandwidth_Bps for n in wl)
        if cap_Bps:
            link = max(link, sum(wl) * eb / cap_Bps)
        floors.append(max(p.cb[i] - p.ca[i], link) / (int(outs[i]) - 1))
    return {
        "bound_hit_belady": hits / demands if demands else None,
        "bound_loads_min": loads,
        "bound_tpot_s": float(np.mean(floors)) if floors else None,
    }
