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
        arr = np.array(self._map_topk(layer), np.int64)
        self._map_top_arr[layer] = (row, arr)
        return arr

    def _lookahead_gate_row(self, ev: Any, g: int) -> bool:
        """:meth:`_lookahead_gate` of a one-row iteration with ``lookahead="auto"`` and
        deadline admission in one kernel call (policies.fmoe_look_jit.look_gate_row: the
        scoring, the map split, the picks, the measured orders' ranking and protection);
        only the orders' cache lookups and candidate writes stay here. False (nothing
        done) where it does not apply or the kernel meets a NaN: the caller's Python runs."""
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
            return False
        rows = np.asarray(la, dtype=np.float64)
        if rows.shape != (1, self._la_J):
            return False  # (the Python raises the shape's InputError)
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
        k = self._la_k
        pk = np.empty((1, k), np.int64)
        bufs = self._la_out
        m = self._la_jit.look_gate_row(
            self._la_chosen[g], self._la_rows[g], self._la_base,
            picks[2][0] if scored else self._no_ids, ids[0], n, self._la_h[g], self._la_e[g],
            scored, bnd, self._la_on_arr[g], self._la_p_arr[g], top, map_it, self._map_n,
            self._map_h, self._la_cat_n, self._la_cat_h, g, split, named_ids, self._mcat_n,
            self._mcat_h, rows[0], pk[0], self._la_on_arr[nxt], self._la_p_arr[nxt], top_n,
            have_top, self._prot, self._etnu, bufs[0], bufs[1], bufs[2],
        )  # fmt: skip
        if m == -2:
            return False
        self._look_named = None
        self._la_rows[g] += 1
        if scored:
            self._la_on[g] = self._la_on_arr[g].tolist()
            self._la_p[g] = self._la_p_arr[g].tolist()
        self._la_picks = (iteration, nxt, pk)
        st = self._stats
        st["lookahead_gates"] += 1
        if m < 0:
            return True
        st["lookahead_orders"] += m
        js = bufs[0][:m].tolist()
        fs = frozenset(js)
        self._look_named = (cur, nxt, fs)
        self._admit_named = (fs, bufs[0][:m].copy())
        if not m:
            return True
        self._ev += 1  # the picks' protection (in the kernel), its version bump once
        if self._no_prefetch:
            return True
        look_q, cands, issued = self._look_q, self._dl_cands, it.issued_mv
        d = self._layer_ents[nxt]
        ents = self._ents_of[nxt] if self._cache_of else None
        pm, im, base = cands._pm, cands._im, nxt * cands.J  # CandidateSet.put, inlined
        for j, p, q in zip(js, bufs[1][:m].tolist(), bufs[2][:m].tolist(), strict=True):
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
        return True
