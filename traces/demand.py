"""Demand sequences: which experts a run demands, layer step by layer step.

A *layer step* is one MoE layer of one iteration (a forward pass over a batch's rows);
its demand is the set of distinct experts the batch's rows route to in that layer, as the
simulator counts demands (one per distinct expert per layer step). A
:class:`DemandSequence` stores the steps flat: ``keys`` holds global expert ids
``layer * J + expert`` (the id the round-robin placement hashes, so device ``d`` of ``n``
holds exactly the keys with ``key % n == d``), step by step, ascending within a step;
``step_start`` holds the S + 1 offsets of the steps.

The sequence depends only on the routing and on which requests run together in each
iteration (the *schedule*), not on a policy; :func:`demand_sequence` takes the schedule
as a list of iterations, each a list of (request index, row slice), and defaults to the
requests one at a time in workload order (batch 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from traces.types import Workload

Schedule = Sequence[Sequence[tuple[int, slice]]]  # iterations of (request index, rows)
NEVER = np.iinfo(np.int64).max  # "no next use"
# from this many demands on, the numba kernels (traces/cachesim_jit.py) beat their import
# and load (~0.5 s a process); below it numpy and pure Python are faster end to end
JIT_MIN_DEMANDS = 200_000


@dataclass(frozen=True)
class DemandSequence:
    """Layer steps of distinct expert keys (see the module doc).

    ``keys`` int32 [N]; ``step_start`` int64 [S + 1] with ``step_start[0] == 0`` and
    ``step_start[-1] == N``; ``num_keys``: the size of the key universe (ids are
    ``0 .. num_keys - 1``). Keys within a step are distinct and ascending.
    """

    keys: np.ndarray
    step_start: np.ndarray
    num_keys: int

    @property
    def num_steps(self) -> int:
        return int(self.step_start.size - 1)

    @property
    def num_demands(self) -> int:
        return int(self.keys.size)

    def step_sizes(self) -> np.ndarray:
        return np.diff(self.step_start)

    def steps(self) -> list[list[int]]:
        """The steps as lists of keys (for tests and small inputs)."""
        k, s = self.keys.tolist(), self.step_start.tolist()
        return [k[s[i] : s[i + 1]] for i in range(len(s) - 1)]

    def select(self, mask: np.ndarray, num_keys: int | None = None) -> DemandSequence:
        """The sub-sequence of the keys where ``mask`` holds, steps kept (possibly empty)."""
        sid = np.repeat(np.arange(self.num_steps), self.step_sizes())
        counts = np.bincount(sid[mask], minlength=self.num_steps)
        start = np.zeros(self.num_steps + 1, dtype=np.int64)
        np.cumsum(counts, out=start[1:])
        return DemandSequence(
            self.keys[mask], start, self.num_keys if num_keys is None else num_keys
        )

    def for_device(self, device: int, num_devices: int) -> DemandSequence:
        """The keys the round-robin placement puts on ``device`` (global ids kept)."""
        if num_devices == 1:
            return self
        return self.select(self.keys % num_devices == device)

    def for_layer(self, layer: int, num_experts: int) -> DemandSequence:
        """Layer ``layer``'s steps only (empty steps dropped), keys renumbered 0 .. J-1."""
        lo = layer * num_experts
        sub = self.select((self.keys >= lo) & (self.keys < lo + num_experts), num_experts)
        sizes = sub.step_sizes()
        start = np.concatenate([[0], np.cumsum(sizes[sizes > 0])]).astype(np.int64)
        return DemandSequence((sub.keys - lo).astype(np.int32), start, num_experts)


def request_demands(workload: Workload) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each request's steps run alone (batch 1), one request at a time in workload order:
    (keys int64, step sizes int64), the pieces :func:`demand_sequence` joins by default,
    so a caller can spill them without holding the whole sequence."""
    spec = workload.spec
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    for req in workload.requests:
        pre, *dec = _request_steps(req.routing.topk_ids, req.prompt_len, J)
        yield pre, np.bincount(pre // J, minlength=L)
        if dec:
            yield dec[0], np.full(dec[0].size // K, K, dtype=np.int64)


def sequential_schedule(workload: Workload) -> list[list[tuple[int, slice]]]:
    """Every iteration of every request, one request at a time, in workload order."""
    return [
        [(i, req.iteration_rows(it))]
        for i, req in enumerate(workload.requests)
        for it in range(req.num_iterations)
    ]


def _request_steps(ids: np.ndarray, prompt_len: int, num_experts: int) -> list[np.ndarray]:
    """Keys of one request run alone: its prefill's layers, then each decode row's layers."""
    T, L, K = ids.shape
    off = (np.arange(L, dtype=np.int64) * num_experts)[None, :, None]
    keys = ids.astype(np.int64) + off
    parts = [_iteration_keys(keys[:prompt_len])]
    if T > prompt_len:
        dec = np.sort(keys[prompt_len:], axis=2).reshape(-1)
        parts.append(dec)
    return parts


def _iteration_keys(keys: np.ndarray) -> np.ndarray:
    """Distinct keys of one iteration's rows [R, L, K], ascending (so grouped by layer)."""
    return np.unique(keys.reshape(-1))


def demand_sequence(workload: Workload, schedule: Schedule | None = None) -> DemandSequence:
    """The layer steps of ``workload`` run in ``schedule`` (default: one request at a time).

    Contract: the schedule's slices are routing rows of the named requests (as
    :meth:`traces.types.Request.iteration_rows` gives them). Every MoE layer of every
    iteration is a step, in iteration then layer order.
    """
    spec = workload.spec
    L, J = spec.num_moe_layers, spec.num_experts
    reqs = workload.requests
    chunks: list[np.ndarray] = []
    sizes: list[np.ndarray] = []
    if schedule is None:  # fast path: prefill unique per layer, decode rows as they are
        for keys, counts in request_demands(workload):
            chunks.append(keys)
            sizes.append(counts)
    else:
        off = (np.arange(L, dtype=np.int64) * J)[None, :, None]
        for it in schedule:
            parts = [reqs[i].routing.topk_ids[rows] for i, rows in it]
            ids = parts[0] if len(parts) == 1 else np.concatenate(parts)
            keys = _iteration_keys(ids.astype(np.int64) + off)
            chunks.append(keys)
            sizes.append(np.bincount(keys // J, minlength=L))
    keys = np.concatenate(chunks).astype(np.int32) if chunks else np.zeros(0, np.int32)
    counts = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    start = np.zeros(counts.size + 1, dtype=np.int64)
    np.cumsum(counts, out=start[1:])
    return DemandSequence(keys, start, L * J)


def next_use(seq: DemandSequence) -> np.ndarray:
    """int64 [N]: for each demand, the position of the same key's next demand, or NEVER.

    Positions order demands totally (steps in order, keys ascending within a step), so
    two cached keys never tie on their next use unless neither is used again.
    """
    keys = seq.keys
    if keys.size >= JIT_MIN_DEMANDS:
        from traces.cachesim_jit import _next_use

        return _next_use(keys, seq.num_keys)
    out = np.full(keys.size, NEVER, dtype=np.int64)
    if keys.size < 2:
        return out
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    out[order[:-1][same]] = order[1:][same]
    return out
