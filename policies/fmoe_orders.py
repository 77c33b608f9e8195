"""fMoE's prefetch orders (FMOE_ALGORITHM.md steps 3-4): select experts from a searched
map with the similarity-aware threshold and order them by p / (l - l_now), as a mixin
of :class:`policies.fmoe.FmoePolicy`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.fmoe_cands import CandidateSet
from policies.fmoe_select import merge_priorities, select_experts, select_row
from policies.fmoe_state import _IterState

# from this many experts _order protects them with numpy writes instead of one by one
_BULK = 16
# _order's deadline candidates through policies.fmoe_jit.fresh_put (False: the loop;
# tests compare them)
_FRESH_KERNEL = True
# a layer still ahead: its protection and deadline candidates in one kernel call
# (policies.fmoe_orders_jit.protect_put; False: the loop or numpy writes, then fresh_put)
_PROTECT_PUT = True
# the executor's residency arrays where it offers them (False: the caches' dicts
# always; tests and measurements compare the two)
_ARRAYS = True


class FmoeOrders:
    """Steps 3-4 of fMoE: expert selection and prefetch orders."""

    _orders_k: object = None  # policies.fmoe_orders_jit (numba: at the first order)
    # the executor's Residency and its state as [L, J] (array, memoryview), memoized
    _res_memo: tuple = (None, None, None)

    def _res_rows(self) -> tuple[np.ndarray, memoryview] | None:
        """The executor's cache membership as arrays, where it offers them
        (:meth:`policies.base.ExecutorView.residency`): the state [L, J] (0 absent, 1
        loading, 2 resident; non-zero is "in its device's entries") as an array and as a
        memoryview (a Python int per read); None where the executor keeps no arrays (the
        Python engine, the real executor) and the caches' dicts are read instead. Fetched
        at every call (an executor may hand out others or none later)."""
        if not _ARRAYS:
            return None
        view = self._view  # type: ignore[attr-defined]
        f = getattr(view, "residency", None)
        res = f() if f is not None else None
        if res is None:
            return None
        memo = self._res_memo
        if memo[0] is not res:
            assert self.spec is not None  # type: ignore[attr-defined]
            st = res.state.reshape(-1, self.spec.num_experts)  # type: ignore[attr-defined]
            memo = self._res_memo = (res, st, memoryview(st))
        return memo[1], memo[2]

    def _issue(
        self, it: _IterState, layer: int, probs: np.ndarray, score: np.ndarray, now_layer: int
    ) -> None:
        """Steps 3-4: select per row, merge over rows, order by priority p / (l - l_now)."""
        assert self.spec is not None
        if probs.shape[0] == 1:
            self._issue_row(it, layer, probs[0].tolist(), float(score[0]), now_layer)
            return
        mask = select_experts(probs, score, self.spec.top_k, use_delta=self.use_delta)
        if self.use_delta:  # rows whose weak match took more than the top-K (step 3)
            self._stats["delta_widened"] += int(
                np.count_nonzero(mask.sum(axis=1) > self.spec.top_k)
            )
        merged = merge_priorities(probs, mask, layer, now_layer)
        order = sorted(merged, key=lambda j: (-merged[j], j))
        self._order(it, layer, order, [merged[j] for j in order])

    def _row_orders(
        self, rows: np.ndarray, scores: np.ndarray, dist: np.ndarray
    ) -> tuple[list[list[int]], list[list[float]], list[tuple[np.ndarray, np.ndarray]]]:
        """:meth:`_issue_row`'s selection and priorities for R one-row predictions at once
        (its per-row Python costs more from a few rows on): rows [R, J] with their scores
        [R], ``dist`` [R, 1] the float64 layer distances (so p / dist is Python's float
        division). Returns each row's selected experts, best first, and their priorities
        p / dist in the same order (only the selected ones are ever ordered), and both
        again as arrays (int64, float64: views of one buffer each) for :meth:`_order`."""
        assert self.spec is not None
        R, J = rows.shape
        picks = np.empty((R, J), np.int64)
        counts = np.empty(R, np.int64)
        flat_j = np.empty(R * J, np.int64)
        flat_v = np.empty(R * J, np.float64)
        k = min(max(int(self.spec.top_k), 1), J)
        # one call: the selection, then only the selected (expert, p / dist) leave numpy,
        # packed (an R x max-count block of them costs more than the selection on
        # fine-grained models, whose weak matches select a hundred of a few rows')
        t = self._jit.select_rows_flat(
            rows, scores, k, self.use_delta, dist, picks, counts, flat_j, flat_v
        )
        fj, fv = flat_j[:t].tolist(), flat_v[:t].tolist()
        chosen: list[list[int]] = []
        prio: list[list[float]] = []
        arrs: list[tuple[np.ndarray, np.ndarray]] = []
        a = 0
        for c in counts.tolist():
            b = a + c
            chosen.append(fj[a:b])
            prio.append(fv[a:b])
            arrs.append((flat_j[a:b], flat_v[a:b]))
            a = b
        return chosen, prio, arrs

    def _issue_row(
        self, it: _IterState, layer: int, row: list[float], score: float, now_layer: int
    ) -> None:
        """_issue for one row (decode) of J probabilities: the merge over rows is the row."""
        assert self.spec is not None
        dist = float(layer - now_layer)
        if dist <= 0:
            raise ValueError(
                f"priority for layer {layer} at executing layer {now_layer}: not ahead"
            )
        chosen = select_row(row, score, self.spec.top_k, use_delta=self.use_delta)
        prio = [p / dist for p in row]
        chosen.sort(key=lambda j: (-prio[j], j))
        self._issue_picks(it, layer, chosen, [prio[j] for j in chosen])

    def _issue_picks(
        self,
        it: _IterState,
        layer: int,
        picks: list[int],
        vals: Sequence[float],
        arrs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Order one row's selected experts ``picks`` (best first) at priorities ``vals``
        (in the same order); ``arrs``: both as arrays, where the caller has them."""
        assert self.spec is not None
        if len(picks) > self.spec.top_k:  # the weak match took more than the top-K (step 3)
            self._stats["delta_widened"] += 1
        self._order(it, layer, picks, vals, arrs)

    def _order(
        self,
        it: _IterState,
        layer: int,
        experts: list[int],
        vals: Sequence[float],
        arrs: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Queue orders for ``experts`` (best first) at priorities ``vals`` (the same
        order; ``arrs``: both as int64 and float64 arrays where the caller has them, the
        same values), skipping those already ordered this iteration or cached (resident or
        loading). Every selected expert of a layer still ahead is protected from eviction
        until that layer has run; with deadline admission the orders become candidates
        instead."""
        cache_of = self._cache_of
        issued = it.issued_mv
        # protect (see FmoeEviction._protect, inlined: this runs for every selected expert)
        protect = layer > self._g
        if protect:
            self._ev += 1  # protections change eviction scores (victim_index's ranking)
        prot, etnu = self._prot_mv, self._etnu_mv
        deadline = self._view is not None
        # this hook's deadline candidates (FmoeDeadline._candidate, inlined)
        cands = self._dl_cands if deadline else None
        ahead = float(layer - self._g)
        orders = 0
        if (
            _PROTECT_PUT
            and _FRESH_KERNEL
            and cands is not None
            and cache_of
            and not self._no_prefetch
            and 0 < len(experts) <= len(self._no_hit)
        ):
            # the protection and the candidates below in one kernel call
            self._order_candidates(it, cands, layer, experts, vals, ahead, arrs, protect)
            return
        if protect and len(experts) > _BULK:
            # a fine-grained layer's weak match selects up to all its experts: protect
            # them in two numpy writes (the same values as the loop's, one per expert)
            idx = np.array(experts, np.intp)
            self._prot[layer, idx] = True
            self._etnu[layer, idx] = -0.0
            protect = False
        if cands is not None and not protect and cache_of and not self._no_prefetch:
            if _FRESH_KERNEL and 0 < len(experts) <= len(self._no_hit):
                self._order_candidates(it, cands, layer, experts, vals, ahead, arrs)
                return
            # the loop below for deadline candidates, without its per-expert branches
            put = cands.put
            for j, v in zip(experts, vals, strict=True):
                key = (layer, j)
                if issued[key] or key in cache_of[layer][j].entries:
                    continue
                issued[key] = True
                put(layer, j, v * ahead)
            return
        for j, v in zip(experts, vals, strict=True):
            key = (layer, j)
            if protect:
                prot[key] = True
                etnu[key] = -0.0
            # ctx.is_cached(key), inlined: this runs for every candidate order
            if issued[key] or (cache_of and key in cache_of[layer][j].entries):
                continue
            issued[key] = True
            if self._no_prefetch:
                continue
            if cands is not None:
                cands.put(layer, j, v * ahead)
                continue
            self.prefetch(layer, j, v)
            orders += 1
        if orders:
            self._orders_issued += orders

    def _order_candidates(
        self,
        it: _IterState,
        cands: CandidateSet,
        layer: int,
        experts: list[int],
        vals: Sequence[float],
        ahead: float,
        arrs: tuple[np.ndarray, np.ndarray] | None = None,
        protect: bool = False,
    ) -> None:
        """:meth:`_order`'s deadline candidates (``experts`` of ``layer``; a fine-grained
        layer's weak match selects a hundred; ``protect``: all of them protected from
        eviction first, policies.fmoe_orders_jit, in the same call): which experts are
        neither ordered this iteration nor cached are marked ordered and become candidates
        at p = priority x ``ahead``, in order, each kept at the larger p where it already
        is one: one kernel call (:func:`policies.fmoe_jit.fresh_put`, the loop's and
        :meth:`policies.fmoe_cands.CandidateSet.put`'s rule; each numba call costs a few
        microseconds of argument checks, so one call, not one per step)."""
        if arrs is None:  # (a decode plan hands its arrays over: no conversion per gate)
            arrs = (np.array(experts, np.int64), np.asarray(vals, np.float64))
        rows = self._res_rows()
        if rows is not None:  # the executor's arrays: the layer's row at these experts
            cached = rows[0][layer][arrs[0]] != 0
        else:
            keys = [(layer, j) for j in experts]
            d = self._layer_ents[layer]
            if d is not None:  # one cache holds the layer: its cached keys among these, in C
                hit = d.keys() & keys
            else:
                ents = self._ents_of[layer]
                hit = {k for k in keys if k in ents[k[1]]}
            n = len(keys)
            cached = np.fromiter(map(hit.__contains__, keys), np.bool_, n) if hit else self._no_hit
        if protect:  # and protected first (policies.fmoe_orders_jit)
            K = self._orders_k
            if K is None:
                from policies import fmoe_orders_jit  # numba: at the first order

                K = self._orders_k = fmoe_orders_jit
            cands.cnt = K.protect_put(True, self._prot, self._etnu, it.issued, layer, arrs[0],
                                      cached, arrs[1], ahead, cands.p, cands.idx, cands.cnt)  # fmt: skip
            return
        cands.cnt = self._jit.fresh_put(
            it.issued,
            layer,
            arrs[0],
            cached,
            arrs[1],
            ahead,
            cands.p,
            cands.idx,
            cands.cnt,
        )
