"""The engine's state at the start of a run and its policy plumbing (see :mod:`sim.engine`).

:class:`EngineSetup` sizes per-run tables (keys, devices, the decoder-layer plan), notes
which policy hooks are overridden (so the run loop skips the others), and applies the
policy's prefetch decisions to the links.
"""

from __future__ import annotations

import math
from collections import deque
from functools import partial

import numpy as np
import simpy

from policies.base import Policy, PrefetchDecision, RequestArrival, validate_order
from policies.cache import ExpertCache, ExpertKey
from policies.placement import Placement
from sim.batching import make_batcher
from sim.config import SimConfig
from sim.engine_fast import FastPath, make_fast_path, use_compiled
from sim.engine_layer import GpuPlan
from sim.events import EventLog
from sim.iteration import RequestState
from sim.links import Links
from sim.timing import Timing
from specs.model_spec import ModelSpec
from traces.types import Workload


def _overrides(policy: Policy, hook: str) -> bool:
    return getattr(type(policy), hook) is not getattr(Policy, hook)


class EngineSetup:
    """Per-run state and policy plumbing; :class:`sim.engine.Engine` adds the run loop."""

    def __init__(
        self,
        env: simpy.Environment,
        cfg: SimConfig,
        workload: Workload,
        policy: Policy,
        caches: list[ExpertCache],
        links: Links,
        placement: Placement,
        timing: Timing,
        closed_loop: bool,
        log: EventLog | None = None,
    ) -> None:
        self.env, self.cfg, self.policy = env, cfg, policy
        self.spec: ModelSpec = cfg.model
        self.caches, self.links, self.timing, self.log = caches, links, timing, log
        self.states = [RequestState(r, i) for i, r in enumerate(workload.requests)]
        self.closed = closed_loop
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.more_coming = True
        self._arrived: simpy.Event | None = None
        self.batcher = make_batcher(cfg.batching, cfg.batch_size)
        self.iterations = 0
        self.layer_steps = 0
        self.stall_s = 0.0
        self.end_s = 0.0
        self.gate_seq = 0
        self.delayed_orders = 0
        self.search_s = cfg.hardware.compute.policy_search_s if policy.async_search else 0.0
        # executor time per MoE layer step besides compute (0 unless calibrated)
        self.compute_model = cfg.hardware.compute
        self.after_loads = cfg.hardware.compute.experts_wait_for_loads
        # compute on a GPU runs this many times as long while its host link carries a copy
        # (measured by calibrate bench; an emulated link shares the CPU's cores and memory)
        self.interference = cfg.hardware.compute.copy_interference
        self.interferes = self.interference != 1.0
        self._plain_decide = not _overrides(policy, "decide_prefetch")
        self._h_arrival = _overrides(policy, "on_request_arrival")
        self._h_start = _overrides(policy, "on_iteration_start")
        self._h_gate = _overrides(policy, "on_gate")
        self._h_gate_now = _overrides(policy, "on_gate_now")
        # a policy with gate orders that need no search runs its gate hooks both ways
        self._h_gate = self._h_gate or self._h_gate_now
        self._h_used = _overrides(policy, "on_expert_used")
        self._h_end = _overrides(policy, "on_iteration_end")
        self._pass_gates = policy.precomputes_from_gates and self._h_gate
        if _overrides(policy, "on_load_finished"):
            links.on_load = self._on_load
        self.has_probs = workload.has_gate_probs
        self.has_look = workload.has_lookahead
        self.has_emb = workload.has_embeddings
        spec, n = self.spec, cfg.hardware.num_gpus
        self.num_gpus = n
        # every key (layer, expert) made once: the demand path reads them instead of building
        # a tuple per expert, and the caches' dict lookups then find the very same object
        self.key_table = [
            [(lay, e) for e in range(spec.num_experts)] for lay in range(spec.num_moe_layers)
        ]
        self.plans = [GpuPlan(g, caches[g], links.links[g]) for g in range(n)]
        # (MoE layers, experts): read per order; num_moe_layers is a property that counts
        self.experts_shape = (spec.num_moe_layers, spec.num_experts)
        self.dev_table = [
            [placement.device_of((lay, e)) for e in range(spec.num_experts)]
            for lay in range(spec.num_moe_layers)
        ]
        self._init_hybrid(cfg, policy)
        dense = set(spec.dense_layers)
        stages = [i * n // spec.num_layers for i in range(spec.num_layers)]
        moe_index = {d: i for i, d in enumerate(spec.moe_layer_ids)}
        # (moe layer index or -1, pipeline hand-off before this decoder layer, stage GPU)
        self.plan = [
            (-1 if i in dense else moe_index[i], i > 0 and stages[i] != stages[i - 1], stages[i])
            for i in range(spec.num_layers)
        ]
        # the compiled path (sim.engine_fast) when the run qualifies; ``clock``: what the
        # run loop and arrivals advance (the links, or the compiled path's arrays of them)
        self._fast: FastPath | None = None
        self.clock: Links | FastPath = links
        steps = sum(r.output_len for r in workload.requests) * spec.num_moe_layers
        if use_compiled(self, steps):  # type: ignore[arg-type]
            self._fast = self.clock = make_fast_path(self)  # type: ignore[arg-type]

    # -- policy plumbing ------------------------------------------------------------------
    def _drain(self, now: float, delayed: bool = False, latency: float | None = None) -> None:
        """Apply the policy's decisions (when ``delayed``, after ``latency``, by default
        ``policy_search_s``: a timed call on the links' clock, after their events up to then)."""
        p = self.policy
        if self._plain_decide and not p._enqueue and not p._cancel:  # nothing to drain
            return
        dec = p.decide_prefetch()
        if not dec:
            return
        stamp = self.links.stamp
        wait = self.search_s if latency is None else latency
        if delayed and wait > 0:
            self.delayed_orders += len(dec.enqueue)
            self.links.call_at(now + wait, partial(self._apply, dec, stamp))
            return
        self._apply(dec, stamp, now)

    def _apply(self, dec: PrefetchDecision, stamp: int, now: float) -> None:
        links = self.links
        for key in dec.cancel:
            links.cancel(key, now)
        (L, J), dev = self.experts_shape, self.dev_table
        finite = math.isfinite
        for order in dec.enqueue:
            lay, e, pri = order  # a NamedTuple: one unpacking, not three attribute reads
            if not (0 <= lay < L and 0 <= e < J and finite(pri)):
                validate_order(order, self.spec)  # raises the one-line InputError
            links.links[dev[lay][e]].enqueue((lay, e), pri, stamp, now)

    def _on_load(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self.policy.on_load_finished(key, by_prefetch, now)
        self._drain(now)

    def _notify_arrival(self, s: RequestState, now: float) -> None:
        if not self._h_arrival:
            return
        req = s.req
        emb = req.prompt_embedding
        if emb is None and req.routing.embeddings is not None:
            emb = req.routing.embeddings[: req.prompt_len].astype(np.float32).mean(axis=0)
        self.policy.on_request_arrival(
            RequestArrival(req.request_id, req.prompt_len, req.prompt_text, emb)
        )
        self._drain(now)
