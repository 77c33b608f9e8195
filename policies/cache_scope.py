"""Cache scope: one pool of slots per device (``global``) or an equal share per MoE layer
(``per-layer``, as llama.cpp's ``--moe-expert-cache`` and vLLM's per-layer expert cache).

:class:`LayerScopedCache` is an :class:`~policies.cache.ExpertCache` whose every MoE
layer may hold at most ``layer_capacity`` entries (LOADING or RESIDENT) on the device: a
load into a full layer evicts one of that layer's own entries (by the policy's scores,
unprotected ones first), never another layer's. Everything else is ExpertCache's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from policies.cache import (
    CacheEntry,
    CacheFullError,
    EvictionScores,
    ExpertCache,
    ExpertKey,
    ExpertState,
    lru_scores,
)
from specs.errors import InputError

CacheScope = Literal["global", "per-layer"]
CACHE_SCOPES: tuple[str, ...] = ("global", "per-layer")
_RESIDENT = ExpertState.RESIDENT


@dataclass(eq=False)
class LayerScopedCache(ExpertCache):
    """An expert cache with at most ``layer_capacity`` entries per MoE layer."""

    layer_capacity: int = 1
    _per_layer: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    # each layer's entries: a full layer's victim is searched among them only
    _layer_keys: dict[int, dict[ExpertKey, None]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_capacity < 1:
            raise InputError(f"device {self.device}: per-layer capacity must be >= 1")
        for key in self.entries:
            self._add(key)

    def _add(self, key: ExpertKey) -> None:
        self._per_layer[key[0]] = self._per_layer.get(key[0], 0) + 1
        self._layer_keys.setdefault(key[0], {})[key] = None

    def _remove(self, key: ExpertKey) -> None:
        self._per_layer[key[0]] -= 1
        del self._layer_keys[key[0]][key]

    def layer_used(self, layer: int) -> int:
        """Entries (LOADING or RESIDENT) of ``layer`` on this device."""
        return self._per_layer.get(layer, 0)

    def _layer_victim(self, layer: int, scores: EvictionScores) -> CacheEntry | None:
        entries = self.entries
        values = [entries[k] for k in self._layer_keys.get(layer, ())]
        for protected_ok in (False, True):
            group = [
                e
                for e in values
                if e.state is _RESIDENT and not e.pins and (protected_ok or not e.protected)
            ]
            if group:
                sc = scores(group)
                return min(zip(sc, [e.key for e in group], group, strict=True))[2]
        return None

    def begin_load(
        self,
        key: ExpertKey,
        now: float,
        *,
        prefetch: bool,
        scores: EvictionScores = lru_scores,
        pin: bool = False,
    ) -> list[ExpertKey]:
        """As :meth:`ExpertCache.begin_load`, but a full layer first evicts its own entry
        (CacheFullError when all of that layer's entries are pinned or loading)."""
        layer = key[0]
        evicted: list[ExpertKey] = []
        if key not in self.entries:
            while self._per_layer.get(layer, 0) >= self.layer_capacity:
                victim = self._layer_victim(layer, scores)
                if victim is None:
                    raise CacheFullError(
                        f"device {self.device}: layer {layer}'s {self.layer_capacity} slots "
                        "pinned or loading"
                    )
                self._drop_evicted(victim)
                evicted.append(victim.key)
        evicted += super().begin_load(key, now, prefetch=prefetch, scores=scores, pin=pin)
        self._add(key)
        return evicted

    def cancel_load(self, key: ExpertKey) -> None:
        super().cancel_load(key)
        self._remove(key)

    def _drop_evicted(self, e: CacheEntry) -> None:
        super()._drop_evicted(e)
        self._remove(e.key)

    def preload(self, keys: Iterable[ExpertKey], now: float = 0.0) -> None:
        """Preload the keys whose layer has room (others are left out, not an error)."""
        for key in keys:
            if key in self.entries or self._per_layer.get(key[0], 0) >= self.layer_capacity:
                continue
            super().preload([key], now)
            self._add(key)


def make_caches(
    capacities: list[int],
    expert_bytes: int,
    scope: str,
    num_layers: int,
    top_k: int,
) -> list[ExpertCache]:
    """One cache per device: plain for ``global``; for ``per-layer`` each device's
    capacity split equally over the ``num_layers`` MoE layers (the remainder unused).
    InputError when per-layer scope has fewer slots in all than layers x top-K."""
    if scope == "global":
        return [ExpertCache(c, expert_bytes, device=d) for d, c in enumerate(capacities)]
    if scope != "per-layer":
        raise InputError(
            f"--cache-scope: unknown scope {scope!r} (one of {', '.join(CACHE_SCOPES)})"
        )
    total = sum(capacities)
    if total < num_layers * top_k or any(c < num_layers for c in capacities):
        raise InputError(
            f"--cache-scope per-layer: {total} expert slots are fewer than layers x top-K "
            f"= {num_layers} x {top_k} = {num_layers * top_k} (or a GPU has fewer slots than "
            "layers); give a larger --cache-gb/--cache-experts or --cache-scope global"
        )
    return [
        LayerScopedCache(
            c // num_layers * num_layers, expert_bytes, device=d, layer_capacity=c // num_layers
        )
        for d, c in enumerate(capacities)
    ]
