"""fMoE's eviction orders beyond the expected time to next use, as a mixin of
:class:`policies.fmoe.FmoePolicy`: the expected uses while resident (``eviction_order=
"uses"``) and the order learned against recency from counterfactual regrets (``"switch"``,
``"blend"``); all measured, none the default (docs/fmoe.md).

**Expected uses while resident** (``uses``). The time to the next use is MIN's criterion,
optimal for a known future; with chances in its place what an eviction loses is the uses
the victim would have had while it stayed. The cache keeps the experts with the most
expected uses while resident, the stay memoryless with the cache's measured residency H
(capacity over loads per layer step, Little's law): U = exp(-t1 / H) (P1 + p r / (1 - r)),
r = exp(-L / H), t1 the steps to its layer's next visit, P1 and p the learned chances
there and at later visits (:func:`policies.fmoe_uses_jit.expected_uses`). Short stays rank by
the next visit (MIN's order), long ones by the rate (LFU's). No constant is set.

The expected-time-to-next-use order (:mod:`policies.fmoe_eviction`, ``"time"``) is right
where the learned chances carry information. Where they carry none (routing whose reuse
is at chance), it still orders by something: the time until each expert's layer comes
back, which minimises the expected time of the *next* miss but not the number of misses,
and on such routing it can lose to LRU by luck of the draw. This module measures, online
and from the routing the policy sees, which of the two orders decides better *here*, and
follows it (ARC/LeCaR's idea: learn between two orders from regrets), so that without
information fMoE is not worse than recency beyond what the measurement's noise allows.

**The duel.** At every gate one device (in turn) whose cache is full is sampled: among
its eviction candidates (resident, unpinned, unprotected), ``a`` is the one the
expected-time order would evict, ``b`` the least recently used one (LRU's victim). If
they differ, the pair is a decision on which the two orders disagree; it is held for the
device's measured residency horizon H (layer steps an entry stays: the cache's capacity
over its loads per layer step, Little's law, measured from the cache's counters): if
``a`` is chosen by a gate within H, evicting it would have cost the expected-time order a
miss (its regret +1); if ``b`` is, recency's (+1). Both may happen. Nothing is evicted by
the duel: it judges a counterfactual single decision at the cache's real state, so the
scorer stays pure (the cache's contract) and the duel does not depend on which order
the cache followed.

**Using it.** ``switch``: the cache evicts by recency while recency's regret is below the
expected-time order's by more than two standard errors of their difference (2 sqrt(R_time
+ R_recency), counts' Poisson noise; the start and anything closer: the learned order).
``blend``: each entry's expected time becomes w x E + (1 - w) x A, A its age since last
use in layer steps (LRU's estimate of the time to its next use), w = (R_recency + 1) /
(R_time + R_recency + 2) in [0, 1] (one pseudo-regret each: a weak prior at 1/2, stated).
In both, the admission's victim listing follows the cache's order (``_victims_load``
scores with ``eviction_scores``) and prices the listed victim by its learned expected
time, as before.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from policies.cache import CacheEntry
from policies.cache_victims import CandidateArrays
from policies.fmoe_eviction import _TIE_EPS


class FmoeDuel:
    """The regret duel between the expected-time order and recency (module doc)."""

    _duel_on = False  # until bound
    _uses_on = False

    def _setup_duel(self, mode: str) -> None:
        """``mode``: ``time`` (no duel: the learned order alone), ``switch`` or ``blend``."""
        self._duel_mode = mode
        self._duel_on = mode != "time"  # the gate hook: steps (uses) and the duel
        self._duel_judge = mode in ("switch", "blend")
        self._uses_on = mode == "uses"
        if self._uses_on:
            from policies import fmoe_uses_jit  # numba: loaded at bind, not at import

            self._ujit = fmoe_uses_jit
        self._uses = np.zeros(self._etnu.shape)
        self._uses_mv = memoryview(self._uses)
        self.duel_regret = [0.0, 0.0]  # [expected-time order, recency]
        self.duel_pairs = 0  # disagreeing decisions judged
        self._duel_step = 0  # gates seen (layer steps)
        self._duel_t0: float | None = None  # time of the first gate (blend's step time)
        self._duel_open: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self._duel_fifo: deque[tuple[int, int, tuple[int, int], tuple[int, int]]] = deque()
        self._duel_recency = False  # switch: recency leads now
        self._duel_buf = (np.empty(1, np.int64), np.empty(1), np.empty(1))
        self._setup_shadow(mode)  # policies.fmoe_shadow: "layer" and "shadow"
        self._setup_window(mode)  # policies.fmoe_window: "window"

    @property
    def duel_weight(self) -> float:
        """The weight of the expected-time order, in [0, 1]: (R_recency + 1) / (R_time +
        R_recency + 2) (blend's w; switch follows recency while it is below 1/2's side)."""
        rt, rr = self.duel_regret
        return (rr + 1.0) / (rt + rr + 2.0)

    def _duel_gate(self, g: int, ids: np.ndarray) -> None:
        """Gate ``g`` chose ``ids``: judge the open pairs it resolves, open one more."""
        step = self._duel_step = self._duel_step + 1
        if self._duel_t0 is None:
            self._duel_t0 = self._now
        if self._shadow_on:
            self._shadow_gate(g, ids)
        if not self._duel_judge:
            return
        self._duel_resolve(g, ids, step)
        self._duel_sample(g, ids, step)
        self._duel_apply()

    def _duel_resolve(self, g: int, ids: np.ndarray, step: int) -> None:
        fifo, open_ = self._duel_fifo, self._duel_open
        while fifo and fifo[0][0] < step:  # expired pairs: nobody's regret
            _, pid, ka, kb = fifo.popleft()
            for k in (ka, kb):
                lst = open_.get(k)
                if lst is not None:
                    lst[:] = [t for t in lst if t[0] != pid]
                    if not lst:
                        del open_[k]
        if not open_:
            return
        reg = self.duel_regret
        for j in set(np.asarray(ids).ravel().tolist()):
            lst = open_.pop((g, int(j)), None)
            if lst is None:
                continue
            for _, role, exp in lst:
                if exp >= step:
                    reg[role] += 1.0

    def _duel_sample(self, g: int, ids: np.ndarray, step: int) -> None:
        ctx = self.ctx
        if ctx is None or not ctx.caches:
            return
        caches = ctx.caches
        cache = caches[step % len(caches)]
        if cache.free > 0:
            return
        arr = cache.candidate_arrays()
        n = arr.n
        if n < 2:
            return
        chosen = set(np.asarray(ids).ravel().tolist())
        lay, exp_, last = arr.layers[:n], arr.experts[:n], arr.last_used[:n]
        # LRU's victim: lowest last_used, ties to the lowest key (the cache's tie rule)
        b = int(np.lexsort((exp_, lay, last))[0])
        # the learned order's: its kernel over the candidates (what victim_index ranks)
        if self._chance_it != self._cur_it:
            self._chance()
        out, out_s, out_e = self._duel_buf
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        c = self._jit.victims(
            self._ist, self._fl, self._prot, self._g, self._cur_it, arr.layers, arr.experts,
            arr.last_used, n, tie, out, out_s, out_e, self._ev_rows,
        )  # fmt: skip
        if c <= 0:
            return
        a = int(out[0])
        if a == b:
            return
        ka = (int(lay[a]), int(exp_[a]))
        kb = (int(lay[b]), int(exp_[b]))
        if (ka[0] == g and ka[1] in chosen) or (kb[0] == g and kb[1] in chosen):
            return  # used at this very gate: not a decision either order would make
        expires = step + int(self._horizon(cache))
        pid = self.duel_pairs = self.duel_pairs + 1
        self._duel_open.setdefault(ka, []).append((pid, 0, expires))
        self._duel_open.setdefault(kb, []).append((pid, 1, expires))
        self._duel_fifo.append((expires, pid, ka, kb))

    def _duel_apply(self) -> None:
        """Point the cache's scorer at the order the regrets favour (switch), or keep the
        blend's (its weight is read per score)."""
        if self._duel_mode == "switch":
            rt, rr = self.duel_regret
            # recency only while its lead is beyond two standard errors of the difference
            # of two counts (the conventional ~95% level, not tuned; without it the
            # leader flipped on early noise and lost fMoE's long-run order: docs/fmoe.md)
            rec = rt - rr > 2.0 * (rt + rr) ** 0.5
            if rec != self._duel_recency:
                self._duel_recency = rec
                self._scores_fast = not rec
                self._scores = self._scores_recency if rec else self._scores_etnu
                self._vmemo = None
                self._ev += 1

    # -- scores ---------------------------------------------------------------------------
    def _horizon(self, cache: object) -> float:
        """The measured residency of ``cache``'s entries in layer steps: capacity over its
        loads per layer step once full (Little's law), the steps so far before."""
        steps = max(self._duel_step, 1)
        loads = cache.counters.loads - cache.capacity  # type: ignore[attr-defined]
        return cache.capacity * steps / loads if loads > 0 else float(steps)  # type: ignore[attr-defined]

    def _uses_victim_index(self, arr: CandidateArrays) -> int:
        """The ``uses`` order's victim among the cache's candidate arrays in one kernel
        (``fmoe_uses_jit.uses_victim``: what ``_scores_uses`` and the cache's lowest pick
        give); -1 (score in Python) before bind or on a NaN."""
        if self._density_on:  # eviction_order="density" (policies.fmoe_shadow)
            return self._density_victim_index(arr)
        if self._window_on:  # eviction_order="window" (policies.fmoe_window)
            return self._window_victim_index(arr)
        if not self._pred or self.ctx is None or arr.n == 0:
            return -1
        lay, j = int(arr.layers[0]), int(arr.experts[0])
        horizon = self._horizon(self._cache_of[lay][j])
        self._chance()
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        i = self._ujit.uses_victim(
            self._ist, self._fl, self._prot, self._g, self._cur_it, self._ev_rows, horizon,
            arr.layers, arr.experts, arr.last_used, arr.n, tie,
        )  # fmt: skip
        return int(i) if i >= 0 else -1

    def _scores_uses(self, entries: list[CacheEntry]) -> list[float]:
        """Expected uses while resident (``policies.fmoe_uses_jit.expected_uses``) at the
        horizon of the entries' cache; ties by recency. Before bind: recency."""
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if not self._pred or not entries or self.ctx is None:
            return [tie * e.last_used for e in entries]
        lay, j = entries[0].key
        horizon = self._horizon(self._cache_of[lay][j])
        self._chance()
        self._ujit.expected_uses(
            self._ist, self._fl, self._prot, self._uses, self._g, self._cur_it,
            self._ev_rows, horizon,
        )  # fmt: skip
        tab = self._uses_mv
        return [tab[e.key] + tie * e.last_used for e in entries]

    def _scores_recency(self, entries: list[CacheEntry]) -> list[float]:
        """LRU's scores (last use; the cache breaks ties by key)."""
        return [e.last_used for e in entries]

    def _scores_blend(self, entries: list[CacheEntry]) -> list[float]:
        """Minus w x E + (1 - w) x A (module doc), A = age since last use in layer steps
        at the measured mean layer step; ties by recency."""
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if not self._pred:
            return [tie * e.last_used for e in entries]
        tab = self._etnu_table()
        w = self.duel_weight
        t0 = self._duel_t0
        step_s = (self._now - t0) / self._duel_step if t0 is not None and self._duel_step else 0.0
        if step_s <= 0:
            return [tab[e.key] + tie * e.last_used for e in entries]
        now = self._now
        return [
            w * tab[e.key] - (1.0 - w) * (now - e.last_used) / step_s + tie * e.last_used
            for e in entries
        ]
