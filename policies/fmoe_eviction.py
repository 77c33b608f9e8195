"""fMoE's eviction scores (FMOE_ALGORITHM.md step 5) and the ablation's alternatives,
as a mixin of :class:`policies.fmoe.FmoePolicy`.

``fmoe`` (the default) evicts the expert with the longest *expected time to its next
use*, in layer steps. It joins the maps' predictions with recency through one table the
policy learns as it runs: for every expert at every gate, the chance it is chosen given
(its forecast for this iteration, binned by the map's probability p and by source,
semantic or trajectory, or "no forecast") x (its age: iterations since the layer last
chose it, in doubling buckets, or "never"). That is recency and decayed frequency as the
routing shows them (an expert used 1 iteration ago vs 20), calibrated predictions, and
how the two combine, all counted, none set by hand (one pseudo-observation at the
uninformed rate K/J per cell; the "no forecast" row counts every visit, so it is the
chance by age alone). Each row is made non-increasing in age (pool-adjacent-violators),
the one assumption LRU also makes, so noise in a flat table cannot reverse the recency
order. From it:

- a layer still ahead in this iteration (l > g, the last gate): with probability P (its
  cell now) it is used in l - g steps, else at the next iteration's visit, L - g + l
  steps, plus L per further iteration, waiting geometrically with the no-forecast chance
  at its next age;
- a layer already passed: the next iteration's visit plus the geometric wait.

When the maps carry no information, the forecast rows learn the no-forecast ones and
the ordering within a layer is by age (least recently used first, as LRU; ties by last
use); across layers it is by how soon each layer comes back. Experts selected for a
layer still ahead in this iteration (resident or in flight) are protected until that
layer has run.

``paper`` is the paper's p x uses while cached (p the searched map's probability, K/J
before a layer is first forecast); ``lfu``, ``lfu-global`` and ``lru`` are the ablation's.
"""

from __future__ import annotations

import numpy as np

from policies.cache import CacheEntry

_TIE_EPS = 1e-9  # recency tie-break weight, far below any meaningful score gap
CAL_BINS = 10  # forecast probability bins (per source)
SEMANTIC, TRAJECTORY = 0, 1  # forecast sources
AGE_BUCKETS = 16  # ages 1, 2, 3-4, 5-8, ... (doubling), the last also "never chosen"
PROTECTED_E = 0.0  # expected time of a protected expert: below every real estimate (>= 1)
_NEVER = -(1 << 40)  # last iteration of an expert never chosen


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Bucket of ages >= 1 (iterations): 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...; huge
    ages (never chosen) land in the last bucket."""
    a = np.maximum(age, 1)
    return np.minimum(np.ceil(np.log2(a)).astype(np.int64), AGE_BUCKETS - 1)


def _decreasing_rows(hits: np.ndarray, n: np.ndarray) -> np.ndarray:
    """hits / n per row, made non-increasing along each row by pooling adjacent
    violators (weighted by n): the least-squares non-increasing fit of each row."""
    out = np.empty_like(hits)
    for r in range(hits.shape[0]):
        blocks: list[list[float]] = []  # [hits, n, width]
        for h, w in zip(hits[r].tolist(), n[r].tolist(), strict=True):
            blocks.append([h, w, 1])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
                h2, w2, c2 = blocks.pop()
                blocks[-1][0] += h2
                blocks[-1][1] += w2
                blocks[-1][2] += c2
        i = 0
        for h, w, c in blocks:
            out[r, i : i + c] = h / w
            i += c
    return out


class FmoeEviction:
    """Step 5 of fMoE: which cached expert goes first (see the module doc)."""

    # -- state ----------------------------------------------------------------------------
    def _setup_usage(self, L: int, J: int, K: int) -> None:
        """The learned table and the routing bookkeeping (all start empty)."""
        self._base = K / J
        rows = 1 + 2 * CAL_BINS  # 0: no fresh forecast; then semantic bins, trajectory bins
        self._tab_n = np.zeros((rows, AGE_BUCKETS))
        self._tab_hit = np.zeros((rows, AGE_BUCKETS))
        self._last_it = np.full((L, J), _NEVER, np.int64)  # last iteration that chose it
        self._fc_it = np.full(L, -1, np.int64)  # iteration of each layer's last forecast
        self._fc_row = np.zeros((L, J), np.int64)  # its table row per expert
        self._g = -1  # the layer whose gate ran last in this iteration (-1: none yet)
        self._cur_it = 0  # the policy's iteration count
        self._protect: set[tuple[int, int]] = set()
        self._etnu: list[list[float]] = [[0.0] * J for _ in range(L)]
        self._etnu_dirty = True
        self._lay = np.arange(L)[:, None]
        self._chance_it = -1
        self._chance_tab = np.zeros((rows, AGE_BUCKETS))

    def _forecast(self, layer: int, source: int) -> None:
        """Layer ``layer`` was just forecast (``self._pred[layer]``) in this iteration."""
        self._fc_it[layer] = self._cur_it
        p = np.asarray(self._pred[layer], dtype=float)
        bins = np.minimum((p * CAL_BINS).astype(np.int64), CAL_BINS - 1)
        self._fc_row[layer] = 1 + source * CAL_BINS + bins
        self._etnu_dirty = True

    def _observe_choice(self, layer: int, ids: np.ndarray) -> None:
        """Layer ``layer``'s gate chose ``ids`` (distinct) in the current iteration: count
        every expert's cell, then update ages and lift the layer's protection."""
        it = self._cur_it
        last = self._last_it[layer]
        if not np.any(last == it):  # the layer's first gate in this iteration
            ages = age_bucket(it - last)
            # row 0 counts every visit (chance by age alone: what the next iteration's
            # visits use), a fresh forecast's row counts it again by its bin
            np.add.at(self._tab_n[0], ages, 1.0)
            np.add.at(self._tab_hit[0], ages[ids], 1.0)
            if self._fc_it[layer] == it:
                rows = self._fc_row[layer]
                np.add.at(self._tab_n, (rows, ages), 1.0)
                np.add.at(self._tab_hit, (rows[ids], ages[ids]), 1.0)
        last[ids] = it
        if self._protect:
            self._protect = {k for k in self._protect if k[0] > layer}
        self._g = layer
        self._etnu_dirty = True

    # -- expected time to next use ----------------------------------------------------------
    def _chance(self) -> np.ndarray:
        """The learned table: P(chosen at a visit) per (forecast row, age bucket), each
        row made non-increasing in age (pooled where the counts say otherwise, as LRU
        assumes: an expert used longer ago is not likelier to come back). Recomputed once
        per iteration."""
        if self._chance_it != self._cur_it:
            self._chance_tab = _decreasing_rows(self._tab_hit + self._base, self._tab_n + 1.0)
            self._chance_it = self._cur_it
        return self._chance_tab

    def _expected_next_use(self) -> np.ndarray:
        """[L, J] expected layer steps until each expert's next use (see the module doc)."""
        L = self._last_it.shape[0]
        g, it = self._g, self._cur_it
        tab = self._chance()
        lay = self._lay
        ahead = lay > g
        age = it - self._last_it  # >= 1 ahead (not chosen in this iteration yet), >= 0 passed
        rows = np.where((self._fc_it == it)[:, None], self._fc_row, 0)
        nxt = (L - g + lay).astype(float)  # layer steps to the layer in the next iteration
        p_now = tab[rows, age_bucket(age)]  # ahead: chosen at this iteration's visit
        p_next = tab[0, age_bucket(age + 1)]  # not chosen now: at the next iteration's
        wait = nxt + L * (1.0 / p_next - 1.0)
        e_ahead = p_now * (lay - g) + (1.0 - p_now) * wait
        p_pass = tab[0, age_bucket(np.maximum(age, 0) + 1)]  # passed: next iteration's visit
        e_pass = nxt + L * (1.0 / p_pass - 1.0)
        e = np.where(ahead, e_ahead, e_pass)
        for lay_, j in self._protect:
            e[lay_, j] = PROTECTED_E
        return e

    def _etnu_table(self) -> list[list[float]]:
        if self._etnu_dirty:
            self._etnu = self._expected_next_use().tolist()
            self._etnu_dirty = False
        return self._etnu

    def expected_next_use(self, layer: int, expert: int) -> float:
        """Expected layer steps until (layer, expert) is used next (the ``fmoe`` score's
        estimate; protected experts 0)."""
        return self._etnu_table()[layer][expert]

    def _candidate_etnu(self, layer: int, j: int, g: int) -> float:
        """A prefetch candidate's expected time to next use (unprotected; layer > g)."""
        L = self._last_it.shape[0]
        it = self._cur_it
        tab = self._chance()
        age = it - int(self._last_it[layer, j])
        row = int(self._fc_row[layer, j]) if self._fc_it[layer] == it else 0
        p_now = float(tab[row, age_bucket(np.array(age))])
        p_next = float(tab[0, age_bucket(np.array(age + 1))])
        wait = (L - g + layer) + L * (1.0 / p_next - 1.0)
        return p_now * (layer - g) + (1.0 - p_now) * wait

    # -- scores ---------------------------------------------------------------------------
    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: ``fmoe`` minus the expected time to next use, ``paper`` p x
        uses while cached, ``lfu`` uses while cached, ``lfu-global`` uses over the run,
        ``lru`` last use (ties: least recent first)."""
        return self._scores([entry])[0]

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return self._scores(entries)

    def _tie(self, entry: CacheEntry) -> float:
        return _TIE_EPS * entry.last_used / (abs(self._now) + 1.0)

    def _scores_lru(self, entries: list[CacheEntry]) -> list[float]:
        return [float(e.last_used) for e in entries]

    def _scores_lfu(self, entries: list[CacheEntry]) -> list[float]:
        return [e.uses + self._tie(e) for e in entries]

    def _scores_lfu_global(self, entries: list[CacheEntry]) -> list[float]:
        freq = self._freq
        return [float(freq[e.key[0]][e.key[1]] if freq else e.uses) + self._tie(e) for e in entries]

    def _scores_paper(self, entries: list[CacheEntry]) -> list[float]:
        # one comprehension, no call per entry: this runs for every load once a cache is full
        pred, tie = self._pred, _TIE_EPS / (abs(self._now) + 1.0)
        if not pred:  # unbound: no forecast, p = 0
            return [tie * e.last_used for e in entries]
        return [pred[lay][j] * e.uses + tie * e.last_used for e in entries for lay, j in (e.key,)]

    def _scores_etnu(self, entries: list[CacheEntry]) -> list[float]:
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if not self._pred:  # unbound: least recently used
            return [tie * e.last_used for e in entries]
        tab = self._etnu_table()
        return [-tab[lay][j] + tie * e.last_used for e in entries for lay, j in (e.key,)]
