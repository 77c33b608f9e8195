"""``llama-cpp``: llama.cpp's hybrid offload: the experts of the first N MoE layers stay in
host memory and run on the CPU (``--n-cpu-moe N``), the other layers' experts live on
the GPU; plus llama.cpp's per-layer expert LRU for the host layers with a cap on
uploads per layer per decode step.

Sources: ggml-org/llama.cpp ``--n-cpu-moe`` (``-ot exps=CPU`` for all layers), and the
expert cache of llama.cpp PR #27861 (``--moe-expert-cache N``: N slots per host-resident
expert layer, plain LRU per layer; ``--moe-expert-cache-inserts``: uploads per layer per
step; cached experts run from VRAM, the rest on the host path), as summarised in
HYBRID_FIGURES.md section 5 (copied in docs/hybrid.md).

Here: ``n_cpu_moe`` counts MoE layers (llama.cpp counts decoder layers; they are the same
for models without dense layers). ``None`` (default): the fewest host layers that let the
GPU layers' experts fit the cache budget. GPU layers' experts are preloaded and never
evicted; the remaining slots are split equally over the host layers (``slots`` per
layer), each an LRU of its own: a miss in a host layer is an upload (FETCH) while the
layer's uploads this iteration are below ``uploads_per_step`` and it has a slot, else the
expert runs on the CPU. ``uploads_per_step`` 0 turns the cache off (plain ``--n-cpu-moe``).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from policies.base import IterationStart, MissAction, Policy, PolicyContext, PolicyOptions
from policies.cache import CacheEntry, ExpertKey
from policies.hybrid_common import HOT, preload
from policies.registry import register_policy
from specs.errors import InputError


class LlamaCppOptions(PolicyOptions):
    n_cpu_moe: int | None = Field(
        default=None, ge=0, description="first N MoE layers' experts on the CPU (None: fit)"
    )
    uploads_per_step: int = Field(
        default=2, ge=0, description="uploads per host layer per step (--moe-expert-cache-inserts)"
    )


@register_policy
class LlamaCpp(Policy):
    name = "llama-cpp"
    description = "--n-cpu-moe N: first N layers' experts on the CPU, per-layer expert LRU"
    Options = LlamaCppOptions
    options: LlamaCppOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.n_cpu = 0
        self.slots = 0
        self._uploads: list[int] = []
        self._layer = -1  # the layer whose misses are being served (eviction stays in it)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        L, J = ctx.spec.num_moe_layers, ctx.spec.num_experts
        cap = sum(c.capacity for c in ctx.caches)
        n = self.options.n_cpu_moe
        if n is None:
            n = min(L, max(0, L - cap // J))
        if n > L:
            raise InputError(f"policy 'llama-cpp': n_cpu_moe={n} exceeds the {L} MoE layers")
        gpu_keys = [(lay, e) for lay in range(n, L) for e in range(J)]
        if len(gpu_keys) > cap:
            raise InputError(
                f"policy 'llama-cpp': the GPU layers' {len(gpu_keys)} experts do not fit the "
                f"{cap}-expert cache; raise n_cpu_moe or the budget"
            )
        preload(ctx, gpu_keys)
        self.n_cpu = n
        self.slots = (cap - len(gpu_keys)) // n if n else 0
        self._uploads = [0] * L

    def on_iteration_start(self, ev: IterationStart) -> None:
        self._uploads = [0] * len(self._uploads)

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        lay = key[0]
        if lay >= self.n_cpu:  # a GPU layer's expert evicted under pressure: fetch back
            return MissAction.FETCH
        if self._uploads[lay] < self.options.uploads_per_step and self.slots > 0:
            self._uploads[lay] += 1
            self._layer = lay
            return MissAction.FETCH
        return MissAction.CPU

    def eviction_score(self, entry: CacheEntry) -> float:
        """GPU layers' experts last; an upload evicts the least recent expert of its own
        layer (the cache is full only when that layer holds its ``slots``: the others hold
        at most theirs, so a free slot exists otherwise)."""
        lay = entry.key[0]
        if lay >= self.n_cpu:
            return HOT
        if lay == self._layer:
            return entry.last_used
        return HOT / 2 + entry.last_used

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        n, own, hot, half = self.n_cpu, self._layer, HOT, HOT / 2
        return [
            hot if e.key[0] >= n else (e.last_used if e.key[0] == own else half + e.last_used)
            for e in entries
        ]
