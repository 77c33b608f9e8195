"""``fmoe-hybrid``: Fiddler's cost rule and static placement, plus fMoE's predictions
wherever a stated cost comparison says they save time. Exact (fetch or CPU only).

Every rule compares expected seconds from the executor's view
(``PolicyContext.executor``); no rule has a tuned constant:

- **miss**: fetch the expert when its copy (behind the link's queue) lands no later than
  a CPU task (behind the CPU's queue, activations both ways) returns, else the CPU: the
  comparison Fiddler makes. A late prefetch (its copy under way) counts only what is
  left of its copy.
- **placement and eviction**: the training maps' most used experts are placed before
  the run, all slots but one per GPU (the staging slot a fetch or prefetch lands in).
  With hybrid execution a missed expert is not copied back (the CPU serves it), so
  evicting an expert costs all its uses until some later copy brings it back, not just
  its next one: the victim is the one with the lowest long-run use rate, and the
  training counts are that rate. Evicted first: an expert copied during the run that
  fMoE does not forecast for a layer still ahead in this iteration (least recently used
  first); then a placed one (least used in training first); last an expert forecast for
  a layer still ahead (it is likely used within this iteration). Without forecasts this
  is Fiddler's order (``fiddler``'s ``placement_scores``).
- **prefetch**: an order fMoE's searches make (FMOE_ALGORITHM.md steps 1-4) is kept
  only when (a) its link is otherwise idle (a queued prefetch delays demand copies),
  (b) it lands before its layer runs (the copies ahead of it plus one copy, against the
  layers until its layer times the expected layer time), (c) its slot is free or held by
  a copied, unforecast expert (a placed or forecast expert is worth more than one use,
  rule above) and (d) its expected saving exceeds its expected cost:
  ``P(used) x saved > P_victim x saved + busy x copy_s x copy_slowdown
  + fetch_rate x copy_s^2 / 2``. ``P(used)`` is the chance an fMoE prefetch candidate of
  that probability bin is used, counted in this run over the candidates only (experts
  not cached when ordered; one pseudo-observation at the uninformed K/J per bin);
  ``saved`` the time its use would take without the copy (the cheaper of one copy and
  one CPU task for the rows it expects); ``P_victim`` one iteration's use of the victim
  at its training rate; then the CPU's expert work lost to the host memory the copy
  reads while the CPU is busy (``busy``: the CPU's share of a layer step), and the
  demand copies (their rate so far) that arrive while it holds the link, each waiting
  half a copy on average.

With a profile without host figures every miss is a fetch and every fMoE order is kept
(plain fMoE with the placement above).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

import numpy as np

from policies.base import (
    GateOutput,
    IterationStart,
    MissAction,
    PrefetchDecision,
    PrefetchOrder,
    guarded,
)
from policies.cache import CacheEntry, ExpertKey, ExpertState
from policies.fmoe import FmoePolicy
from policies.hybrid_common import PLACED, HotPlacement, fetch_and_cpu_s
from policies.registry import register_policy

BINS = 10  # probability bins of the forecasts' measured chance of use
FORECAST = 2 * PLACED  # eviction score base of an expert forecast for a layer ahead


class _KeysOf:
    """The keys (layer, expert) set in a [L, J] bool array, as a container."""

    __slots__ = ("a",)

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __contains__(self, key: object) -> bool:
        return bool(self.a[key])  # type: ignore[index]

    def __bool__(self) -> bool:
        return bool(self.a.any())


@register_policy
class FmoeHybrid(HotPlacement, FmoePolicy):
    name = "fmoe-hybrid"
    description = (
        "Fiddler's cost rule and static placement; fMoE's forecasts protect and prefetch "
        "where the expected saving exceeds the expected cost"
    )
    miss_action_on_loading = True  # a late prefetch may lose to the CPU too
    staging_slots = 1

    def bind(self, ctx: Any) -> None:
        super().bind(ctx)
        if ctx.cache_guard is not None:  # it walks a cache's entries (real executor)
            self._victims = guarded(self._victims, ctx.cache_guard)
        self._fc_n = np.zeros(BINS)  # forecasts per probability bin
        self._fc_hit = np.zeros(BINS)  # of which the layer chose the expert
        self._hstats = {"kept": 0, "late": 0, "busy_link": 0, "slot": 0, "value": 0}
        self._tokens = 1.0
        self._cands: dict[ExpertKey, int] = {}  # this iteration's orders: key -> bin
        self._fetches = 0  # demand fetches decided (their rate: the link's demand load)
        self._t0: float | None = None
        self._now_s = 0.0

    def fit(self, training: Any) -> None:
        super().fit(training)
        self._tokens = float(max(self._hot_counts[0].sum() / training.spec.top_k, 1.0))  # type: ignore[index]

    def metadata(self) -> dict[str, Any]:
        out = super().metadata()
        n = getattr(self, "_fc_n", None)
        if n is not None:
            out["hybrid_prefetch"] = dict(self._hstats)
            out["forecast_chance_by_bin"] = [round(float(c), 4) for c in self._chance_table()]
        return out

    # -- miss --------------------------------------------------------------------------------
    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        view = None if self.ctx is None else self.ctx.executor
        if view is None or view.cpu_state() is None:
            return MissAction.FETCH
        fetch, cpu = fetch_and_cpu_s(self.ctx, key, tokens)
        loading = self.ctx.cache_of(key).state(key) is ExpertState.LOADING  # type: ignore[union-attr]
        if loading:
            # its copy is under way: at most the link's queue is left of it
            fetch -= view.link_state(self.ctx.placement.device_of(key)).copy_s  # type: ignore[union-attr]
        act = MissAction.FETCH if fetch <= cpu else MissAction.CPU
        if act is MissAction.FETCH and not loading and hasattr(self, "_fetches"):
            self._fetches += 1
        return act

    # -- eviction ----------------------------------------------------------------------------
    def _forecast_ahead(self) -> Container[ExpertKey]:
        """fMoE's selected experts for layers still ahead in this iteration (the ones its
        own eviction protects): a set of keys, or a [L, J] bool array where fMoE keeps
        them that way."""
        prot = getattr(self, "_prot", None)
        if isinstance(prot, np.ndarray):
            return _KeysOf(prot)
        keys = getattr(self, "_protect", None)
        return keys if isinstance(keys, set) else set()

    def eviction_score(self, entry: CacheEntry) -> float:
        return self.eviction_scores([entry])[0]

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        base = self.placement_scores(entries)
        ahead = self._forecast_ahead()
        if not ahead:
            return base
        return [FORECAST + s if e.key in ahead else s for e, s in zip(entries, base, strict=True)]

    # -- the forecasts' measured chance of use -------------------------------------------------
    def _bin(self, p: float) -> int:
        return min(max(int(p * BINS), 0), BINS - 1)

    def _chance_table(self) -> np.ndarray:
        spec = self.ctx.spec if self.ctx is not None else None
        prior = spec.top_k / spec.num_experts if spec is not None else 0.0
        return (self._fc_hit + prior) / (self._fc_n + 1.0)

    def on_iteration_start(self, ev: IterationStart) -> None:
        self._at_layer, self._rows = -1, max(1, len(ev.request_ids))
        if hasattr(self, "_cands"):
            self._cands = {}
            if self._t0 is None:
                self._t0 = ev.now
            self._now_s = ev.now
        super().on_iteration_start(ev)

    def on_gate_now(self, ev: GateOutput) -> None:
        """Count each of this iteration's prefetch candidates for this layer as used or
        not, by its probability bin (candidates only: fMoE orders experts not cached,
        and those are used less often than cached forecasts); then fMoE's step (the part
        without the search; on_gate, fMoE's, runs the search)."""
        g = int(ev.layer)
        if getattr(self, "_cands", None):
            chosen = set(np.unique(ev.topk_ids).tolist())
            for key in [k for k in self._cands if k[0] == g]:
                b = self._cands.pop(key)
                self._fc_n[b] += 1
                self._fc_hit[b] += key[1] in chosen
        self._at_layer, self._rows = g, max(1, len(ev.topk_ids))
        if hasattr(self, "_cands"):
            self._now_s = ev.now
        super().on_gate_now(ev)

    # -- prefetch ----------------------------------------------------------------------------
    def decide_prefetch(self) -> PrefetchDecision:
        """fMoE's orders, kept only by rules (a)-(d) of the module doc. Without a CPU
        view every order is kept (plain fMoE)."""
        dec = super().decide_prefetch()
        ctx = self.ctx
        view = None if ctx is None else ctx.executor
        if not dec.enqueue or view is None or view.cpu_state() is None:
            return dec
        assert ctx is not None
        L = ctx.spec.num_moe_layers
        at = getattr(self, "_at_layer", -1)
        cpu = view.cpu_state()
        layer_s, busy = self._layer_estimate_s(view)
        rows = self._expert_rows()
        chance = self._chance_table()
        pred = getattr(self, "_pred", None)
        ahead: dict[int, float] = {}  # link seconds ahead of the next kept order, per device
        victims: dict[int, list[CacheEntry | None]] = {}
        kept: list[PrefetchOrder] = []
        st = self._hstats
        elapsed = self._now_s - (self._t0 if self._t0 is not None else self._now_s)
        fetch_rate = self._fetches / elapsed / len(ctx.caches) if elapsed > 0 else 0.0
        for order in sorted(dec.enqueue, key=lambda o: -o.priority):
            dev = ctx.placement.device_of(order.key)
            p = pred[order.layer][order.expert] if pred else ctx.spec.top_k / ctx.spec.num_experts
            if order.layer > at:
                self._cands.setdefault(order.key, self._bin(p))
            link = view.link_state(dev)
            if dev not in ahead:
                ahead[dev] = link.queued_s
            if ahead[dev] > 0.0 and not any(ctx.placement.device_of(o.key) == dev for o in kept):
                st["busy_link"] += 1  # (a) demand copies (or others' copies) queued
                continue
            layers = order.layer - at if order.layer > at else order.layer + L - at
            arrive = ahead[dev] + link.copy_s
            if arrive > layers * layer_s:
                st["late"] += 1  # (b)
                continue
            if dev not in victims:
                victims[dev] = self._victims(dev)
            queue = victims[dev]
            victim = queue[0] if queue else None
            if not queue or (victim is not None and self._valued(victim)):
                st["slot"] += 1  # (c) only a placed or forecast expert could make room
                continue
            saved = min(link.copy_s, cpu.expert_s_fixed + rows * cpu.expert_s_per_token)
            gain = float(chance[self._bin(p)]) * saved
            # the CPU's work lost to the copy's memory reads, and the demand copies that
            # arrive while it holds the link (each waits half a copy on average)
            loss = busy * link.copy_s * cpu.copy_slowdown
            loss += fetch_rate * link.copy_s * link.copy_s / 2
            if victim is not None:
                loss += self._iteration_chance(victim.key) * saved
            if gain <= loss:
                st["value"] += 1  # (d)
                continue
            if queue:
                queue.pop(0)
            ahead[dev] = arrive
            kept.append(order)
            st["kept"] += 1
        dec.enqueue = kept
        return dec

    def _victims(self, dev: int) -> list[CacheEntry | None]:
        """The entries a load on ``dev`` would evict, in order (a None per free slot
        first); only the first few matter."""
        assert self.ctx is not None
        cache = self.ctx.caches[dev]
        out: list[CacheEntry | None] = [None] * max(cache.free, 0)
        group = [
            e for e in cache.entries.values() if e.state is ExpertState.RESIDENT and not e.pins
        ]
        scores = self.eviction_scores(group)
        order = sorted(range(len(group)), key=lambda i: (group[i].protected, scores[i]))
        out.extend(group[i] for i in order[:8])
        return out

    def _valued(self, entry: CacheEntry) -> bool:
        """A placed expert or one forecast for a layer ahead (rule (c))."""
        return entry.key in self.placed or entry.key in self._forecast_ahead()

    def _iteration_chance(self, key: ExpertKey) -> float:
        """Chance ``key`` is used in one iteration of the current batch, at its training
        rate per token (K/J without training counts)."""
        assert self.ctx is not None
        counts = self._hot_counts
        spec = self.ctx.spec
        rate = spec.top_k / spec.num_experts if counts is None else counts[key] / self._tokens
        return 1.0 - (1.0 - min(float(rate), 1.0)) ** getattr(self, "_rows", 1)

    def _expert_rows(self) -> float:
        """Rows one demanded expert serves on average in this batch."""
        assert self.ctx is not None
        spec = self.ctx.spec
        rows = getattr(self, "_rows", 1)
        distinct = spec.num_experts * (1.0 - (1.0 - spec.top_k / spec.num_experts) ** rows)
        return max(1.0, rows * spec.top_k / max(distinct, 1e-9))

    def _layer_estimate_s(self, view: Any) -> tuple[float, float]:
        """(one MoE layer step now, the CPU's busy share of it): the GPU part, or the CPU
        serving the share of the layer's experts that miss (the run's miss rate so far),
        whichever is longer."""
        assert self.ctx is not None
        spec = self.ctx.spec
        rows = getattr(self, "_rows", 1)
        experts = min(rows * spec.top_k, spec.num_experts)
        demands = sum(c.counters.demands for c in self.ctx.caches)
        misses = sum(c.counters.misses for c in self.ctx.caches)
        miss_rate = misses / demands if demands else 1.0
        cpu = view.cpu_state()
        per_expert_rows = rows * spec.top_k / experts
        cpu_s = (
            experts * miss_rate * (cpu.expert_s_fixed + per_expert_rows * cpu.expert_s_per_token)
        )
        layer = max(view.layer_time_s(rows), cpu_s)
        return layer, (min(1.0, cpu_s / layer) if layer > 0 else 0.0)
