"""fMoE's measured use of lookahead rows, as a mixin of :class:`policies.fmoe.FmoePolicy`.

A lookahead row is layer l+1's gate applied to layer l's hidden state (Mixtral-Offloading's
one-layer speculation; the trace or the real executor supplies it). How often its top-K
names the experts layer l+1 then chooses depends on the model, and no real trace here
measures it, so ``lookahead="auto"`` (the default) measures it while it runs and uses it
only as far as it is right:

- at gate l, each row's top-K of its lookahead row are the *picks* for layer l+1, one per
  rank r (1st, 2nd, ... most probable);
- at gate l+1 each pick is scored against the experts its row chose there, per cell
  (layer l+1, rank r): picks n, hits h, and the hits a guess independent of the token
  would score, e = sum of each picked expert's chance of being chosen at that layer so
  far (its running choice frequency, one pseudo-observation at K/J: the uninformed rate,
  as in the eviction's table);
- a cell is *on* while its excess hits S = h - e cross an anytime-valid boundary: for
  picks that carry nothing about the route, S is a sum of martingale differences in an
  interval of length 1 (sub-Gaussian, variance proxy V = n / 4), and Robbins' normal
  mixture bound keeps every such sum below sqrt((V + RHO) ln((V + RHO) / (RHO a^2)))
  at every n at once with chance at least 1 - a (Howard et al. 2021, "Time-uniform,
  nonparametric, nonasymptotic confidence sequences"). a = ``ALPHA`` / (number of cells),
  so with chance at least 1 - ``ALPHA`` no noise cell of a run is ever on, however long
  it runs and however often it is checked (a fixed z-score, checked at every gate, would
  cross sooner or later: one early hit of a 7% pick is a 3.7-sigma excess);
- the picks of cells that are on are ordered for layer l+1 with p = (h + K/J) / (n + 1),
  the cell's measured precision, through the policy's usual path (priority p / 1,
  deadline admission, protection until the layer has run), and the deadline admission's
  chance of use for them is at least that p (over an iteration's rows, 1 - the product
  of the picking rows' 1 - p).

Rows that carry nothing about the next layer (noise) score chance: their cells stay off
and the policy orders exactly what ``lookahead=false`` orders. ``ALPHA = 0.01``: one run
in a hundred may use a noise cell; ``RHO = 1/4``, one pick's variance proxy, puts the
boundary's tightest point at the first picks, where a useful cell should turn on (a
cell right 73% of the time against 10% chance turns on after about 20 picks).

The map forecast's precision is measured alike (its top-K for a layer forecast in this
iteration against the chosen experts, one-row iterations; ``map_topk_precision``), and
the two forecasts are combined by measurement, not by a formula: in one-row iterations
whose next layer the map forecast, each cell's picks are split by whether the map's
top-K also names them, and a pick's p is its part's measured precision (one
pseudo-observation at the cell's). Neither formula fits: the forecasts share
information (the same token's route), so 1 - (1 - p_map)(1 - p_look) would count it
twice, while the larger of the two ignores that agreement is evidence (on the bundled
Qwen1.5-MoE workload the lookahead is right 73% of the time, the map's top-K 45%, and
the lookahead's picks the map also names 88%). Where both select an expert its
candidate keeps the larger of the two p's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from policies.fmoe_gate_row import FmoeGateRow
from policies.fmoe_look_row import FmoeLookRow
from specs.errors import InputError

# chance that any noise cell of a run is ever on; the mixture's scale (module doc)
ALPHA = 0.01
RHO = 0.25
# one-row gates are measured by policies.fmoe_look_jit (False: the numpy code, for tests)
_KERNEL = True
# one-row gates with deadline admission run _lookahead_gate in one kernel call
# (policies.fmoe_look_jit.look_gate_row; False: the Python, the reference for tests)
_GATE_KERNEL = True


def mixture_boundary(n: np.ndarray, log_a2: float) -> np.ndarray:
    """Robbins' normal-mixture boundary for sums of n martingale differences in an
    interval of length 1 (variance proxy n / 4, scale RHO): with chance at least 1 - a
    (``log_a2`` = ln a^2) no such sum is above it at any n."""
    v = np.asarray(n, dtype=np.float64) / 4.0 + RHO
    return np.sqrt(v * (np.log(v / RHO) - log_a2))


class FmoeLookahead(FmoeLookRow, FmoeGateRow):
    """Online precision of lookahead rows and of the map forecast; orders of cells that
    are measured right (``lookahead="auto"``)."""

    def _setup_lookahead(self, L: int, J: int, K: int) -> None:
        """Empty measurements for L layers, J experts, top-K."""
        k = min(K, J)
        self._la_k = k
        self._la_base = K / J
        # the per-cell and per-layer counts below are views of two arrays, so that a
        # kernel takes them as two arguments (policies/fmoe_row_jit.py: la_cell, la_layer)
        self._la_cell = np.zeros((8, L, k))
        self._la_layer = np.zeros((7, L))
        # per (layer, rank): picks, hits, chance hits
        self._la_n, self._la_h, self._la_e = self._la_cell[0], self._la_cell[1], self._la_cell[2]
        self._la_log_a2 = 2.0 * math.log(ALPHA / (L * k))  # ln a^2 per cell
        self._la_on = [[False] * k for _ in range(L)]
        self._la_on_arr = np.zeros((L, k), np.bool_)  # the same, for kernels (fmoe_admit_jit)
        self._la_p = [[self._la_base] * k for _ in range(L)]
        self._la_p_arr = self._la_cell[3]  # the same (kernels)
        self._la_p_arr[:] = self._la_base
        # the choice frequency per layer: times chosen per expert, rows seen
        self._la_chosen = np.zeros((L, J))
        self._la_rows = self._la_layer[0]
        # the picks for the next layer: (iteration, layer, [B, k] expert ids)
        self._la_picks: tuple[int, int, np.ndarray] | None = None
        # the map forecast's top-K precision per layer: picks, hits
        self._map_n, self._map_h = self._la_layer[1], self._la_layer[2]
        # picks of one-row iterations whose layer had a map forecast, per [the map's
        # top-K names it (1) or not (0)]: picks, hits per (layer, rank)
        self._la_cat_n = self._la_cell[4:6]
        self._la_cat_h = self._la_cell[6:8]
        self._look_q: dict[tuple[int, int], float] = {}  # this gate's lookahead chances
        # the map forecast's top-k per layer, with the forecast row it was made of
        self._map_top_memo: dict[int, tuple[list[float], list[int]]] = {}
        self._la_bounds: dict[bytes, np.ndarray] = {}  # mixture_boundary per pick counts
        self._no_ids = np.zeros(0, np.int64)
        # row id -> (row, top-k, the same as an int64 array): FmoeSearch._plan_decode's
        self._plan_tops: dict[int, tuple[list[float], list[int], np.ndarray]] = {}
        # the map forecast's top-K of one-row iterations split by whether the lookahead
        # ordered them at the gate before (1) or not (0): picks, hits per layer; and the
        # experts the lookahead ordered at this gate: (iteration, layer, experts)
        self._mcat_n = self._la_layer[3:5]
        self._mcat_h = self._la_layer[5:7]
        self._look_named: tuple[int, int, frozenset[int]] | None = None
        from policies import fmoe_look_jit  # numba: loaded at bind, not at import

        self._la_jit = fmoe_look_jit
        self._la_J = J
        self._map_top_arr: dict[int, tuple[Any, np.ndarray]] = {}
        self._la_out = (np.empty(k, np.int64), np.empty(k), np.empty(k))  # look_gate_row's
        # policies.fmoe_gate_row's: the orders (experts; p and chance), the row as float64,
        # the picks when there is no row
        self._row_out = (np.empty(k, np.int64), np.empty((2, k)))
        self._row64 = np.empty(J)
        self._no_pk = np.empty((1, k), np.int64)

    def _map_topk(self, layer: int) -> list[int]:
        """The top-k experts of layer ``layer``'s map forecast (``self._pred[layer]``),
        best first, ties to the lower id: ``sorted(range(J), key=lambda j: (-row[j],
        j))[:k]``. Kept per forecast row (rows are swapped whole, never changed in place):
        gate g scores layer g's, which gate g - 1 ordered with."""
        row = self._pred[layer]
        memo = self._map_top_memo.get(layer)
        if memo is not None and memo[0] is row:
            return memo[1]
        plan = self._plan_tops.get(id(row))  # a decode plan's rows (FmoeSearch._plan_decode)
        if plan is not None and plan[0] is row:
            self._map_top_memo[layer] = (row, plan[1])
            return plan[1]
        a = None if len(row) <= 32 else np.asarray(row, dtype=np.float64)
        if a is None or np.isnan(a).any():  # few experts; or NaNs, ordered as Python does
            top = sorted(range(len(row)), key=lambda j: (-row[j], j))[: self._la_k]
        else:  # a stable sort of -p: the same order (-0.0 == 0.0 ties by id, as there)
            top = np.argsort(-a, kind="stable")[: self._la_k].tolist()
        self._map_top_memo[layer] = (row, top)
        return top

    # -- measurement ------------------------------------------------------------------------
    def _lookahead_score(self, g: int, ids: np.ndarray, iteration: int) -> None:
        """Layer g's gate chose ``ids`` [B, K]: score the picks made for it at gate g-1
        (same iteration and rows) and the map forecast, then count the choice."""
        ids = np.asarray(ids).reshape(len(ids), -1)
        B = len(ids)
        picks = self._la_picks
        hit = None
        scored = (
            picks is not None and picks[0] == iteration and picks[1] == g and len(picks[2]) == B
        )
        if B == 1 and _KERNEL:  # one row: the code below in one kernel call (fmoe_look_jit)
            n = self._la_n[g]
            bnd = self._boundary(n + 1.0) if scored else n  # the boundary of the new n
            on = np.empty(self._la_k, np.bool_)
            p = np.empty(self._la_k)
            map_it = bool(self._fc_it[g] == self._cur_it)  # the map forecast this layer
            top = np.array(self._map_topk(g), np.int64) if map_it else self._no_ids
            self._la_jit.score_row(
                self._la_chosen[g], self._la_rows[g], self._la_base,
                picks[2][0] if scored else self._no_ids, ids[0], n, self._la_h[g],
                self._la_e[g], scored, bnd, on, p, top, map_it, self._map_n, self._map_h,
                self._la_cat_n, self._la_cat_h, g,
            )  # fmt: skip
            self._la_rows[g] += B
            if scored:
                self._la_on[g] = on.tolist()
                self._la_on_arr[g] = on
                self._la_p[g] = p.tolist()
                self._la_p_arr[g] = p
            self._la_picks = None
            return
        if scored:
            hit = self._score_picks(g, picks[2], ids)
        self._la_picks = None
        if B == 1 and self._fc_it[g] == self._cur_it:  # a map forecast made for this layer
            self._map_score(g, ids, picks, hit)
        np.add.at(self._la_chosen[g], ids.reshape(-1), 1.0)
        self._la_rows[g] += B

    def _score_picks(self, g: int, pk: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Score rows' picks ``pk`` [B, k] for layer g against their choices ``ids``
        [B, K] into g's cells (the chance hits from the choice frequency before these
        rows' choices are counted) and update the cells' on/off and p; returns the hits
        [B, k]."""
        f = (self._la_chosen[g] + self._la_base) / (self._la_rows[g] + 1.0)
        e = f[pk]  # [B, k] chance of each pick
        hit = (pk[:, :, None] == ids[:, None, :]).any(axis=2)
        self._la_n[g] += len(pk)
        self._la_h[g] += hit.sum(axis=0)
        self._la_e[g] += e.sum(axis=0)
        n, h, ec = self._la_n[g], self._la_h[g], self._la_e[g]
        self._la_on[g] = [bool(x) for x in (h - ec > mixture_boundary(n, self._la_log_a2))]
        self._la_on_arr[g] = self._la_on[g]
        self._la_p[g] = ((h + self._la_base) / (n + 1.0)).tolist()
        self._la_p_arr[g] = self._la_p[g]
        return hit

    def _lookahead_fit(self, ids: np.ndarray, look: np.ndarray) -> None:
        """Score one training request's lookahead picks (``ids`` [T, L, K] chosen,
        ``look`` [T, L, J] lookahead rows) into the cells, as the gates would: the
        request's T rows are one batch, their chance hits from the choice frequency
        before it. The same measurement as at run time, on the rows the store is filled
        from, so a cell the training rows show right is on from the first served token
        (at run time it needed about 20 picks, most of a short request's decode steps).
        The bound still holds: the training rows are more picks of the same cells, and
        each batch's chance hits are fixed before its choices are counted."""
        ids = np.asarray(ids).reshape(ids.shape[0], ids.shape[1], -1)
        T, L = ids.shape[0], ids.shape[1]
        if T == 0 or self._la_n.shape[0] != L:
            return
        k = self._la_k
        for g in range(L):  # a layer's cells depend on that layer's counts only
            if g > 0:  # gate g - 1's picks for layer g, as _lookahead_picks makes them
                pk = np.argsort(-np.asarray(look[:, g - 1], np.float64), axis=1, kind="stable")
                self._score_picks(g, pk[:, :k], ids[:, g])
            np.add.at(self._la_chosen[g], ids[:, g].reshape(-1), 1.0)
            self._la_rows[g] += T
        self._stats["fit_rows_lookahead"] += T

    def _map_split_score(self, g: int, ids: np.ndarray) -> None:
        """One row's gate g chose ``ids``: where the map forecast layer g in this iteration
        and the lookahead ordered experts for it at gate g - 1, score the map's top-K
        split by whether the lookahead ordered them (what a map pick the lookahead does
        not order is worth, policies.fmoe_deadline)."""
        named, self._look_named = self._look_named, None
        if (
            named is None
            or named[0] != self._cur_it
            or named[1] != g
            or len(ids) != 1
            or self._fc_it[g] != self._cur_it
        ):
            return
        chosen = set(np.asarray(ids).reshape(-1).tolist())
        for j in self._map_topk(g):
            c = 1 if j in named[2] else 0
            self._mcat_n[c, g] += 1.0
            self._mcat_h[c, g] += 1.0 if j in chosen else 0.0

    def _map_only(self, layer: int, j: int) -> tuple[float, float] | None:
        """(hits, picks) of the map's top-K picks the lookahead did not order, at layer
        ``layer``, when (layer, j) is such a pick now: the lookahead ordered experts for
        ``layer`` at this gate of this iteration and not j (else None)."""
        named = self._look_named
        if named is None or named[1] != layer or named[0] != self._cur_it or j in named[2]:
            return None
        return float(self._mcat_h[0, layer]), float(self._mcat_n[0, layer])

    def _boundary(self, n: np.ndarray) -> np.ndarray:
        """mixture_boundary(n) of a cell row's pick counts, kept per distinct ``n`` (one
        row's gates give every layer the same counts in turn: computed once, the same
        call on the same values)."""
        key = n.tobytes()
        b = self._la_bounds.get(key)
        if b is None:
            if len(self._la_bounds) > 4096:
                self._la_bounds.clear()
            b = self._la_bounds[key] = mixture_boundary(n, self._la_log_a2)
        return b

    def _map_score(self, g: int, ids: np.ndarray, picks: Any, hit: np.ndarray | None) -> None:
        """One row's gate g chose ``ids`` [1, K] and the map forecast layer g in this
        iteration: score the map's top-K, and split the lookahead's picks (``hit``: which
        were right; None when none were scored) by whether the map's top-K names them."""
        k = self._la_k
        top = self._map_topk(g)
        chosen = set(ids[0].tolist())
        self._map_n[g] += k
        self._map_h[g] += sum(j in chosen for j in top)
        if hit is not None:  # split by whether the map's top-K also names the pick
            tops = set(top)  # np.isin(picks, top), without its cost on k ids
            agree = np.array([j in tops for j in picks[2][0].tolist()], np.int64)
            ranks = np.arange(len(agree))
            self._la_cat_n[agree, g, ranks] += 1.0
            self._la_cat_h[agree, g, ranks] += hit[0]

    def _lookahead_picks(self, g: int, rows: np.ndarray, iteration: int) -> np.ndarray:
        """Each row's top-k of its lookahead row for layer g+1 ([B, k], best first; ties
        to the lower id), kept to be scored at gate g+1."""
        k = self._la_k
        pk = None
        if len(rows) == 1 and _KERNEL:  # one row: its top-k by a k-scan kernel, no sort
            pk = np.empty((1, k), np.int64)
            if not self._la_jit.topk_row(rows[0], k, pk[0]):
                pk = None  # a NaN: numpy's order
        if pk is None:
            pk = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        self._la_picks = (iteration, g + 1, pk)
        return pk

    # -- orders -----------------------------------------------------------------------------
    def _lookahead_measured_orders(self, it: Any, nxt: int, pk: np.ndarray) -> None:
        """Order the picks of layer ``nxt``'s cells that are on at their measured p (the
        largest over rows); each is protected until its layer has run."""
        on, pv = self._la_on[nxt], self._la_p[nxt]
        if not any(on):
            return
        top: set[int] | None = None
        if len(pk) == 1 and self._fc_it[nxt] == self._cur_it:  # the map forecast layer nxt
            top = set(self._map_topk(nxt))
            # as Python floats: the same float64 arithmetic below, without numpy scalars
            cn, ch = self._la_cat_n[:, nxt].tolist(), self._la_cat_h[:, nxt].tolist()
        prio: dict[int, float] = {}  # the largest p over rows (its ranking, as the maps')
        miss: dict[int, float] = {}  # no row that picked it chooses it (rows independent)
        rows = pk.tolist()
        if top is not None:  # one row, the map forecast's: its distinct picks (a top-k)
            for r, j in enumerate(rows[0]):
                if on[r]:  # its category's precision, shrunk toward the cell's
                    c = 1 if j in top else 0
                    p = (ch[c][r] + pv[r]) / (cn[c][r] + 1.0)
                    if p > -1.0:  # prio.get(j, -1.0): a distinct pick is new
                        prio[j] = p
                    miss[j] = 1.0 * (1.0 - p)  # miss.get(j, 1.0) * (1.0 - p), the same
            rows = []
        for row in rows:
            for r, j in enumerate(row):
                if on[r]:
                    p = pv[r]
                    if p > prio.get(j, -1.0):
                        prio[j] = p
                    miss[j] = miss.get(j, 1.0) * (1.0 - p)
        self._stats["lookahead_orders"] += len(prio)
        self._look_named = (self._cur_it, nxt, frozenset(prio))
        deadline = self._view is not None
        cache_of = self._cache_of
        look_q = self._look_q
        ranked = sorted(prio, key=lambda j: (-prio[j], j)) if len(prio) > 1 else list(prio)
        if ranked:
            self._ev += 1  # FmoeEviction._protect per pick below, its version bump once
        prot, etnu, no_prefetch = self._prot_mv, self._etnu_mv, self._no_prefetch
        put = self._dl_cands.put if deadline else None  # FmoeDeadline._candidate, inlined
        for j in ranked:
            key = (nxt, j)
            p = prio[j]
            prot[key] = True  # protected as _order does (FmoeEviction._protect, inlined)
            etnu[key] = -0.0
            if (cache_of and key in cache_of[nxt][j].entries) or no_prefetch:
                continue
            if deadline:
                # a candidate at the larger of its p's; its chance of use at least the
                # picks' (FmoeDeadline._iteration_chance)
                look_q[key] = 1.0 - miss[j]
                put(nxt, j, p)  # type: ignore[misc]
                it.issued_mv[key] = True
            elif not it.issued_mv[key]:
                it.issued_mv[key] = True
                self.prefetch(nxt, j, p)
                self._orders_issued += 1

    def _lookahead_gate(self, ev: Any, g: int) -> None:
        """At gate g (after the map's orders): score the picks for g, make the picks for
        g+1 from the lookahead rows and order them per ``lookahead`` (false: none; true:
        every row's top-K at its row probability; auto: the cells measured right)."""
        mode = self._la_mode
        if mode is False or self.spec is None:
            return
        self._look_q = {}
        if (
            _GATE_KERNEL
            and mode == "auto"
            and self._view is not None
            and self._lookahead_gate_row(ev, g)
        ):
            return
        self._lookahead_score(g, ev.topk_ids, ev.iteration)
        self._map_split_score(g, ev.topk_ids)
        la = ev.lookahead
        it = self._it
        L, J = self.spec.num_moe_layers, self.spec.num_experts
        if la is None or it is None or g + 1 >= L or it.iteration != ev.iteration:
            return
        rows = np.asarray(la, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != J:
            raise InputError(
                f"policy 'fmoe': lookahead rows of layer {g} have shape {rows.shape}, "
                f"expected (B, {J})"
            )
        pk = self._lookahead_picks(g, rows, ev.iteration)
        self._stats["lookahead_gates"] += 1
        if mode is True:
            prio: dict[int, float] = {}
            for b, row in enumerate(pk.tolist()):
                for j in row:
                    prio[j] = max(prio.get(j, 0.0), float(rows[b, j]))
            order = sorted(prio, key=lambda j: (-prio[j], j))
            self._order(it, g + 1, order, [prio[j] for j in order])
        else:
            self._lookahead_measured_orders(it, g + 1, pk)

    def _look_recall(self, layer: int) -> float:
        """Of layer ``layer``'s chosen experts that the map forecast's top-K named, the
        share the lookahead also orders at the gate before it (its picks there that the
        map also names and that were chosen, in the cells that are on: ``auto``; every
        cell with ``true``), measured in one-row iterations; 0.0 without lookahead orders
        or a measurement. A right map pick's saving is the lookahead's too this often."""
        mode = self._la_mode
        if mode is False or not 0 <= layer < len(self._la_on):
            return 0.0
        named = float(self._map_h[layer])
        if named <= 0:
            return 0.0
        h = self._la_cat_h[1, layer].tolist()
        on = self._la_on[layer] if mode != True else [True] * len(h)  # noqa: E712 - option
        hits = 0.0
        for x, o in zip(h, on, strict=True):
            if o:
                hits += x
        return hits / named if hits < named else 1.0

    def lookahead_metadata(self) -> dict[str, Any]:
        """What the measurements say: picks scored, the lookahead's and the map's top-K
        precision (pooled over layers), the chance precision, cells on."""
        if not hasattr(self, "_la_n"):
            return {"lookahead": self._la_mode}
        n, h, e = float(self._la_n.sum()), float(self._la_h.sum()), float(self._la_e.sum())
        mn, mh = float(self._map_n.sum()), float(self._map_h.sum())
        cells = sum(len(r) for r in self._la_on)

        def ratio(a: float, b: float) -> float | None:
            return a / b if b > 0 else None

        return {
            "lookahead": {True: "true", False: "false"}.get(self._la_mode, "auto"),
            "lookahead_picks_scored": int(n),
            "lookahead_precision": ratio(h, n),
            "lookahead_chance_precision": ratio(e, n),
            "lookahead_cells_on": f"{sum(map(sum, self._la_on))}/{cells}",
            "map_topk_precision": ratio(mh, mn),
            "lookahead_precision_where_map_agrees": ratio(
                float(self._la_cat_h[1].sum()), float(self._la_cat_n[1].sum())
            ),
            "lookahead_precision_where_map_differs": ratio(
                float(self._la_cat_h[0].sum()), float(self._la_cat_n[0].sum())
            ),
            "lookahead_orders": self._stats["lookahead_orders"],
        }
