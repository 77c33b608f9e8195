"""fMoE's layer-first eviction order, the shadow duel that chooses between it and the
expected-time order, and the hit-density order, as a mixin of
:class:`policies.fmoe.FmoePolicy` (``eviction_order="layer"``, ``"shadow"``,
``"density"``; docs/fmoe.md, "Router-only routing").

**Why a layer-first order.** Top-K routing visits the layers in turn and each visit needs
its layer's chosen experts resident together. Count a cache slot's *visits*: the gates of
its expert's layer it is resident at. Evicting an expert of the layer just visited (or of
a passed layer) and loading one of the current layer keeps every slot's next visit one
iteration away; evicting one of a layer still ahead in this iteration loses that visit,
and moving a slot from a passed layer to the current one delays its next visit by the
layers between them. Where every expert is equally likely at its visit (routing without
information), hits are chances times visits, and the order that evicts the expert whose
layer comes back last (Belady's rule with equal chances) is best. The expected-time order
(:mod:`policies.fmoe_eviction`) ranks across layers by the learned chance's geometric tail
(L / p steps), which on near-structureless routing swamps the few steps between layers:
on the Mixtral-shaped router-only trace it moved slots between layers at 79% of its decode
evictions (LRU: 9%), held 1.73 experts of a layer at its visit against LRU's 1.95, and its
better-chosen residents (per-resident chance 0.283 against 0.261) did not make up for it.
``layer``: the victim is from the layer whose next visit is furthest (the current gate's
layer, then the passed layers from the most recent back, then the layers ahead from the
furthest), and within that layer by the expected time to next use (by recency where the
learned chances are equal, as LRU). Protected experts stay last.

**The shadow duel** (``shadow``). Which of the two orders keeps more hits depends on the
routing (on synthetic Mixtral-8x7B routing the expected-time order's moves between layers
pay: docs/fmoe.md), so both are simulated on the demands the policy sees: one key-only
shadow cache per device and order, of the device's capacity, fed each gate's chosen
experts (demand loads only; the chosen experts of the gate are pinned, as the executor
pins them), evicting by its order's score of the moment. Unlike the one-decision regret
duel (``switch``), a shadow plays each order out, so the slots an order moves between
layers are counted. The cache follows the order whose shadow has more hits, changing only
when the other leads by more than two standard errors of the paired difference (a sign
test over the demands exactly one shadow hit: 2 sqrt(n); the conventional ~95% level, not
tuned); it starts with the expected-time order. Tables larger than
``policies.fmoe_eviction.EAGER_TABLE_MAX`` are not made at every gate and the shadows would
need them: there the expected-time order stays.

**Hit density** (``density``; LHD's criterion, Beckmann et al., NSDI 2018): the victim
is the entry with the fewest expected hits per slot-step of keeping it, max(P1 / t1, p /
L): its learned chance P1 at its layer's next visit t1 steps away (held that long), or
its chance p at later visits, one every L steps (held for many); with equal chances the
layer that comes back last goes first, as in ``layer``, and a much likelier expert of
another layer is kept over it. The victim in one kernel (policies.fmoe_density_jit).

**Measured, not the default** (docs/fmoe.md, "Router-only routing"; on main at 889603a,
before the token-to-token transitions, with which the default eviction is far ahead of
the layer-first order on the router-only trace). On the router-only
Mixtral-shaped trace ``layer`` wins all three one-GPU 25% settings and ``shadow`` (which
switches to it about a third of the way into the run) the hit rates only; on the
synthetic workload the shadows, which see demands alone, follow the layer-first order
where the real cache's prefetches make it the worse one (Qwen1.5-MoE 50% on the
testbed loses TPOT), and playing the training replay through the shadows first (no
forecasts there) held the layer-first order on the trained trace where with the maps'
forecasts the expected-time order was better.
"""

from __future__ import annotations

import numpy as np

from policies.cache import CacheEntry
from policies.cache_victims import CandidateArrays
from policies.fmoe_eviction import _TIE_EPS, AGE_BUCKETS, EAGER_TABLE_MAX


def _bucket(age: int) -> int:
    """fmoe_eviction.age_bucket of one age."""
    return 0 if age <= 1 else min((age - 1).bit_length(), AGE_BUCKETS - 1)


class FmoeShadow:
    """The layer-first order and the shadow duel (module doc)."""

    _shadow_on = False  # until bound
    _density_on = False

    def _setup_shadow(self, mode: str) -> None:
        """``mode``: the eviction order option (``layer``: follow the layer-first order;
        ``shadow``: the duel; anything else: neither)."""
        L, J = self._etnu.shape
        self._shadow_on = mode == "shadow" and L * J <= EAGER_TABLE_MAX
        self._shadow_layer = False  # the cache follows the layer-first order now
        self.shadow_hits = [0, 0]  # [expected-time shadow, layer-first shadow]
        self.shadow_diff = 0  # demands exactly one shadow hit
        self.shadow_switches = 0
        self._sh_mask: list[np.ndarray] = []  # per order: [device, L, J] resident
        self._sh_last = np.zeros((L, J), np.int64)  # gate step of each expert's last use
        self._sh_step = 0
        self._sh_cap: np.ndarray | None = None
        if mode == "layer":
            self._follow_layer(True)
        elif mode == "density":
            from policies import fmoe_density_jit  # numba: loaded at bind, not at import

            self._djit = fmoe_density_jit
            self._density_on = True
            self._scores_fast = False
            self._uses_on = True  # the cache asks victim_index (FmoeDuel dispatches here)
            self._scores = self._scores_density

    def _follow_layer(self, on: bool) -> None:
        """Point the cache's scorer at the layer-first order (``on``) or the expected time."""
        self._shadow_layer = on
        self._scores_fast = not on
        self._scores = self._scores_layer if on else self._scores_etnu
        self._vmemo = None
        self._ev += 1

    def shadow_metadata(self) -> dict[str, int | str]:
        """The duel's counts: each shadow's hits, the demands exactly one hit, the
        switches, and the order followed at the end."""
        return {
            "shadow_hits_time": self.shadow_hits[0],
            "shadow_hits_layer": self.shadow_hits[1],
            "shadow_demands_differing": self.shadow_diff,
            "shadow_switches": self.shadow_switches,
            "shadow_following": "layer" if self._shadow_layer else "time",
        }

    # -- the layer-first order -------------------------------------------------------------
    def _next_visit(self, layer: int, g: int) -> int:
        """Layer steps until ``layer``'s next visit after gate ``g``."""
        return layer - g if layer > g else self._etnu.shape[0] - g + layer

    def _scores_layer(self, entries: list[CacheEntry]) -> list[float]:
        """Lower goes first: the furthest next visit first, then the expected time's score
        (minus the expected time, plus the recency tie); protected experts last."""
        tab = self._etnu_table()
        g = self._g
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        vals = [tab[e.key] + tie * e.last_used for e in entries]
        span = 1.0 + max((-v for v in vals), default=0.0)  # beyond any score gap in a call
        return [
            float("inf") if tab[e.key] == 0.0 else v - span * self._next_visit(e.key[0], g)
            for e, v in zip(entries, vals, strict=True)
        ]

    def _scores_density(self, entries: list[CacheEntry]) -> list[float]:
        """Lower goes first: the expected hits per slot-step of keeping the entry (LHD's
        hit density): max(P1 / t1, p / L), P1 its learned chance at its layer's next
        visit t1 steps away, p at later visits (every L steps); protected last."""
        tab = self._fl_chance()
        ist, prot, fl, jit = self._ist, self._prot, self._fl, self._jit
        L, g, it, rows = ist.shape[1], self._g, self._cur_it, self._ev_rows
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        out = []
        for e in entries:
            lay, j = e.key
            if prot[lay, j]:
                out.append(float("inf"))
                continue
            age = it - int(ist[0, lay, j])
            off = jit.layer_row(fl, lay)
            freq = off + int(ist[3, lay, j])
            p = float(tab[freq, _bucket(max(age, 0) + 1)])
            if lay > g:
                row = off + int(ist[1, lay, j]) if ist[2, lay, 0] == it else freq
                p1 = float(tab[row, _bucket(age)])
                if rows > 1:
                    p1 = 1.0 - (1.0 - p1) ** rows
                t1 = lay - g
            else:
                p1, t1 = p, L - g + lay
            out.append(max(p1 / t1, p / L) + tie * e.last_used)
        return out

    def _density_victim_index(self, arr: CandidateArrays) -> int:
        """The density order's victim among the cache's candidate arrays in one kernel
        (what ``_scores_density`` and the cache's lowest pick give); -1 to score in Python."""
        if not self._pred or arr.n == 0:
            return -1
        tab = self._fl_chance()
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        i = self._djit.density_victim(
            self._ist, self._fl, self._prot, self._g, self._cur_it, self._ev_rows,
            arr.layers, arr.experts, arr.last_used, arr.n, tie,
        )  # fmt: skip
        del tab
        return int(i) if i >= 0 else -1

    # -- the shadow duel ---------------------------------------------------------------------
    def _shadow_gate(self, g: int, ids: np.ndarray) -> None:
        """Gate ``g`` of the served run chose ``ids``: both shadows serve the demand at the
        eviction's state of the moment (the cache's victims are chosen at it too)."""
        self._shadow_play(g, ids, np.asarray(self._etnu_table()))

    def _shadow_play(self, g: int, ids: np.ndarray, tab: np.ndarray) -> None:
        """Both shadows serve gate ``g``'s choice ``ids`` with ``tab`` (minus the expected
        times, protected 0); the cache follows the order whose shadow leads (module doc)."""
        ctx = self.ctx
        if ctx is None or not ctx.caches:
            return
        L, J = self._etnu.shape
        if self._sh_cap is None:
            n_dev = len(ctx.caches)
            self._sh_cap = np.array([c.capacity for c in ctx.caches], np.int64)
            self._sh_mask = [np.zeros((n_dev, L, J), np.bool_) for _ in range(2)]
            self._sh_used = [[0] * n_dev for _ in range(2)]  # entries per order and device
            self._sh_dev = np.array(
                [[ctx.placement.device_of((lay, j)) for j in range(J)] for lay in range(L)],
                np.int64,
            ).reshape(L, J)
        self._sh_step += 1
        chosen = np.unique(np.asarray(ids).ravel())
        prot = tab == 0.0
        dev = self._sh_dev[g, chosen]
        hit = [m[dev, g, chosen] for m in self._sh_mask]
        self.shadow_hits[0] += int(hit[0].sum())
        self.shadow_hits[1] += int(hit[1].sum())
        self.shadow_diff += int((hit[0] != hit[1]).sum())
        pinned = np.zeros((L, J), np.bool_)
        pinned[g, chosen] = True
        # the cache's score: minus the expected time, the least recent first on ties
        score = tab + self._sh_last * (_TIE_EPS / (self._sh_step + 1.0))
        lays = np.arange(L)
        visit = np.where(lays > g, lays - g, L - g + lays)  # _next_visit of every layer
        for order, mask in enumerate(self._sh_mask):
            used = self._sh_used[order]
            for k in np.flatnonzero(~hit[order]):
                d = int(dev[k])
                m = mask[d]
                if used[d] >= self._sh_cap[d]:
                    cand = m & ~pinned
                    if order == 1:  # layer-first: the furthest next visit with a candidate
                        free = cand & ~prot
                        has = free.any(axis=1)
                        if has.any():
                            lay = int(np.argmax(np.where(has, visit, -1)))
                            cand = np.zeros_like(cand)
                            cand[lay] = free[lay]
                    if not cand.any():
                        continue  # everything pinned: the executor would not load either
                    v = int(np.argmin(np.where(cand, score, np.inf)))
                    m.flat[v] = False
                    used[d] -= 1
                m[g, chosen[k]] = True
                used[d] += 1
        self._sh_last[g, chosen] = self._sh_step
        lead = self.shadow_hits[1] - self.shadow_hits[0]
        sig = 2.0 * self.shadow_diff**0.5
        if (lead > sig and not self._shadow_layer) or (-lead > sig and self._shadow_layer):
            self.shadow_switches += 1
            self._follow_layer(not self._shadow_layer)
