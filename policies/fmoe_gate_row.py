"""A planned one-row decode gate's observation, transitions and lookahead in one kernel
call (issue 21, speed only), as a mixin of :class:`policies.fmoe.FmoePolicy`.

:meth:`FmoeGateRow._gate_row` is ``FmoePolicy._planned_decode_observe`` (the eviction's
bookkeeping; ``FmoeTransition._transition_gate``) followed by
``FmoeLookahead._lookahead_gate`` (its one-row kernel path,
:meth:`policies.fmoe_look_row.FmoeLookRow._lookahead_gate_row`), with the three kernels
of those paths run by one call of :func:`policies.fmoe_row_jit.gate_row`: the Python
between them goes, what is left is the lookahead's inputs (its memos are Python's) and
the orders' candidate writes. It applies where nothing else runs between the two on the
Python path (``transitions_later="two"``, ``min_labels`` and a duel of eviction orders
keep the step-by-step path) and where the one-row lookahead kernel would (``lookahead=
"auto"`` with deadline admission, a lookahead row); the step-by-step path stays the
reference (``_ROW = False``; tests/test_fmoe_gate_one.py runs both end to end).
"""

from __future__ import annotations

from typing import Any

from policies.fmoe_eviction import CAL_BINS

# planned one-row gates run policies.fmoe_row_jit.gate_row (False: the separate calls)
_ROW = True


class FmoeGateRow:
    """:meth:`_gate_row`: a planned one-row gate's observation and lookahead in one call."""

    _row_jit: Any = None  # policies.fmoe_row_jit, loaded at the first gate that uses it
    _row_view: Any = False  # the executor view _row_ok was decided with (False: none yet)
    _row_ok = False

    def _gate_row_applies(self) -> bool:
        """Whether :meth:`_gate_row` may replace the step-by-step path (module doc);
        decided once per executor view (bind sets the view, the options are fixed)."""
        view = self._view
        if self._row_view is not view:
            self._row_view = view
            self._row_ok = bool(
                _ROW
                and self._la_mode == "auto"
                and view is not None
                and self._tr_on
                and not self._tr2
                and not self._ml_on
                and not self._duel_on
            )
        return self._row_ok

    def _gate_row(self, ev: Any, it: Any, plan: Any, g: int) -> bool:
        """The planned decode gate ``g``'s observation and, where it applies, its
        lookahead work (module doc). True: both done; False: the observation done, the
        caller runs ``_lookahead_gate`` (no lookahead row, or a NaN in it)."""
        look = self._look_inputs(ev, g)
        self._planned_gate_seen(ev, it, plan, g)
        eager = self._eager_table and self._chance_it == self._cur_it
        ids = ev.topk_ids
        row_slot = self._row_slot if len(self._row_slot) == len(ids) else self._no_slots
        kern = self._row_jit
        if kern is None:
            from policies import fmoe_row_jit as kern  # numba: loaded when first used

            self._row_jit = kern
        bufs = self._row_out
        if look is None:
            row, scored, pk_prev, bnd, map_it, top, have_top, top_n, split, named_ids, pk = (
                kern.NO_ROW, False, self._no_ids, kern.NO_ROW, False, self._no_ids, False,
                self._no_ids, False, self._no_ids, self._no_pk,
            )  # fmt: skip
        else:
            row, scored, pk_prev, bnd, map_it, top, have_top, top_n, split, named_ids, pk = look
        m, counted = kern.gate_row(
            self._ist, self._fl, self._prot, self._etnu, g, self._cur_it, ids, plan.fc_rows,
            eager, self._rc, self._rn, row_slot, self._slots, self._base, CAL_BINS, self._pop,
            self._ev_rows, self._tr_on, self._tc, self._tn, self._tm, self._tau, self._tprev,
            self._tr_it, row, self._row64, self._la_cell, self._la_layer, self._la_chosen,
            self._la_on_arr, self._la_base, pk_prev, scored, bnd, top, map_it, split,
            named_ids, pk[0], top_n, have_top, bufs[0], bufs[1],
        )  # fmt: skip
        if m == kern.BAD_IDS:
            self._bad_ids(g)
        self._g = g
        self._etnu_dirty = True if counted else not eager
        self._ev += 2 if counted else 1
        if m < -1:  # no lookahead row, or a NaN in it: the caller's Python path
            return False
        self._look_q = {}
        self._look_done(ev.iteration, g, scored, pk, m, bufs[0], bufs[1][0], bufs[1][1])
        return True
