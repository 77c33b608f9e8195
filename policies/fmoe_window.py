"""fMoE's characteristic-time eviction order (``eviction_order="window"``), as a mixin of
:class:`policies.fmoe.FmoePolicy`; measured in docs/fmoe.md, "The chance of use within
the cache's residence time".

What evicting an expert costs is one miss if it would have been used before the cache
evicted it anyway, nothing otherwise. The expected time to next use (the default order,
policies/fmoe_eviction.py) ranks by the mean of the whole wait, so a long tail far beyond
the time an entry can stay (a young expert whose chance falls quickly with age; a rare
expert of a layer that comes back soon) moves it as much as the part of the wait that
can still earn a hit. Che's approximation of a cache (Che, Tung and Wang, 2002; Fricker,
Robert and Roberts, 2012) treats an entry as staying a *characteristic time* T after
which it leaves unless used; the order here keeps the experts most likely to be used
within T: P = 1 - (1 - P1) prod_k (1 - p_k) over its layer's visits inside T, P1 the
chance at the next visit (the forecast's or request-frequency cell, transitions
included), p_k the later visits' cells at the age the expert will have then
(policies/fmoe_window_jit.py). Ties (both 0: their next visit lies beyond T) go by the
expected time to next use, then by recency.

T is measured, never set. ``window_time="residence"`` (the default): the cache's mean
residence, capacity over its loads per layer step once full (Little's law; the
measurement ``eviction_order="uses"`` makes, policies/fmoe_duel.py ``_horizon``), the
layer steps so far before. ``window_time="age"`` (Che's T itself): the mean age, since
its last use or load, at which this order's victims leave the cache (the layer steps
from each victim's ``last_used`` to its eviction, in seconds over the measured mean
seconds per layer step); before the first eviction, the mean residence. The mean residence
counts the long stays of the experts the cache keeps; the victims' age is how long an
entry at the margin, the one an eviction decides about, goes unused before it leaves.
A short T makes the order nearly the next visit's chance; a long one weighs the later
visits, which the time order reaches only through its geometric mean.
The admission still prices a listed victim by its expected time to next use.
"""

from __future__ import annotations

from policies.cache import CacheEntry
from policies.cache_victims import CandidateArrays
from policies.fmoe_eviction import _TIE_EPS


class FmoeWindow:
    """The chance of use within the measured residence time (module doc)."""

    _window_on = False  # until bound

    def _setup_window(self, mode: str) -> None:
        """``mode``: the eviction order option; ``window`` turns this order on."""
        if mode != "window":
            return
        import numpy as np

        from policies import fmoe_window_jit  # numba: loaded at bind, not at import

        self._wjit = fmoe_window_jit
        self._window_on = True
        self._scores_fast = False
        self._uses_on = True  # the cache asks victim_index (FmoeDuel dispatches here)
        self._scores = self._scores_window
        self._window = np.zeros(self._etnu.shape)
        self._window_mv = memoryview(self._window)
        self._window_h = 0.0  # the last horizon used (metadata)
        self._window_age = self.options.window_time == "age"
        # per cache (id): the victims' summed ages at eviction (seconds) and their count
        self._window_evicted: dict[int, list[float]] = {}

    def _window_horizon(self, layer: int, expert: int) -> float:
        """T in layer steps for the cache holding (layer, expert) (module doc)."""
        cache = self._cache_of[layer][expert]
        h = -1.0
        if self._window_age:
            ev = self._window_evicted.get(id(cache))
            t0, steps = self._duel_t0, self._duel_step  # policies.fmoe_duel's gate clock
            if ev is not None and ev[1] > 0 and t0 is not None and steps > 0:
                step_s = (self._now - t0) / steps
                if step_s > 0:
                    h = ev[0] / ev[1] / step_s
        if h < 0:
            h = self._horizon(cache)  # policies.fmoe_duel: Little's law
        self._window_h = h
        return h

    def _window_evicts(self, cache: object, last_used: float) -> None:
        """The cache evicts the entry last used (or loaded) at ``last_used``."""
        ev = self._window_evicted.get(id(cache))
        if ev is None:
            ev = self._window_evicted[id(cache)] = [0.0, 0]
        ev[0] += max(self._now - last_used, 0.0)
        ev[1] += 1

    def window_metadata(self) -> dict[str, float]:
        """The residence time the order used last (layer steps)."""
        return {"window_residence_steps": self._window_h}

    def _window_victim_index(self, arr: CandidateArrays) -> int:
        """The window order's victim among the cache's candidate arrays in one kernel
        (what ``_scores_window`` and the cache's lowest pick give); -1 (score in Python)
        before bind, without candidates or on a NaN."""
        if not self._pred or self.ctx is None or arr.n == 0:
            return -1
        lay, j = int(arr.layers[0]), int(arr.experts[0])
        horizon = self._window_horizon(lay, j)
        self._chance()
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        i = self._wjit.window_victim(
            self._ist, self._fl, self._prot, self._g, self._cur_it, self._ev_rows, horizon,
            arr.layers, arr.experts, arr.last_used, arr.n, tie,
        )  # fmt: skip
        if i < 0:
            return -1
        # the cache asks only to evict (ExpertCache._victim): the victim's age is measured
        self._window_evicts(self._cache_of[lay][j], float(arr.last_used[i]))
        return int(i)

    def _scores_window(self, entries: list[CacheEntry]) -> list[float]:
        """Lower goes first: the chance of use within the residence time of the entries'
        cache, plus the expected-time tie-break (fmoe_window_jit.window_table) and
        recency's. Before bind: recency."""
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if not self._pred or not entries or self.ctx is None:
            return [tie * e.last_used for e in entries]
        lay, j = entries[0].key
        horizon = self._window_horizon(lay, j)
        self._chance()
        self._wjit.window_table(
            self._ist, self._fl, self._prot, self._window, self._g, self._cur_it,
            self._ev_rows, horizon,
        )  # fmt: skip
        tab = self._window_mv
        return [tab[e.key] + tie * e.last_used for e in entries]
