"""The price of a prefetch's victim in fMoE's deadline admission (``victim="priced"``), as
a mixin of :class:`policies.fmoe.FmoePolicy`.

A prefetch takes its slot when its copy starts, so it evicts its victim then, not when
its layer runs. The victim is gone from the copy's start until the moment a demand load
would have evicted something anyway: the copy's layer if its forecast is right, or, if it
is late or wrong, not before it lands (the wrong copy then holds a slot the victim could
have kept; a copy preempted by demand loads keeps its slot while it waits). That window
is ``W`` layer steps, W = max(land, layer) - start, with start and land counted as the
admission counts a copy's progress: at the link time a layer step leaves prefetches
(avail), after the copies ahead of it. Where demand loads fill the link, avail is small
and a copy holds its slot for many steps. If the victim is used within W, that use is a
miss: one demand load.

The victim's chance of a use within W comes from the eviction's own estimate of its
expected time to next use E (layer steps, :mod:`policies.fmoe_eviction`): waiting
memorylessly with mean E, P(use within W) = 1 - exp(-W / E). No constant is set: the
window follows from the link's queue, the copy time and the measured layer interval,
E from the learned chance table, and the victims are the ones the device's cache would
choose now (its ``free`` slots cost nothing; then the lowest eviction scores, in order,
one per admitted copy of that device).

Admission then asks the expected saving to beat both costs:
q x done > (1 - q) x (copy - done) x rho + P(victim used within W) x copy
(:mod:`policies.fmoe_deadline`). With forecasts that are never right (q = 0) nothing is
admitted. ``victim="ignored"`` keeps the earlier rule (no victim term).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from policies.cache import VICTIM_INDEX_MIN, CacheEntry
from policies.fmoe_eviction import _TIE_EPS

# victims listed per device and admission pass; past it the last one's price stands (a
# pass admits a handful of copies per link: its queue holds a few copy times at most)
VICTIMS_PRICED = 32
# the fmoe score's victims listed by one kernel call from as many candidates as the cache
# itself asks the kernel for its victim (VICTIM_INDEX_MIN; below it the arrays' upkeep
# costs more than it saves); False: the Python listing (tests compare the two end to end)
_LIST_KERNEL = True


class FmoeVictim:
    """Victims a device's next prefetches would evict, and their price."""

    _vl_bufs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the kernel's outputs

    def _victims_reset(self) -> None:
        """Forget the victim lists (a new admission pass: the caches may have changed)."""
        self._vq: dict[int, list[tuple[float, CacheEntry]]] = {}
        self._vfree: dict[int, int] = {}
        # the listed victims' expected times to next use, in the order they are taken
        # (lowest score first), where the compiled listing computed them (_victims_load)
        self._ve: dict[int, list[float]] = {}

    def _victim_price(
        self,
        dev: int,
        start_s: float,
        copy_s: float,
        ahead: int,
        avail_s: float,
        q: float | None = None,
        src: int = 0,
    ) -> float:
        """Expected demand-load seconds a copy on ``dev`` costs through its victim:
        P(victim used within W) x ``copy_s`` (module doc). The copy starts after
        ``start_s`` seconds of copies ahead of it on the link and its layer is ``ahead``
        steps away; the link gives prefetches ``avail_s`` seconds per layer step (demand
        loads preempt them: a prefetch moves only in the time they leave). With ``q`` (the
        copy's chance of use, victim="residence") and a measured residence R of unused
        copies (policies.fmoe_residence): (q x P(used within W) + (1 - q) x P(used within
        W + R)) x ``copy_s``."""
        if avail_s > 0:
            start = start_s / avail_s  # layer steps until it starts (and evicts)
            window = max(start + copy_s / avail_s, ahead) - start
        else:  # demand loads fill the link: it holds its slot at least until its layer
            step = self._interval or self._view.layer_time_s(self._rows)
            window = max(copy_s / step if step and step > 0 else 0.0, float(ahead))
        use = self._victim_use_chance(dev, window)
        if q is not None:
            r = self._residence_steps(src)
            if r > 0:
                use2 = self._victim_use_chance(dev, window, r)
                return (q * use + (1.0 - q) * use2) * copy_s
        return use * copy_s

    def _victim_use_chance(self, dev: int, window_steps: float, stay: float = 0.0) -> float:
        """The chance that the victim of ``dev``'s next copy is used within
        ``window_steps`` layer steps (0 while the device has a free slot), or, with
        ``stay`` > 0, within ``window_steps`` plus a memoryless stay of mean ``stay``
        steps (policies.fmoe_residence): 1 - exp(-W / E) x E / (E + stay), the
        expectation of 1 - exp(-(W + R) / E) over R ~ Exp(mean stay). The victim is not
        consumed: :meth:`_victim_take` does that when the copy is admitted."""
        if window_steps <= 0 or self.ctx is None:
            return 0.0
        if dev not in self._vfree:
            self._victims_load(dev)
        if self._vfree[dev] > 0 or not self._vq[dev]:
            return 0.0
        e = self.expected_next_use(*self._vq[dev][-1][1].key)
        if e <= 0:
            return 1.0
        if stay > 0:
            return 1.0 - math.exp(-window_steps / e) * (e / (e + stay))
        return 1.0 - math.exp(-window_steps / e)

    def _victim_take(self, dev: int) -> None:
        """A copy on ``dev`` was admitted: its victim (a free slot first) is taken."""
        if dev not in self._vfree:
            return
        if self._vfree[dev] > 0:
            self._vfree[dev] -= 1
        elif len(self._vq[dev]) > 1:  # past the list's end the last victim's price stands
            self._vq[dev].pop()

    def _victims_load(self, dev: int) -> None:
        """The device's free slots and its cheapest evictable entries (resident, unpinned,
        unprotected), lowest score last: the cache keeps that set (``ExpertCache._cands``),
        so no scan of every entry; the order is by (score, key), whatever the set's order.
        With the ``fmoe`` score the list comes from one kernel over the cache's candidate
        arrays (:meth:`_victims_listed`), with the victims' expected times (``_ve``)."""
        cache = self.ctx.caches[dev]
        self._vfree[dev] = cache.free
        if self._victims_direct(dev) and self._victims_listed(dev):
            return
        entries = list(cache._cands.values())
        scores = self.eviction_scores(entries) if entries else []
        # at most VICTIMS_PRICED per pass: an admission pass sends a few copies per link
        total = sum(scores)
        if _LIST_KERNEL and total == total:  # no NaN: a plain sort of (score, key, entry)
            # (keys are distinct: entries never compared) gives nsmallest's list
            keys = [e.key for e in entries]
            low = [(sc, e) for sc, _, e in sorted(zip(scores, keys, entries, strict=True))][
                :VICTIMS_PRICED
            ]
        else:
            low = heapq.nsmallest(
                VICTIMS_PRICED, zip(scores, entries, strict=True), key=lambda t: (t[0], t[1].key)
            )
        low.reverse()
        self._vq[dev] = low

    def _victims_direct(self, dev: int, small: bool = False) -> bool:
        """Whether ``dev``'s victims are listed by the kernel (:meth:`_victims_listed`):
        the ``fmoe`` score, and enough candidates (fewer: Python's list costs less than
        the kernel and the cache's arrays, unless ``small``: the admission kernel, whose
        expected times the Python list would score one by one, takes it at any size)."""
        return (
            _LIST_KERNEL
            and self._scores_fast
            and (small or len(self.ctx.caches[dev]._cands) >= VICTIM_INDEX_MIN)
        )

    def _victims_listed(self, dev: int) -> bool:
        """:meth:`_victims_load`'s list for the ``fmoe`` score from
        :func:`policies.fmoe_jit.victims` over the cache's candidate arrays: each
        candidate's score computed alone (the eviction table's value plus the recency
        tie, the same operations: no [L, J] table made), the lowest VICTIMS_PRICED by
        (score, key). False (nothing set) when a score is NaN: Python's sort then decides.
        What it reads first is what ``eviction_scores`` reads: this iteration's chance
        table, made now if the eviction table would have been made now."""
        c, arr = self._victims_kernel(dev)
        if c < 0:
            return False
        out, out_s, out_e = self._vl_bufs  # type: ignore[misc]
        entries = arr.entries
        low = list(zip(out_s[:c].tolist(), [entries[i] for i in out[:c].tolist()], strict=True))
        low.reverse()
        self._vq[dev] = low
        self._ve[dev] = [-e for e in out_e[:c].tolist()]
        return True

    def _victims_kernel(self, dev: int, most: int = VICTIMS_PRICED) -> tuple[int, object]:
        """:func:`policies.fmoe_jit.victims` over ``dev``'s cache's candidate arrays into
        ``_vl_bufs`` (slots, scores, expected times, lowest score first): (how many, the
        arrays), how many < 0 when a score is NaN. Reads this iteration's chance table
        first, made now if the eviction table would have been made now. ``most``: list
        at most that many (<= VICTIMS_PRICED; the first of a longer list, the same)."""
        if self._etnu_dirty:
            self._chance()  # _etnu_table's first step: the table's counts as of now
        arr = self.ctx.caches[dev].candidate_arrays()
        bufs = self._vl_bufs
        if bufs is None:
            bufs = self._vl_bufs = (
                np.empty(VICTIMS_PRICED, np.int64),
                np.empty(VICTIMS_PRICED),
                np.empty(VICTIMS_PRICED),
            )
        out, out_s, out_e = bufs
        if most < VICTIMS_PRICED:
            out, out_s, out_e = out[:most], out_s[:most], out_e[:most]
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        c = self._jit.victims(
            self._ist, self._fl, self._prot, self._g, self._cur_it, arr.layers, arr.experts,
            arr.last_used, arr.n, tie, out, out_s, out_e, self._ev_rows,
        )  # fmt: skip
        return c, arr
