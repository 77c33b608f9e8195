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

    def _setup_calib(self, on: bool, shape: tuple[int, int], n_layers: int, n_experts: int) -> None:
        """Empty counts of the chance table's ``shape`` for ``n_layers`` x ``n_experts``;
        ``on``: measure and use them."""
        self._cal_on = on
        self._cal_h = np.zeros(shape)  # used
        self._cal_n = np.zeros(shape)  # judged
        # this iteration's judged map candidates not counted yet: [layer, expert] -> the
        # cell (row x AGE_BUCKETS + age bucket) or -1, and the layers with any
        # (policies.fmoe_calib_jit; a dict of dicts written per candidate before)
        self._cal_pend = np.full((n_layers, n_experts), -1, np.int64)
        self._cal_noted = np.zeros(n_layers, np.bool_)
        self._cal_jit = None
        if on:
            from policies import fmoe_calib_jit  # numba: bound with fmoe_jit

            self._cal_jit = fmoe_calib_jit

    def _calib_reset(self) -> None:
        """A new iteration: a candidate is judged and counted within its iteration."""
        noted = self._cal_noted
        if noted.any():
            self._cal_pend[noted] = -1
            noted[:] = False

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
        pick): note each map candidate's cell, the last pass's before its layer counting
        (policies.fmoe_calib_jit.calib_note)."""
        self._cal_jit.calib_note(  # type: ignore[union-attr]
            lay, jj, look, lay.shape[0], self._ist, self._cur_it, self._cal_pend, self._cal_noted
        )

    def _calib_gate(self, layer: int, ids: Sequence[int] | np.ndarray) -> None:
        """Layer ``layer``'s gate chose ``ids``: count its noted candidates."""
        if not self._cal_noted[layer]:
            return
        if not isinstance(ids, np.ndarray):
            ids = np.array(ids, np.int64)
        self._cal_jit.calib_gate(  # type: ignore[union-attr]
            layer, ids, self._cal_pend, self._cal_noted, self._cal_h, self._cal_n
        )

    def calib_metadata(self) -> dict[str, float | int | None]:
        """Map candidates judged and the share used (pooled over cells)."""
        n = float(self._cal_n.sum())
        return {
            "candidates_measured": int(n),
            "candidates_used_share": float(self._cal_h.sum()) / n if n > 0 else None,
        }
