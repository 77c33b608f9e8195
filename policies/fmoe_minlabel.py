"""Learning from MIN (Hawkeye/OPTgen's idea) in fMoE's eviction (``min_labels=lru`` or
``time``; ``off`` by default, measured in docs/fmoe.md), as a mixin of
:class:`policies.fmoe.FmoePolicy`.

At fit, the training requests' demand sequence (one request at a time, as the replay of
:meth:`policies.fmoe_fit.FmoeFit._eviction_fit` runs them: a prompt's layers, then each
decode token's) is run through Belady's MIN with the policy's cache size (the slots of
every device together), and each demand is labelled *friendly* when MIN keeps its
expert until the expert's next demand, else *averse* (:mod:`policies.fmoe_min_jit`).
Each demand's feature is the eviction table's cell at that moment (request-frequency
bin, with ``transitions`` the transition-informed bin, x age bucket), or with
``min_feature=expert`` the expert itself (Hawkeye keys its predictor by the loading
instruction; here the expert is the nearest thing); the friendly rate per feature is
counted (one pseudo-demand at the pooled rate). Served, every expert keeps
the cell of its latest choice, and an expert whose cell's rate is below one half (MIN
evicts such demands more often than it keeps them: Hawkeye's majority rule) is
*averse*. Victims: averse first (protected experts never before unprotected ones), then
within a class by least recent use (``lru``, Hawkeye's order) or by the expected time to
next use (``time``). No online labels: the rates are the training split's.
"""

from __future__ import annotations

import numpy as np

from policies.cache import CacheEntry
from policies.fmoe_eviction import _TIE_EPS, AGE_BUCKETS, CAL_BINS, age_bucket


class FmoeMinLabel:
    """Cells' MIN-friendly rates from the training split; class-first victims."""

    def _setup_min_labels(self, L: int, J: int) -> None:
        """Nothing kept when off; else each expert's latest cell and the cells' rates
        (before a fit every cell friendly: one class, the within-class order alone)."""
        mode = getattr(self.options, "min_labels", "off")
        self._ml_on = mode != "off"
        if not self._ml_on:
            return
        from policies import fmoe_min_jit  # numba: loaded at bind, not at import

        self._mjit = fmoe_min_jit
        self._ml_mode = mode
        self._mcell = np.full((L, J), -1, np.int64)
        self._ml_expert = getattr(self.options, "min_feature", "cell") == "expert"
        cells = L * J if self._ml_expert else CAL_BINS * AGE_BUCKETS
        self._mrate = np.ones(cells + 1)  # the last: no feature yet (the pooled rate)
        self._ml_keys: list[np.ndarray] = []
        self._ml_cells: list[np.ndarray] = []
        self._scores_fast = False  # scored in Python (no compiled victim choice)
        self._scores = self._scores_min

    def _cells(self, ist: np.ndarray, it: int, layer: int, uniq: np.ndarray) -> np.ndarray:
        """Features of experts ``uniq`` of ``layer`` now: their table cells (request-frequency
        bin x age bucket; ``min_feature=cell``) or the experts themselves (``expert``:
        Hawkeye's per-instruction predictor with the expert in the instruction's place)."""
        if self._ml_expert:
            return layer * ist.shape[2] + uniq
        age = it - ist[0, layer, uniq]
        return ist[3, layer, uniq] * AGE_BUCKETS + age_bucket(age)

    def _min_gate(self, layer: int, ids: np.ndarray) -> None:
        """Before layer ``layer``'s gate is counted: its chosen experts' current cells."""
        uniq = np.unique(np.asarray(ids))
        fresh = uniq[self._ist[0, layer, uniq] != self._cur_it]
        if len(fresh):
            self._mcell[layer, fresh] = self._cells(self._ist, self._cur_it, layer, fresh)

    def _min_record(self, st: dict, layer: int, ids: np.ndarray) -> None:
        """The training replay's step (``st``: its state) at ``layer``: its demands (the
        distinct chosen experts, ascending) and their cells, before the step is counted."""
        uniq = np.unique(np.asarray(ids))
        J = self._ist.shape[2]
        self._ml_keys.append(layer * J + uniq)
        self._ml_cells.append(self._cells(st["ist"], st["it"], layer, uniq))

    def _min_fit_end(self) -> None:
        """MIN over the recorded training demands with the caches' slots: each cell's
        friendly rate (one pseudo-demand at the pooled rate)."""
        if not self._ml_keys or getattr(self, "ctx", None) is None:
            return
        L, J = self._ist.shape[1], self._ist.shape[2]
        starts = np.zeros(len(self._ml_keys) + 1, np.int64)
        starts[1:] = np.cumsum([len(k) for k in self._ml_keys])
        keys = np.concatenate(self._ml_keys).astype(np.int64)
        cells = np.concatenate(self._ml_cells)
        capacity = sum(int(c.capacity) for c in self.ctx.caches)
        label = self._mjit.min_labels(keys, starts, L * J, capacity)
        n = np.bincount(cells, minlength=len(self._mrate) - 1).astype(float)
        f = np.bincount(cells, weights=label, minlength=len(self._mrate) - 1)
        pooled = float(label.mean())
        self._mrate[:-1] = (f + pooled) / (n + 1.0)
        self._mrate[-1] = pooled
        self._stats["min_label_demands"] += len(keys)
        self._stats["min_label_friendly"] += int(label.sum())
        self._ml_keys, self._ml_cells = [], []

    def _scores_min(self, entries: list[CacheEntry]) -> list[float]:
        """Class first (protected 2, friendly 1, averse 0), then within the class least
        recent use (``lru``) or minus the expected time to next use (``time``)."""
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if self._ml_mode == "time" and self._pred:
            tab = self._etnu_table()
            within = [tab[e.key] + tie * e.last_used for e in entries]
        else:
            within = [float(e.last_used) for e in entries]
        if not entries:
            return []
        span = 2.0 * max(abs(w) for w in within) + 1.0
        rate, cell, prot = self._mrate, self._mcell, self._prot
        out = []
        for e, w in zip(entries, within, strict=True):
            lay, j = e.key
            c = int(cell[lay, j])
            cls = 2 if prot[lay, j] else int(rate[c if c >= 0 else -1] >= 0.5)
            out.append(cls * span + w)
        return out
