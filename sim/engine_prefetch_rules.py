"""Which runs the prefetching compiled path (:mod:`sim.engine_prefetch`) can take:
:func:`why_not_prefetch` names the first reason a run cannot ('' when it can; the rules
are listed in :mod:`sim.engine_prefetch`'s docstring and docs/simulator.md),
:func:`by_recency` whether a policy's victims are the kernel's own recency order, and
:func:`compiled_gate_of` the policy's compiled gate the kernel calls, if any."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from policies.base import Policy, RecencyEviction
from policies.cache import VICTIM_INDEX_MIN
from policies.cache_victims import victim_index_of
from policies.compiled_gate import CompiledGate
from sim.engine_fast import why_not_plain_start

if TYPE_CHECKING:
    from sim.engine import Engine

# hooks the policy must leave to Policy on this path
_NOT_HOOKS = (
    "on_load_finished",
    "decide_prefetch",
    "miss_action",
    "kernel_eviction",
)


def _overrides(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


def by_recency(policy: Policy) -> bool:
    """Whether the policy's victims are the cache's least recently used (unprotected first)."""
    cls = type(policy)
    if cls.eviction_scores is RecencyEviction.eviction_scores:  # type: ignore[attr-defined]
        return True
    return cls.eviction_scores is Policy.eviction_scores and not _overrides(
        policy, "eviction_score"
    )


def why_not_prefetch(eng: Engine) -> str:
    """Why the prefetching compiled path cannot run ``eng``'s run ('' when it can)."""
    policy = eng.policy
    for hook in _NOT_HOOKS:
        if _overrides(policy, hook):
            return f"policy {policy.name!r} overrides {hook}"
    vix = victim_index_of(eng.links.scores)
    if (
        vix is not None
        and max(c.capacity for c in eng.caches) >= VICTIM_INDEX_MIN
        and policy.kernel_victims() is None
    ):
        # the cache would call the policy's victim_index (its side effects are the
        # policy's); the kernel calls back only its scorer
        return f"policy {policy.name!r} picks victims of large caches with victim_index"
    if eng.log is not None:
        return "an event log is recorded"
    if eng.interferes:
        return "copies interfere with compute"
    if eng.after_loads:
        return "experts wait for all loads (experts_wait_for_loads)"
    if eng.side or eng.h_miss:
        return "miss actions other than a fetch"
    plain = why_not_plain_start(eng)
    if plain:
        return plain
    for cache in eng.caches:
        # the cache's own reference and getrefcount's: any other holder (a policy that
        # kept it at bind) would read the real counters, not the kernel's (the entries
        # dicts are the real ones, kept in step with the kernel)
        if sys.getrefcount(cache.counters) > 2:
            return "something holds a cache's counters (read past the kernel)"
    try:
        waves = _may_wave(eng)
    except ImportError:  # a broken numba install: the Python engine
        return "numba cannot be imported"
    if waves:
        return "a layer may route more experts to a GPU than its cache holds beside a copy"
    return ""


def _may_wave(eng: Engine) -> bool:
    """Whether some iteration could route to a GPU at least as many distinct experts of one
    layer as its cache holds (then a demand may find no slot and the engine runs waves)."""
    from sim import fastkernel_prefetch as fk

    spec, n = eng.spec, eng.num_gpus
    L, J = spec.num_moe_layers, spec.num_experts
    dev = np.asarray(eng.dev_table, dtype=np.int64)  # [L, J]
    caps = np.array([c.capacity for c in eng.caches], dtype=np.int64)
    per_gpu = np.stack([(dev == g).sum(axis=1).max() for g in range(n)])
    if (per_gpu < caps).all():  # even a whole layer fits beside a copy in flight
        return False
    if eng.cfg.batch_size != 1:  # batches mix requests' rows: not bounded per request
        return True
    ki = np.zeros((L * J, fk.N_KI), np.int64)
    ki[:, fk.K_DEV] = dev.reshape(-1)
    gi = np.zeros((n, fk.N_GI), np.int64)
    gi[:, fk.G_CAP] = caps
    counts, seen = np.zeros(n, np.int64), np.zeros(L * J, np.int64)
    mark = 0
    K = spec.top_k
    for s in eng.states:  # batch 1: an iteration is a request's prompt, or one decode row
        ids = s.req.routing.topk_ids
        p = s.req.iteration_rows(0)
        mark += 1
        if fk.needs_waves(ids[p].astype(np.int64), ki, gi, counts, seen, mark, J):
            return True
        if ids.shape[0] > p.stop and K >= caps.min():  # a decode row: top-K a layer
            return True
    return False


# FMOE_SIM_GATE=python: the prefetching kernel returns to the policy's Python gate hooks
# even where the policy offers a compiled gate (to compare, or to debug a gate)
GATE_ENV = "FMOE_SIM_GATE"


def compiled_gate_of(eng: Engine) -> CompiledGate | None:
    """The policy's compiled gate (policies.compiled_gate) the kernel calls in place of
    returning to ``on_gate_now`` / ``on_gate``, or None: none offered, ``FMOE_SIM_GATE``
    is ``python``, or a subclass below the class that offers it overrides a gate hook
    (then the offer no longer describes the hooks that run)."""
    if os.environ.get(GATE_ENV, "compiled") == "python":
        return None
    mro = type(eng.policy).__mro__

    def owner(name: str) -> int:
        return next(i for i, c in enumerate(mro) if name in c.__dict__)

    at = owner("compiled_gate")
    if mro[at] is Policy:
        return None
    if owner("on_gate") < at or owner("on_gate_now") < at:
        return None
    return eng.policy.compiled_gate()
