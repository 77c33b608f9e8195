"""``mixtral-offloading``: per-layer LRU expert cache plus speculative next-layer prefetch.

After layer l's gate, Mixtral-Offloading applies layer l+1's gate to layer l's hidden
state and prefetches the top experts that guess names. Traces carry that guess as the
lookahead row (``GateOutput.lookahead``); each batch row votes for its top
``prefetch_top_k`` experts (default: the model's top-K) and the union is ordered, most
probable first, within what the device caches hold next to layer l's own experts.

The lookahead reaches one layer, so ``--prefetch-distance`` does not apply. Without
lookahead rows (a trace that lacks them, or an executor that cannot compute them) it
falls back to on-demand loading with the LRU cache only; ``metadata()`` says
which mode the run used.

Caching: the real system gives each layer a fixed share of the GPU slots with an LRU per
layer. We keep the shared cache and approximate that with the eviction score: experts of
layers holding more than their share (device capacity / L) go first, least recent
first, then the least recent of all. When layer l needs a slot and every layer is at its
share, the global LRU victim lies in the layer visited longest ago, which then takes its
slot back from layer l next time, the same victims a per-layer LRU picks in steady state.
``per_layer_share=False`` gives a plain global LRU.

Its gate also exists as compiled code (:meth:`MixtralOffloading.compiled_gate`,
:mod:`policies.mixtral_offloading_jit`): the simulator's prefetching kernel calls it in
place of ``on_gate`` (same orders and counts; the Python hook stays the reference).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from policies.base import GateOutput, Policy, PolicyContext, PolicyOptions
from policies.baseline_common import SCORE_SCALE, layer_reserve, select_orders, union_top
from policies.cache import CacheEntry
from policies.compiled_gate import CompiledGate
from policies.registry import register_policy


class MixtralOffloadingOptions(PolicyOptions):
    prefetch_top_k: int | None = Field(
        default=None,
        ge=1,
        description="experts each row's lookahead prefetches (default: the model's top-K)",
    )
    per_layer_share: bool = Field(
        default=True, description="evict first from layers over their share of slots"
    )


@register_policy
class MixtralOffloading(Policy):
    name = "mixtral-offloading"
    description = (
        "Mixtral-Offloading: per-layer LRU cache + speculative prefetch of the next layer's "
        "top experts "
        "from the lookahead row (on-demand LRU when the trace has none)"
    )
    Options = MixtralOffloadingOptions
    wants_lookahead = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._gates = 0
        self._speculated = 0
        self._gate_pi: np.ndarray | None = None  # the compiled gate's counts live there

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        L = ctx.spec.num_moe_layers
        self._shares = [c.capacity / L for c in ctx.caches]
        self._versions: list[tuple | None] = [None] * len(ctx.caches)
        self._over: list[list[bool]] = [[False] * L for _ in ctx.caches]
        self._J, self._ndev = ctx.spec.num_experts, ctx.placement.num_devices

    def on_gate(self, ev: GateOutput) -> None:
        self._gates += 1
        nxt = ev.layer + 1
        if ev.lookahead is None or nxt >= self.ctx.spec.num_moe_layers:
            return
        self._speculated += 1
        n = self.options.prefetch_top_k or self.ctx.spec.top_k
        votes = union_top(np.asarray(ev.lookahead, dtype=np.float64), n)
        experts = np.flatnonzero(votes > 0)
        orders = select_orders(
            self.ctx,
            votes[experts],
            np.full(experts.size, nxt),
            experts,
            layer_reserve(self.ctx, ev.layer, ev.topk_ids),
        )
        for o in orders:
            self.prefetch(o.layer, o.expert, o.priority)

    def compiled_gate(self) -> CompiledGate | None:
        """``on_gate``'s orders in numba (:mod:`policies.mixtral_offloading_jit`), for a
        compiled executor's kernel (its gate and speculation counts kept in ``pi``)."""
        from policies import mixtral_offloading_jit as jit

        ctx = self.ctx
        if len(ctx.caches) != ctx.placement.num_devices:
            return None  # select_orders' budget and devices would not line up
        J = ctx.spec.num_experts
        n = self.options.prefetch_top_k or ctx.spec.top_k
        pi = jit.int_state(ctx.spec.num_moe_layers, J, ctx.placement.num_devices, n)
        self._gate_pi = pi
        return CompiledGate(jit.lookahead_gate, pi, jit.float_state(J))

    def _counts(self) -> tuple[int, int]:
        """(gates, gates with lookahead): the Python hook's and the compiled gate's."""
        g, s = self._gates, self._speculated
        if self._gate_pi is not None:
            from policies.mixtral_offloading_jit import P_GATES, P_SPEC

            g, s = g + int(self._gate_pi[P_GATES]), s + int(self._gate_pi[P_SPEC])
        return g, s

    def _over_share(self, d: int, layer: int) -> bool:
        """Whether ``layer`` holds more than its share of device ``d``'s slots."""
        cache = self.ctx.caches[d]
        c = cache.counters
        version = (c.loads, c.evictions, c.prefetches_cancelled, len(cache.entries))
        if version != self._versions[d]:  # recount once per cache change, not per scored entry
            counts = [0] * self.ctx.spec.num_moe_layers
            for k in cache.entries:
                counts[k[0]] += 1
            share = self._shares[d]
            self._over[d] = [n > share for n in counts]
            self._versions[d] = version
        return self._over[d][layer]

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: over-share layers' least recent experts, then the least recent."""
        if not self.options.per_layer_share:
            return entry.last_used
        layer, e = entry.key
        d = (layer * self._J + e) % self._ndev  # placement.device_of, inlined: hot path
        if self._over_share(d, layer):
            return entry.last_used
        return entry.last_used + SCORE_SCALE

    def metadata(self) -> dict[str, Any]:
        gates, speculated = self._counts()
        if gates == 0:
            mode = "not run"
        elif speculated:
            mode = "lookahead: next layer's gate on this layer's hidden state"
        else:
            mode = "none: no lookahead rows, on-demand loading with the LRU cache only"
        return {
            **super().metadata(),
            "speculation": mode,
            "gates_with_lookahead": speculated,
            "gates": gates,
        }
