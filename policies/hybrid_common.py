"""Shared pieces of the hybrid (CPU/GPU) policies: cost estimates from the executor's view,
expert popularity from a training workload, and pinning hot experts at bind time."""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.base import PolicyContext
from policies.cache import CacheEntry, ExpertKey
from specs.errors import InputError

HOT = 1e18  # eviction score of an expert kept on the GPU for the run (evicted last)
# base score of a placed expert in a static placement: above every clock time (seconds),
# low enough that adding an integer training count stays exact in a float
PLACED = 1e12


def expert_counts(training: Any, num_layers: int, num_experts: int) -> np.ndarray:
    """Uses of each (layer, expert) over every token of a training Workload, [L, J]."""
    counts = np.zeros((num_layers, num_experts), dtype=np.int64)
    for req in training.requests:
        ids = req.routing.topk_ids  # [T, L, K]
        for lay in range(num_layers):
            np.add.at(counts[lay], ids[:, lay, :].ravel(), 1)
    return counts


def hottest(counts: np.ndarray, n: int) -> list[ExpertKey]:
    """The ``n`` most used (layer, expert) keys, most used first (ties: lower key)."""
    flat = np.argsort(-counts.ravel(), kind="stable")[: max(n, 0)]
    J = counts.shape[1]
    return [(int(i // J), int(i % J)) for i in flat if counts.ravel()[i] > 0]


PRELOAD_HOOK = "preload_experts"  # a PolicyContext attribute an executor may set


def preload(ctx: PolicyContext, keys: list[ExpertKey]) -> list[ExpertKey]:
    """Make ``keys`` resident on their devices before the run, as many as fit (in order);
    the loaded keys. An executor whose slots hold real weights sets
    ``ctx.preload_experts`` (a callable taking keys) to copy them in; otherwise only the
    cache state changes (the simulator)."""
    place = getattr(ctx, PRELOAD_HOOK, None)
    done = []
    for key in keys:
        cache = ctx.cache_of(key)
        if key in cache.entries:
            done.append(key)
        elif cache.free > 0:
            if place is not None:
                place([key])
            else:
                cache.preload([key])
            if key in cache.entries:
                done.append(key)
    return done


class HotPlacement:
    """Mixin (before :class:`Policy`): the experts a training workload uses most are made
    resident before the run, as many as the caches hold less ``staging_slots`` per cache
    (``place_hot`` limits it). ``fit`` may come before or after ``bind`` (the real
    executor fits first). :meth:`placement_scores` is the eviction order of a static
    placement: experts fetched during the run go first (least recently used first), then
    the placed ones, least used in training first."""

    place_hot: int | None = None  # experts to place; None: every slot
    staging_slots: int = 0  # slots per cache left free for copies made during the run
    ctx: PolicyContext | None
    _hot_counts: np.ndarray | None = None
    placed: set[ExpertKey]
    _placed_base: dict[ExpertKey, float]

    def fit(self, training: Any) -> None:
        super().fit(training)  # type: ignore[misc]
        spec = training.spec
        self._hot_counts = expert_counts(training, spec.num_moe_layers, spec.num_experts)
        if self.ctx is not None:
            self._place()

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)  # type: ignore[misc]
        self.placed, self._placed_base = set(), {}
        if self._hot_counts is not None:
            self._place()

    def _place(self) -> None:
        assert self.ctx is not None and self._hot_counts is not None
        n = sum(max(c.capacity - self.staging_slots, 0) for c in self.ctx.caches)
        if self.place_hot is not None:
            n = min(n, self.place_hot)
        self.placed = set(preload(self.ctx, hottest(self._hot_counts, n)))
        counts = self._hot_counts
        self._placed_base = {k: PLACED + float(counts[k]) for k in self.placed}

    def placement_scores(self, entries: list[CacheEntry]) -> list[float]:
        """Eviction scores (lower goes first) of a static placement: a placed expert scores
        PLACED plus its training count (the least used placed expert goes first, and only
        once no fetched expert can go); any other its last use (least recent first)."""
        placed = self.placed
        if not placed:
            return [e.last_used for e in entries]
        base = self._placed_base
        return [base[e.key] if e.key in placed else e.last_used for e in entries]


def fetch_and_cpu_s(ctx: PolicyContext | None, key: ExpertKey, tokens: int) -> tuple[float, float]:
    """(seconds until a fetch of ``key`` would land, seconds until a CPU task's output
    would be back), from the executor's view now. InputError when the executor has no
    view or no CPU (a CPU-capable policy on a profile without host figures)."""
    view = None if ctx is None else ctx.executor
    if view is None:
        raise InputError("this policy needs an executor that reports its link and CPU queues")
    cpu = view.cpu_state()
    if cpu is None:
        raise InputError(
            "this policy computes experts on the CPU, but the hardware profile has no "
            "host figures (HardwareProfile.host)"
        )
    link = view.link_state(ctx.placement.device_of(key))  # type: ignore[union-attr]
    fetch = link.queued_s + link.copy_s
    on_cpu = cpu.queued_s + cpu.expert_s_fixed + tokens * cpu.expert_s_per_token
    return fetch, on_cpu
