"""fMoE's searches (FMOE_ALGORITHM.md steps 1-2): the semantic search at an iteration's
start, the trajectory search at each gate, and their precomputed plan, as a mixin of
:class:`policies.fmoe.FmoePolicy` (it owns the state these methods read and write)."""

from __future__ import annotations

import numpy as np

from policies.base import IterationGates, IterationStart
from policies.expert_map_store import ExpertMapStore
from policies.fmoe_eviction import SEMANTIC, TRAJECTORY, forecast_rows
from policies.fmoe_select import topk_rows
from policies.fmoe_state import _inv_sqrt, _IterState, _SearchPlan
from specs.errors import InputError


class FmoeSearch:
    """Steps 1-2 of fMoE: semantic and trajectory searches over the expert map store."""

    def _semantic_search(
        self, it: _IterState, has: np.ndarray, store: ExpertMapStore
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Step 1 for the rows with an embedding (``has``): fill ``it.sem``; with the
        semantic prediction on, forecast layers 0..d-1 (``_pred``) and return the searched
        maps' first d layers [d, R, J] and match scores [R] (None when nothing was searched)."""
        n = store.size
        if it.query is None or n == 0:
            return None
        it.sem[:, :n] = store.semantic_scores(it.query)
        if not self.use_semantic:
            return None  # still computed: the store's RDY needs s_sem at iteration end
        rows = np.flatnonzero(has)
        best = np.argmax(it.sem[rows, :n], axis=1)
        score = it.sem[rows, best]
        pred = store.maps[: self.distance, best, :]  # [d, R, J]
        self._stats["semantic_searches"] += len(rows)
        # a layer's p changes only when that layer is forecast (as the official code's cache
        # does): the semantic search forecasts layers 0..d-1, each trajectory search one
        fresh = list(self._pred)  # swapped whole: eviction_score may read it from another thread
        top = pred.max(axis=1)  # [d, J]
        fresh[: self.distance] = top.tolist()
        self._pred = fresh
        # _forecast of layers 0..d-1 (SEMANTIC), at once
        self._fc_it[: self.distance] = self._cur_it
        self._fc_row[: self.distance] = forecast_rows(top.astype(np.float64), SEMANTIC)
        self._etnu_dirty = True
        self._ev += 1
        return pred, score

    def _need_store(self) -> ExpertMapStore:
        if self.store is None or self.spec is None:
            raise InputError("policy 'fmoe' used before bind()")
        return self.store

    def _row_queries(self, ev: IterationStart, B: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Prepared row embeddings [B, E] (``store.prepare`` of :meth:`_embeddings`) and
        which rows have one. A request's prompt embedding stays fixed, so a batch of the
        same requests as the last one prompt-embedded reuses its prepared rows (the very
        same values: the same rows prepared the same way)."""
        last = self._batch_query
        if ev.embeddings is None and last is not None and last[0] == ev.request_ids:
            _, query, has, n_has = last
            self._stats["rows_emb_prompt"] += n_has
            self._stats["rows_emb_none"] += B - n_has
            return query, has
        raw, has = self._embeddings(ev, B)
        query = None if raw is None else self._need_store().prepare(raw)
        if ev.embeddings is None:
            if query is not None:
                query.flags.writeable = False  # shared by the batch's iterations
            has.flags.writeable = False
            self._batch_query = (tuple(ev.request_ids), query, has, int(has.sum()))
        return query, has

    def _embeddings(self, ev: IterationStart, B: int) -> tuple[np.ndarray | None, np.ndarray]:
        """Row embeddings [B, H] (token, else prompt) and which rows have one."""
        if ev.embeddings is not None:
            self._stats["rows_emb_token"] += B
            return np.asarray(ev.embeddings, np.float32), np.ones(B, bool)
        got = [self._prompt_emb.get(rid) for rid in ev.request_ids]
        has = np.array([e is not None for e in got], bool)
        self._stats["rows_emb_prompt"] += int(has.sum())
        self._stats["rows_emb_none"] += int(B - has.sum())
        if not has.any():
            return None, has
        width = next(e.shape[0] for e in got if e is not None)
        raw = np.zeros((B, width), np.float32)
        for b, e in enumerate(got):
            if e is not None:
                raw[b] = e
        return raw, has

    def _new_state(self, iteration: int, B: int, query: np.ndarray | None) -> _IterState:
        """A fresh search state for B rows with prepared embeddings ``query`` [B, E]."""
        store = self._need_store()
        L, C, J = store.num_layers, store.capacity, store.num_experts
        self._it = _IterState(
            iteration=iteration,
            query=query,
            rows=B,
            observed=np.zeros((B, L, J), np.float32),
            seen=[False] * L,
            sem=np.zeros((B, C), np.float32),
            dots=np.zeros((B, C), np.float32),
            norm2=np.zeros(B, np.float32),
            version=store.version,
        )
        return self._it

    def _plan(self, gates: IterationGates, B: int, store: ExpertMapStore) -> _SearchPlan | None:
        """Every layer's trajectory search at once: the same float32 operations as
        :meth:`on_gate` (per-layer products stacked, running sums accumulated in layer
        order), so every value is bitwise the same. None when the gates do not fit B rows."""
        assert self.spec is not None
        L, J, n = self.spec.num_moe_layers, self.spec.num_experts, store.size
        if gates.probs is not None:
            rows = np.asarray(gates.probs, np.float32)
        else:
            ids = np.asarray(gates.topk_ids)
            w = np.asarray(gates.topk_weights)
            if ids.ndim != 3:
                return None
            K = ids.shape[2]
            rows = topk_rows(ids.reshape(-1, K), w.reshape(-1, K), J).reshape(ids.shape[0], -1, J)
        if rows.shape != (B, L, J):
            return None  # not this iteration's rows: search layer by layer
        cum_dots = np.matmul(rows.transpose(1, 0, 2), store.maps[:, :n].transpose(0, 2, 1))
        cum_norm2 = np.cumsum(np.einsum("blj,blj->lb", rows, rows), axis=0)  # [L, B]
        d = self.distance
        T = L - d  # the layers g whose search predicts layer g + d
        self._jit.running_sums(cum_dots)  # [L, B, n] float32 sums in layer order
        sims = cum_dots[:T] * store.inv_prefix[:T, None, :n]
        best = sims.argmax(axis=2)  # [T, B]
        top = sims[np.arange(T)[:, None], np.arange(B), best]
        score = top * _inv_sqrt(cum_norm2[:T])
        return _SearchPlan(rows, cum_dots, cum_norm2, best, score, n, store.version)

    def _plan_decode(
        self,
        it: _IterState,
        plan: _SearchPlan,
        lead: tuple[np.ndarray, np.ndarray] | None,
        store: ExpertMapStore,
    ) -> None:
        """One decode row: select the experts of every prediction of the iteration at once,
        the semantic search's ``lead`` (layers 0..d-1, ordered now) and each gate's
        trajectory search (kept in ``plan.targets`` for its gate)."""
        d, L = self.distance, store.num_layers
        targets = store.maps[np.arange(d, L), plan.best[:, 0]]  # [L - d, J]
        rows, scores, lo = targets, plan.score[:, 0], d  # predictions of layers lo..L-1
        if lead is not None:
            rows = np.concatenate((lead[0][:, 0], targets))
            scores = np.concatenate((np.repeat(lead[1], d), scores))
            lo = 0
        picks, prio, arrs = self._row_orders(rows, scores, self._decode_dist[lo:])
        for layer in range(lo, d):
            self._issue_picks(it, layer, picks[layer], prio[layer], arrs[layer])
        rows_py = targets.tolist()
        plan.targets = list(
            zip(rows_py, picks[d - lo :], prio[d - lo :], arrs[d - lo :], strict=True)
        )
        if self._la_mode is not False and len(rows) > 1 and not np.isnan(rows).any():
            # the lookahead measurement's top-k of each forecast row, in one sort (fewer
            # calls than one per gate; FmoeLookahead._map_topk looks them up by row): the
            # gates' rows and the semantic search's (layers 0..d-1, ``_pred``'s rows now,
            # the same values: one row's max over rows is the row)
            # (fmoe_look_jit.topk_rows: np.argsort(-rows, kind="stable")'s first k)
            top = np.empty((len(rows), self._la_k), np.int64)
            self._la_jit.topk_rows(rows, self._la_k, top)
            tops = top.tolist()
            keyed = rows_py if lo == d else self._pred[:d] + rows_py
            # (row, its top-k as a list, and as an int64 array for the one-call gate)
            self._plan_tops = {id(r): (r, t, a) for r, t, a in zip(keyed, tops, top, strict=True)}
        plan.fc_rows = forecast_rows(targets.astype(np.float64), TRAJECTORY)

    def _planned_gate(
        self,
        it: _IterState,
        plan: _SearchPlan,
        g: int,
        has_probs: bool,
        B: int,
        store: ExpertMapStore,
    ) -> None:
        """on_gate(g) from the plan: the same predictions and orders, no per-layer search."""
        plan.next_layer = g + 1
        it.seen[g] = True
        self._stats["gate_rows_gate_probs" if has_probs else "gate_rows_topk_weights"] += B
        target = g + self.distance
        if target >= len(self._pred) or not self.use_trajectory:
            return
        self._stats["trajectory_searches"] += B
        if plan.targets is not None:
            row, picks, prio, arrs = plan.targets[g]
            self._pred[target] = row  # one reference swap: thread-safe
            self._forecast(target, TRAJECTORY)
            self._issue_picks(it, target, picks, prio, arrs)
            return
        rows = store.maps[target, plan.best[g], :]
        self._pred[target] = rows.max(axis=0).tolist()  # one reference swap: thread-safe
        self._forecast(target, TRAJECTORY)
        self._issue(it, target, rows, plan.score[g], now_layer=g)

    def _drop_plan(self, it: _IterState) -> None:
        """Leave the plan: the running state becomes what on_gate would have built over
        the layers consumed so far (they came in order from layer 0)."""
        plan, it.plan = it.plan, None
        assert plan is not None
        k = plan.next_layer
        if k == 0:
            return
        it.observed[:, :k] = plan.rows[:, :k]
        it.dots[:, : plan.n] = plan.cum_dots[k - 1]
        it.norm2[:] = plan.cum_norm2[k - 1]

    def _refresh(self, it: _IterState) -> None:
        """Recompute the vectors of store rows written since the state was last exact."""
        store = self._need_store()
        if store.version == it.version:
            return
        rows = store.changed_since(it.version)
        if it.query is not None and store.embed_width == it.query.shape[1]:
            it.sem[:, rows] = it.query @ store.emb[rows].T
        upto = max((layer + 1 for layer, seen in enumerate(it.seen) if seen), default=0)
        it.dots[:, rows] = store.prefix_dots(rows, it.observed, upto)
        it.version = store.version
