"""One MoE layer of a :class:`realrun.session.RunSession` and the policy's decisions that
reach the copy engines, as a mixin of the session (state made by its constructor).

Per MoE layer (:meth:`LayerSteps.run_layer`, called by the offloaded experts modules):

1. the gate event goes to the policy (probability rows, the chosen experts, lookahead
   rows if the policy wants them); orders made before for this layer become stale;
2. the layer's experts are demanded (hit = resident at that moment), misses become demand
   loads (ahead of every prefetch), everything used is pinned; only then do the gate's
   prefetch orders reach the copy engines (as in the simulator, see realrun.residency);
   experts the policy serves otherwise (CPU, low-bit, skip: realrun.host_experts) start
   beside the GPU's work;
3. the compute waits for its experts (that wait is ``stall_s``) and calls the library's
   experts forward on slot views (see realrun.offload for the exactness argument); a
   layer needing more distinct experts than a device has slots runs in waves;
4. pins are released and the layer's unused prefetches lose their protection.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from policies.async_runner import ExpertUsed, LoadFinished
from policies.base import GateOutput, Policy, PrefetchDecision, validate_order
from policies.cache import ExpertKey
from policies.placement import Placement
from realrun.executor_view import RealExecutorView
from realrun.generate import IterationRows
from realrun.host_experts import HostExperts, add_host_outputs, start_host_tasks
from realrun.offload import (
    OffloadedExperts,
    SlotView,
    run_on_slots,
    run_one_expert,
    single_call_is_exact,
)
from realrun.placement import plan_waves
from realrun.residency import Residency
from realrun.taps import ModelTaps
from specs.model_spec import ModelSpec


class LayerSteps:
    """The session's per-layer protocol and decision plumbing (a mixin of RunSession)."""

    # set by RunSession.__init__ (declared here for readers and type checkers)
    spec: ModelSpec
    policy: Policy
    placement: Placement
    res: Residency
    taps: ModelTaps
    host: HostExperts
    driver: Any
    recorder: Any
    iteration: int
    layer_steps: int
    layer_paths: dict[str, int]
    _view: RealExecutorView
    _held: list[tuple[PrefetchDecision, int]] | None
    _apply_lock: threading.Lock
    _lookahead: bool
    _rows: IterationRows | None
    _real_np: np.ndarray | None

    def now(self) -> float:  # RunSession's clock
        raise NotImplementedError

    # -- one MoE layer ---------------------------------------------------------------------------
    def run_layer(
        self,
        mod: OffloadedExperts,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        layer = mod.moe_layer
        # pad rows arrive routed to index E (realrun.generate): counted by no one below
        ids = top_k_index.detach().cpu().numpy()
        with self._apply_lock:  # orders arriving from now on go after the demand loads
            self._held = []
        self.res.gate(layer)
        self._gate(layer, hidden, ids, top_k_weights)
        E = self.spec.num_experts
        flat = ids.reshape(-1)
        counts = np.bincount(flat[(flat >= 0) & (flat < E)], minlength=E)
        needed = np.flatnonzero(counts).tolist()
        on_cpu: dict[int, Any] = {}
        if self.host.active:  # miss actions: CPU tasks start now, beside the GPU's work
            needed, on_cpu, top_k_weights = start_host_tasks(
                self, mod, layer, needed, counts, hidden, top_k_index, top_k_weights
            )
        waves = plan_waves(
            needed, lambda e: self.placement.device_of((layer, e)), self.res.wave_capacities
        )
        out = torch.zeros_like(hidden)
        if len(waves) > 1:
            self.layer_paths["multi_wave"] += 1
        for i, wave in enumerate(waves):
            keys = [(layer, e) for e in wave]
            self.res.demand(keys)
            if i == 0:
                self._release_held()
                self.res.drop_stale_preempted(layer)
            views = self._views(mod, layer, wave)
            if (
                not on_cpu
                and len(waves) == 1
                and single_call_is_exact(top_k_index.shape[-1], views)
            ):
                for key in keys:
                    self.res.wait(key)
                out = run_on_slots(mod, views, hidden, top_k_index, top_k_weights)
                self._used(keys, counts)
                self.layer_paths["single_call"] += 1
            else:  # one expert at a time, ascending: the library's own summation order
                by_dev = {v.device_index: v for v in views}
                for key in keys:
                    out = add_host_outputs(
                        self, out, on_cpu, key[1]
                    )  # CPU experts of lower ids first
                    self.res.wait(key)
                    view = by_dev[self.placement.device_of(key)]
                    out = out + run_one_expert(
                        mod, view, key[1], hidden, top_k_index, top_k_weights
                    )
                    self._used([key], counts)
                self.layer_paths["per_expert"] += 1
            self.res.release(keys)
        if not waves:
            self._release_held()
        out = add_host_outputs(self, out, on_cpu, None)
        self.res.end_layer(layer)
        self.layer_steps += 1
        self._pump()
        return out

    def _gate(
        self, layer: int, hidden: torch.Tensor, ids: np.ndarray, weights: torch.Tensor
    ) -> None:
        """The gate event (and the recorder's rows): real rows only."""
        wts = weights.detach().float().cpu().numpy()
        probs = self.taps.probs(layer)
        real = self._real_np
        if real is not None:
            ids, wts = ids[real], wts[real]
            probs = probs[real] if probs is not None else None
            hidden = self._rows.select(hidden) if self._rows is not None else hidden
        look = self.taps.lookahead(layer, hidden) if self._lookahead else None
        if self.recorder is not None:
            self.recorder.gate(layer, ids, wts, probs, look)
        la = look if self.policy.wants_lookahead else None
        now = self.now()
        self._view.note_gate(self.iteration, now)
        self.driver.observe(GateOutput(self.iteration, layer, ids, wts, probs, la, now))

    def _views(self, mod: OffloadedExperts, layer: int, experts: list[int]) -> list[SlotView]:
        by_dev: dict[int, dict[int, int]] = {}
        for e in experts:
            d = self.placement.device_of((layer, e))
            by_dev.setdefault(d, {})[e] = self.res.devs[d].pool.slot_of[(layer, e)]
        out = []
        for d, slot_of in sorted(by_dev.items()):
            dev = self.res.devs[d]
            out.append(
                SlotView(dev.pool.views(mod.layout), dev.pool.capacity, dev.device, slot_of, d)
            )
        return out

    def _used(self, keys: list[ExpertKey], counts: np.ndarray) -> None:
        now = self.now()
        self.res.use(keys, now)
        for key in keys:
            self.driver.observe(ExpertUsed(key, int(counts[key[1]]), now))

    # -- decisions ------------------------------------------------------------------------------
    def _pump(self) -> None:
        now = self.now()
        for key, by_prefetch in self.res.take_landed():
            self.driver.observe(LoadFinished(key, by_prefetch, now))
        self.driver.pump()

    def _apply(self, dec: PrefetchDecision, stamp: int) -> None:
        """Apply a decision made for an event seen at gate sequence number ``stamp``.

        Thread-safe: an async policy's searcher calls it from its own thread. Between a
        gate and that gate's demand loads, decisions are held and applied right after the
        demand loads (the simulator's order: the gate's orders go after its demand loads)."""
        with self._apply_lock:
            if self._held is not None:
                self._held.append((dec, stamp))
                return
            self._apply_now(dec, stamp)

    def _apply_now(self, dec: PrefetchDecision, stamp: int) -> None:
        for key in dec.cancel:
            self.res.cancel(key)
        for order in dec.enqueue:
            validate_order(order, self.spec)
            self.res.order(order.key, order.priority, stamp)

    def _release_held(self) -> None:
        # under the lock: held decisions go before any the searcher makes meanwhile
        with self._apply_lock:
            held, self._held = self._held, None
            for dec, stamp in held or []:
                self._apply_now(dec, stamp)
