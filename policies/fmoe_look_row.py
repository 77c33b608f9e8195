"""A one-row lookahead gate in one kernel call (issue 21, speed only), as a mixin of
:class:`policies.fmoe_lookahead.FmoeLookahead`: :meth:`FmoeLookRow._lookahead_gate_row`
is ``FmoeLookahead._lookahead_gate`` for ``lookahead="auto"`` with deadline admission
(:func:`policies.fmoe_look_jit.look_gate_row`: the scoring, the map split, the picks,
the measured orders' ranking and protection); only the orders' cache look-ups and
candidate writes stay in Python. tests/test_fmoe_gate_one.py runs it against the Python
(``policies.fmoe_lookahead._GATE_KERNEL = False``) on random routings."""

from __future__ import annotations

from typing import Any

import numpy as np


class FmoeLookRow:
    """:meth:`_lookahead_gate_row` and the forecast top-k arrays it reads."""

    def _map_topk_arr(self, layer: int) -> np.ndarray:
        """:meth:`_map_topk` as an int64 array, kept with the forecast row it was made of
        (rows are swapped whole, never changed in place)."""
        row = self._pred[layer]
        memo = self._map_top_arr.get(layer)
        if memo is not None and memo[0] is row:
            return memo[1]
        plan = self._plan_tops.get(id(row))  # a decode plan's row: its top-k array made
        if plan is not None and plan[0] is row:  # with the list _map_topk reads there
            arr = plan[2]
        else:
            arr = np.array(self._map_topk(layer), np.int64)
        self._map_top_arr[layer] = (row, arr)
        return arr

    def _look_inputs(self, ev: Any, g: int) -> tuple | None:
        """look_gate_row's inputs at gate ``g`` of a one-row iteration with a lookahead
        row (``lookahead="auto"``, deadline admission), computed from the state before
        the gate's lookahead work: (row [J], picks scored, their ids, the cells'
        boundary, map_it, the map's top-k of g, have_top, of g + 1, split, the named
        ids, the new picks' array [1, k]); None where the one-call path does not apply
        (the caller's Python runs)."""
        ids = ev.topk_ids
        la = ev.lookahead
        it = self._it
        if (
            la is None
            or it is None
            or it.iteration != ev.iteration
            or type(ids) is not np.ndarray
            or ids.ndim != 2
            or len(ids) != 1
            or g + 1 >= len(self._la_on_arr)
        ):
            return None
        if type(la) is np.ndarray and la.shape == (1, self._la_J) and la.dtype.char in "fd":
            row = la[0]  # float32 or float64: the kernel widens it as np.asarray(la, float64)
        else:
            rows = np.asarray(la, dtype=np.float64)
            if rows.shape != (1, self._la_J):
                return None  # (the Python raises the shape's InputError)
            row = rows[0]
        iteration = ev.iteration
        picks = self._la_picks
        scored = (
            picks is not None and picks[0] == iteration and picks[1] == g and len(picks[2]) == 1
        )
        n = self._la_n[g]
        bnd = self._boundary(n + 1.0) if scored else n
        cur = self._cur_it
        fc_it = self._fc_it
        map_it = bool(fc_it[g] == cur)
        top = self._map_topk_arr(g) if map_it else self._no_ids
        nxt = g + 1
        have_top = bool(fc_it[nxt] == cur)
        top_n = self._map_topk_arr(nxt) if have_top else self._no_ids
        named = self._look_named
        split = named is not None and named[0] == cur and named[1] == g and map_it
        named_ids = self._no_ids
        if split:
            memo = self._admit_named
            if memo is not None and memo[0] is named[2]:
                named_ids = memo[1]
            else:
                named_ids = np.fromiter(named[2], np.int64, len(named[2]))
        pk_prev = picks[2][0] if scored else self._no_ids
        pk = np.empty((1, self._la_k), np.int64)
        return row, scored, pk_prev, bnd, map_it, top, have_top, top_n, split, named_ids, pk

    def _lookahead_gate_row(self, ev: Any, g: int) -> bool:
        """:meth:`_lookahead_gate` of a one-row iteration with ``lookahead="auto"`` and
        deadline admission in one kernel call (policies.fmoe_look_jit.look_gate_row: the
        scoring, the map split, the picks, the measured orders' ranking and protection);
        only the orders' cache lookups and candidate writes stay here. False (nothing
        done) where it does not apply or the kernel meets a NaN: the caller's Python runs."""
        args = self._look_inputs(ev, g)
        if args is None:
            return False
        row, scored, pk_prev, bnd, map_it, top, have_top, top_n, split, named_ids, pk = args
        bufs = self._la_out
        nxt = g + 1
        m = self._la_jit.look_gate_row(
            self._la_chosen[g], self._la_rows[g], self._la_base, pk_prev, ev.topk_ids[0],
            self._la_n[g], self._la_h[g], self._la_e[g], scored, bnd, self._la_on_arr[g],
            self._la_p_arr[g], top, map_it, self._map_n, self._map_h, self._la_cat_n,
            self._la_cat_h, g, split, named_ids, self._mcat_n, self._mcat_h,
            np.asarray(row, np.float64), pk[0], self._la_on_arr[nxt], self._la_p_arr[nxt],
            top_n, have_top, self._prot, self._etnu, bufs[0], bufs[1], bufs[2],
        )  # fmt: skip
        if m == -2:
            return False
        self._la_rows[g] += 1
        self._look_done(ev.iteration, g, scored, pk, m, bufs[0], bufs[1], bufs[2])
        return True

    def _look_done(
        self,
        iteration: int,
        g: int,
        scored: bool,
        pk: np.ndarray,
        m: int,
        out_j: np.ndarray,
        out_p: np.ndarray,
        out_q: np.ndarray,
    ) -> None:
        """After look_gate_row answered ``m`` (>= -1) at gate ``g``: the cells' list
        mirrors, the picks kept for gate g + 1, the counts, and the ranked orders
        ``out_j``/``out_p``/``out_q`` [:m] as candidates (the cache lookups and candidate
        writes, in Python: the candidate set and the caches' entries are Python's)."""
        self._look_named = None
        if scored:
            self._la_on[g] = self._la_on_arr[g].tolist()
            self._la_p[g] = self._la_p_arr[g].tolist()
        nxt = g + 1
        self._la_picks = (iteration, nxt, pk)
        st = self._stats
        st["lookahead_gates"] += 1
        if m < 0:
            return
        st["lookahead_orders"] += m
        js = out_j[:m].tolist()
        fs = frozenset(js)
        cur = self._cur_it
        self._look_named = (cur, nxt, fs)
        self._admit_named = (fs, out_j[:m].copy())
        if not m:
            return
        self._ev += 1  # the picks' protection (in the kernel), its version bump once
        if self._no_prefetch:
            return
        it = self._it
        look_q, cands, issued = self._look_q, self._dl_cands, it.issued_mv
        d = self._layer_ents[nxt]
        ents = self._ents_of[nxt] if self._cache_of else None
        pm, im, base = cands._pm, cands._im, nxt * cands.J  # CandidateSet.put, inlined
        for j, p, q in zip(js, out_p[:m].tolist(), out_q[:m].tolist(), strict=True):
            key = (nxt, j)
            if ents is not None and key in (d if d is not None else ents[j]):
                continue
            look_q[key] = q
            f = base + j
            held = pm[f]
            if p > held:
                if held == -1.0:  # absent (every value held is above -1.0)
                    im[cands.cnt] = f
                    cands.cnt += 1
                pm[f] = p
            issued[key] = True
