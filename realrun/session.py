"""RunSession: one policy driving an offloaded model, with timing and optional recording.

A session binds a policy to an :class:`OffloadedModel` for one run: it builds the
per-device caches, slot pools and copy engines for a budget, installs the routing taps,
serves requests and reports their metrics. Every MoE layer runs through
:meth:`RunSession.run_layer` (realrun.session_layer: the per-layer protocol and how the
policy's decisions reach the copy engines).

Event order to the policy follows policies/base.py: on_request_arrival, then per
iteration on_iteration_start (with the embedding layer's output), on_gate /
on_expert_used per layer in order, on_iteration_end; on_load_finished as copies land.

Batches (:meth:`RunSession.serve`: static batches, see realrun.generate, or continuous
batching, see realrun.continuous): every request arrives when it is admitted (the
simulator's closed loop); iteration and gate events carry one row per real token of the
forward (request ids, positions and prefill flags per row, as the simulator's
iterations); pad rows of a static batch never reach the policy, the caches (they route to
no expert) or the recorder, and continuous batching has none.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from policies.base import (
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PrefetchDecision,
    RequestArrival,
)
from policies.cache import CacheCounters
from realrun.copy_engine import LinkEmulation
from realrun.drivers import make_driver
from realrun.executor_view import RealExecutorView
from realrun.generate import Generation, IterationRows, NewTokens
from realrun.host_experts import HostExperts
from realrun.metrics import summarise
from realrun.offload import (
    OffloadedModel,
)
from realrun.placement import split_over_devices
from realrun.prompting import Prompt
from realrun.recorder import RoutingRecorder
from realrun.residency import Residency
from realrun.serving import generate_all
from realrun.session_layer import LayerSteps
from realrun.taps import ModelTaps
from specs.errors import InputError


def refuse_future_readers(policy_cls: type[Policy]) -> None:
    """InputError for policies that read the trace's future (they run only in the simulator)."""
    if policy_cls.reads_future:
        raise InputError(
            f"policy {policy_cls.name!r} reads the trace's future; it runs only in the simulator"
        )


@dataclass
class SessionOptions:
    """How a session runs. ``cache_experts`` is the total over devices (None: every expert)."""

    cache_experts: int | None = None
    devices: Sequence[torch.device] = (torch.device("cpu"),)
    link: LinkEmulation | None = None
    chunk_bytes: int = 1 << 20
    record: bool = False
    seed: int = 0
    cache_scope: str = "global"  # or "per-layer": each MoE layer an equal share of the slots
    allow_lossy: bool = False  # let the policy take lossy miss actions (low-bit, skip)


class RunSession(LayerSteps):
    """Attach with the constructor, run prompts with :meth:`generate`, end with :meth:`close`."""

    def __init__(
        self, om: OffloadedModel, policy: Policy, opts: SessionOptions | None = None
    ) -> None:
        opts = opts or SessionOptions()
        refuse_future_readers(type(policy))
        spec = om.loaded.spec
        total = spec.total_experts if opts.cache_experts is None else opts.cache_experts
        if policy.preload_all and total < spec.total_experts:
            raise InputError(
                f"policy {policy.name!r} keeps every expert resident: it needs a cache of "
                f"{spec.total_experts} experts, got {total}"
            )
        if any(m.runner is not None for m in om.modules):
            raise RuntimeError("another session is attached to this model; close it first")
        self.om = om
        self.spec = spec
        self.policy = policy
        self.opts = opts
        self.placement, caps = split_over_devices(spec, total, len(opts.devices))
        self._t0 = time.perf_counter()
        self.res = Residency(
            om.store,
            spec.expert_bytes,
            self.placement,
            opts.devices,
            caps,
            opts.link,
            opts.chunk_bytes,
            self.now,
            scores=policy.eviction_scores,
            cache_scope=opts.cache_scope,
            top_k=spec.top_k,
        )
        self.taps = ModelTaps(om.loaded)
        self._held: list[tuple[PrefetchDecision, int]] | None = None
        self._apply_lock = threading.Lock()  # _held and applying (compute + searcher threads)
        try:
            self.host = HostExperts(om.store, policy, spec.expert_bytes, opts.allow_lossy)
            # the policy sees the copy engines, the measured layer time (deadline-aware
            # prefetch) and the host CPU's measured expert task time (hybrid execution)
            self._view = RealExecutorView(self.res, spec.expert_bytes)
            self._view.host = self.host
            # the copy threads (and the compute thread, for an async policy's searcher)
            # change the caches under res.lock: a policy's multi-field reads take it
            ctx = PolicyContext(
                spec,
                self.placement,
                self.res.caches,
                seed=opts.seed,
                executor=self._view,
                cache_guard=self.res.lock,
            )
            # a policy that places experts before the run copies them into slots
            ctx.preload_experts = self.res.preload  # type: ignore[attr-defined]
            policy.bind(ctx)
            self.driver = make_driver(policy, self._apply, lambda: self.res.gate_seq)
            self.taps.install()
            self.taps.on_embeddings = self._on_embeddings
            self.recorder = RoutingRecorder(spec) if opts.record else None
            self._lookahead = policy.wants_lookahead or opts.record
            for m in om.modules:
                m.runner = self
            if policy.preload_all:
                self.res.preload(
                    [
                        (lyr, e)
                        for lyr in range(spec.num_moe_layers)
                        for e in range(spec.num_experts)
                    ]
                )
        except BaseException:  # leave the model as it was: no threads, hooks or runner left
            if getattr(self, "driver", None) is not None:
                self.driver.close()
            self.taps.remove()
            self.res.close()
            for m in om.modules:
                m.runner = None
            raise
        self.layer_steps = 0
        self.layer_paths = {"single_call": 0, "per_expert": 0, "multi_wave": 0}
        self.iteration = -1
        self.generations: list[Generation] = []
        self.batch_size = 0  # the largest batch run so far
        self._rows: IterationRows | None = None
        self._real_np: np.ndarray | None = None  # the forward's real rows (None: all)
        self._wall_s = 0.0

    def now(self) -> float:
        """Seconds since the session started (the clock the policy and caches see)."""
        return time.perf_counter() - self._t0

    # -- requests -------------------------------------------------------------------------------
    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        prompt_text: str | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        """Run one request to completion (greedy): a batch of one."""
        return self.generate_batch(
            [Prompt(request_id, list(prompt_ids), prompt_text)],
            max_new_tokens,
            keep_logits=keep_logits,
        )[0]

    def generate_batch(
        self, requests: Sequence[Prompt], max_new_tokens: int, keep_logits: bool = False
    ) -> list[Generation]:
        """Run ``requests`` as one static batch to completion (greedy, see
        realrun.generate); their timings join the session's metrics. As in the simulator's
        closed loop, every request arrives (``on_request_arrival``) when its batch starts."""
        if not requests:
            raise ValueError("generate_batch needs at least one request")
        return self.serve(requests, max_new_tokens, len(requests), "static", keep_logits)

    def serve(
        self,
        requests: Sequence[Prompt],
        max_new_tokens: NewTokens,
        batch_size: int,
        batching: str = "static",
        keep_logits: bool = False,
        on_done: Callable[[Prompt, Generation], None] | None = None,
    ) -> list[Generation]:
        """Run ``requests`` to completion under ``batching`` (realrun.serving: static
        batches of ``batch_size`` in order, or continuous batching up to ``batch_size``
        running); their timings join the session's metrics. Closed loop, as the
        simulator's: each request arrives (``on_request_arrival``, and starts being
        recorded) when it is admitted, just before the iteration it joins."""
        t0 = time.perf_counter()
        gens = generate_all(
            self.om.loaded.model,
            requests,
            max_new_tokens,
            batch_size,
            batching,
            experts=self.om.modules,
            observer=self,
            on_admit=self.admit,
            on_done=on_done,
            keep_logits=keep_logits,
        )
        if self.recorder is not None:
            for g in gens:
                self.recorder.finish_request(g.request_id, len(g.output_ids))
        self.generations.extend(gens)
        self.batch_size = max([self.batch_size] + [g.batch_size for g in gens])
        self._wall_s += time.perf_counter() - t0
        return gens

    def admit(self, requests: Sequence[Prompt]) -> None:
        """``requests`` arrive (the policy hears of each; the recorder starts them)."""
        for r in requests:
            self.driver.observe(
                RequestArrival(r.request_id, len(r.ids), r.text, self._prompt_embedding(r.ids))
            )
            if self.recorder is not None:
                self.recorder.start_request(r.request_id, len(r.ids), r.text)

    def add_wall_time(self, seconds: float) -> None:
        """Count ``seconds`` of serving outside :meth:`serve` in the metrics' ``wall_s``."""
        self._wall_s += seconds

    def _prompt_embedding(self, ids: list[int]) -> np.ndarray:
        """The mean embedding of a prompt's tokens (the embedding tap stays quiet)."""
        model = self.om.loaded.model
        with torch.no_grad():
            cb, self.taps.on_embeddings = self.taps.on_embeddings, None
            t = torch.tensor([ids], dtype=torch.long, device=self.om.dense_device)
            emb = model.get_input_embeddings()(t)[0].float().mean(dim=0).cpu().numpy()
            self.taps.on_embeddings = cb
        return emb

    # IterationObserver
    def begin_iteration(self, rows: IterationRows) -> None:
        self.iteration += 1
        self._rows = rows
        self._real_np = None if rows.real is None else rows.real.cpu().numpy()
        if self.recorder is not None:
            self.recorder.start_iteration(rows.request_ids)

    def end_iteration(self, finished: tuple[str, ...]) -> None:
        assert self._rows is not None
        self._pump()
        self.driver.observe(IterationEnd(self.iteration, self._rows.batch, finished, self.now()))

    def _on_embeddings(self, out: torch.Tensor) -> None:
        assert self._rows is not None
        flat = self._rows.select(out.detach().reshape(-1, out.shape[-1]))
        rows = flat.float().cpu().numpy()
        if self.recorder is not None:
            self.recorder.embeddings(rows)
        self.driver.observe(
            IterationStart(
                self.iteration,
                self._rows.request_ids,
                self._rows.positions,
                self._rows.prefill,
                rows,
                self.now(),
            )
        )

    # -- results ---------------------------------------------------------------------------------
    def counters(self) -> CacheCounters:
        total = CacheCounters()
        for c in self.res.caches:
            total = total.add(c.counters)
        return total

    def metrics(self) -> dict[str, Any]:
        """Metrics of every request generated so far (simulator names)."""
        link = (
            self.opts.link.describe()
            if self.opts.link
            else {"emulated_link": False, "link_gbps": None, "link_latency_us": None}
        )
        out = summarise(
            self.generations,
            self.counters(),
            stall_s=self.res.stall_s,
            layer_steps=self.layer_steps,
            wall_s=self._wall_s,
            batch_size=self.batch_size,
            iterations=self.iteration + 1,
            link_busy_s=[d.engine.stats.busy_s for d in self.res.devs],
            link=link,
        )
        out.update(
            cache_experts=self.res.capacities,
            cache_experts_total=sum(self.res.capacities),
            expert_memory_bytes=sum(self.res.capacities) * self.spec.expert_bytes,
            num_devices=len(self.res.devs),
            bytes_transferred=sum(d.engine.stats.bytes_copied for d in self.res.devs),
            preemptions=sum(d.engine.stats.preemptions for d in self.res.devs),
            **self.res.stats.as_metrics(),
            **{f"layer_calls_{k}": v for k, v in self.layer_paths.items()},
            actions_cpu=self.host.counts["cpu"],
            actions_lowbit=self.host.counts["lowbit"],
            actions_skip=self.host.counts["skip"],
            exact=not (self.host.counts["lowbit"] or self.host.counts["skip"]),
            host_compute_s=self.host.host_s,
        )
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}

    def close(self) -> None:
        """Detach from the model and stop the threads (the model can take a new session)."""
        try:
            self.driver.close()
        finally:
            self.host.close()
            self.taps.remove()
            self.res.close()
            for m in self.om.modules:
                m.runner = None

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
