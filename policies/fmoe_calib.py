"""The admission's chance of use for a candidate, measured on the candidates themselves
(``candidate_chance="measured"``, the default), as a mixin of
:class:`policies.fmoe_deadline.FmoeDeadline`.

The admission's chance q that a one-row iteration uses a candidate is the eviction
table's cell (its forecast's probability bin and source, or its request frequency, by
age: policies.fmoe_eviction), learned over every expert at every gate. A candidate is
not every expert: it is one the forecast selected and the cache does not hold, and the
cache lets go first of the experts it expects least. Measured on the Qwen1.5-MoE testbed
run (docs/fmoe.md, "The candidates' own chance"), map picks admitted in time at a mean
q of 0.23 were used 6% of the time, and those refused by the value test at 0.08 used 3%.
So the policy counts, per cell, how often the map's candidates of one-row iterations
were chosen at their layer (each once per iteration, at the last pass that judged it;
lookahead picks are left out, they have their own measured precision), and the
admission's chance for a candidate in that cell is (used + q) / (judged + 1): the
measured rate, with one pseudo-observation at the table's q. Before any measurement it
is the table's q; with the option ``table`` always (the earlier rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.fmoe_eviction import AGE_BUCKETS

_LAST_BUCKET = AGE_BUCKETS - 1


class FmoeCalib:
    """Per chance-table cell: the map candidates judged and used (one-row iterations)."""

    def _setup_calib(self, on: bool, shape: tuple[int, int]) -> None:
        """Empty counts of the chance table's ``shape``; ``on``: measure and use them."""
        self._cal_on = on
        self._cal_h = np.zeros(shape)  # used
        self._cal_n = np.zeros(shape)  # judged
        # this iteration's judged map candidates: layer -> {expert: (row, age bucket)}
        self._cal_pend: dict[int, dict[int, tuple[int, int]]] = {}

    def _calib_cell(self, layer: int, j: int) -> tuple[int, int]:
        """(layer, j)'s chance-table cell now (as FmoeEviction._candidate_chance reads it)."""
        it, ist = self._cur_it, self._ist
        age = it - ist.item(0, layer, j)
        row = ist.item(1, layer, j) if ist.item(2, layer, 0) == it else ist.item(3, layer, j)
        return row, 0 if age <= 1 else min((age - 1).bit_length(), _LAST_BUCKET)

    def _calib_chance(self, layer: int, j: int) -> float:
        """The candidate's chance of use in a one-row iteration: its cell's measured rate
        among candidates, one pseudo-observation at the table's chance."""
        row, b = self._calib_cell(layer, j)
        q = self._chance().item(row, b)
        return (self._cal_h.item(row, b) + q) / (self._cal_n.item(row, b) + 1.0)

    def _calib_note(self, lay: np.ndarray, jj: np.ndarray, look: np.ndarray) -> None:
        """A one-row pass judges candidates ``lay``, ``jj`` (``look`` >= 0: a lookahead
        pick): note each map candidate's cell, the last pass's before its layer counting."""
        pend = self._cal_pend
        for layer, j, lk in zip(lay.tolist(), jj.tolist(), look.tolist(), strict=True):
            if lk < 0.0:
                pend.setdefault(layer, {})[j] = self._calib_cell(layer, j)

    def _calib_gate(self, layer: int, ids: Sequence[int]) -> None:
        """Layer ``layer``'s gate chose ``ids``: count its noted candidates."""
        noted = self._cal_pend.pop(layer, None)
        if not noted:
            return
        chosen = set(ids)
        h, n = self._cal_h, self._cal_n
        for j, (row, b) in noted.items():
            n[row, b] += 1.0
            if j in chosen:
                h[row, b] += 1.0

    def calib_metadata(self) -> dict[str, float | int | None]:
        """Map candidates judged and the share used (pooled over cells)."""
        n = float(self._cal_n.sum())
        return {
            "candidates_measured": int(n),
            "candidates_used_share": float(self._cal_h.sum()) / n if n > 0 else None,
        }
