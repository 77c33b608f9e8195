"""The fMoE policy (FMOE_ALGORITHM.md steps 1-7), registered as ``fmoe``.

Per iteration (one forward pass over B token rows) the policy keeps, for every row, its
semantic query, its observed gate rows P_1..P_m and running dot products with all C
stored maps, so each layer step costs one [B, J] x [J, C] product (step 2's incremental
dot products), vectorised over rows x store.

- iteration start: semantic search (step 1) predicts layers 0..d-1;
- gate of layer g: trajectory search (step 2) on the prefix 0..g predicts layer g+d;
- each prediction selects experts with the similarity-aware threshold (step 3), per row,
  merged over the batch as the union with priority max p / (l - l_now) (step 4);
- eviction score p * freq with p the searched map's probability (max over rows) and freq
  the entry's uses while cached (step 5); the cache protects pinned/predicted entries.
  A layer's p changes only when that layer is forecast (semantic: 0..d-1; trajectory:
  g+d), as the official FineMoE cache keeps per-expert probabilities (1 before any
  forecast); other layers keep their last forecast;
- iteration end: rows that saw all L gates are offered to the store (step 6);
- ``async_search``: executors apply the orders after the search latency (step 7).

Embeddings: the iteration's per-token embeddings when the executor passes them, else the
request's prompt embedding; gate rows: full probabilities when present, else rows built
from top-K ids and weights. :meth:`FmoePolicy.metadata` reports which were used.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationGates,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    RequestArrival,
)
from policies.cache import CacheEntry, ExpertCache, ExpertKey
from policies.expert_map_store import ExpertMapStore
from policies.fmoe_select import (
    merge_priorities,
    select_experts,
    select_row,
    select_rows,
    topk_rows,
)
from policies.registry import register_policy
from specs.errors import InputError
from specs.model_spec import ModelSpec

# The paper's prefetch distances per model family (transformers model_type).
FAMILY_DISTANCE: dict[str, int] = {"mixtral": 3, "qwen2_moe": 6, "phimoe": 4}
DEFAULT_DISTANCE = 3
FIT_CHUNK_ROWS = 256
_TIE_EPS = 1e-9  # recency tie-break weight, far below any meaningful p * freq gap

Prediction = Literal["traj", "traj+sem", "traj+sem+delta"]
Eviction = Literal["lru", "lfu", "lfu-global", "fmoe"]


def _inv_sqrt(x: np.ndarray) -> np.ndarray:
    """1 / sqrt(x) for x >= 0; a huge finite value at 0, which only ever multiplies zeros."""
    return 1.0 / np.sqrt(np.maximum(x, 1e-30))


def default_prefetch_distance(spec: ModelSpec) -> int:
    """The paper's d for the spec's family (Mixtral 3, Qwen1.5-MoE 6, Phi-3.5-MoE 4), else 3."""
    return FAMILY_DISTANCE.get(spec.family, DEFAULT_DISTANCE)


class FmoeOptions(PolicyOptions):
    """Options of ``fmoe``; the prediction/eviction switches are the paper's ablation."""

    prefetch_distance: int | None = Field(
        default=None,
        ge=1,
        description="layers ahead (None: the executor's value, else the model family's)",
    )
    store_capacity: int = Field(default=1000, ge=1, description="expert map store rows C")
    prediction: Prediction = Field(
        default="traj+sem+delta",
        description="traj: trajectory only, fixed top-K; traj+sem: + semantic for layers < d; "
        "traj+sem+delta: + similarity-aware threshold (full fMoE)",
    )
    eviction: Eviction = Field(
        default="fmoe",
        description="lru; lfu (uses while cached: fmoe's freq without p, the paper's ablation); "
        "lfu-global (uses over the whole run, kept across evictions); fmoe (p x uses while cached)",
    )
    embed_dim: int | None = Field(
        default=None,
        ge=1,
        description="random-project embeddings to this width to save store memory (None: full)",
    )
    store_path: str | None = Field(
        default=None,
        description="load the expert map store from this .npz at bind (its capacity unless store_capacity is set)",
    )


# a plan holds three [L, B, size] float32 arrays: past this many elements (e.g. a long
# prompt's prefill) the search runs layer by layer instead
PLAN_MAX_ELEMENTS = 4_000_000


@dataclass
class _SearchPlan:
    """Every layer's trajectory search of one iteration, done at its start from the gates
    the executor knew in advance (``IterationStart.gates``). Each value is bitwise what the
    layer-by-layer search in :meth:`FmoePolicy.on_gate` computes; it is used while the
    gates arrive in layer order and the store is unchanged, else dropped for that path."""

    rows: np.ndarray  # [B, L, J] gate rows
    cum_dots: np.ndarray  # [L, B, n] running dot products after layer l
    cum_norm2: np.ndarray  # [L, B] squared norm of the prefix 0..l
    best: np.ndarray  # [L - d, B] best stored row after layer l (layers predicting one)
    score: np.ndarray  # [L - d, B] its match score (float32)
    n: int  # store size (and version below) the plan is exact for
    version: int
    next_layer: int = 0  # layers consumed in order so far
    # one decode row, per gate g: the map row predicted for layer g + d, the experts
    # selected from it (best first) and every expert's priority p / d
    targets: list[tuple[list[float], list[int], list[float]]] | None = None


@dataclass
class _IterState:
    """Search state of one iteration's B token rows."""

    iteration: int
    rows: int  # B
    query: np.ndarray | None  # [B, E] prepared embeddings (zero rows where unknown)
    observed: np.ndarray  # [B, L, J] gate rows seen so far
    seen: list[bool]  # [L]: a list, read and set per gate (cheaper than numpy scalars)
    sem: np.ndarray  # [B, C] cosine with stored embeddings (valid [:, :size])
    dots: np.ndarray  # [B, C] running trajectory dot products
    norm2: np.ndarray  # [B] squared norm of the observed prefix
    version: int  # store version the vectors are exact for
    issued: set[ExpertKey] = field(default_factory=set)
    plan: _SearchPlan | None = None  # the precomputed searches, when the gates were known


@register_policy
class FmoePolicy(Policy):
    """fMoE: expert map store, semantic + trajectory search, similarity-aware prefetch,
    prediction-weighted eviction."""

    name = "fmoe"
    description = (
        "fMoE: expert map store, semantic + trajectory search, similarity-aware prefetch, "
        "prediction-weighted eviction"
    )
    Options = FmoeOptions
    async_search = True
    precomputes_from_gates = True
    options: FmoeOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.store: ExpertMapStore | None = None
        self.spec: ModelSpec | None = None
        self.distance = 0
        self._decode_dist = np.zeros((0, 1))
        # searched map's p per [layer][expert]: Python floats, read per cached entry by
        # eviction_score (a list lookup is ~10x cheaper than a numpy scalar read)
        self._pred: list[list[float]] = []
        # uses over the run per [layer][expert], counted only for eviction=lfu-global
        self._count_uses = self.options.eviction == "lfu-global"
        self._freq: list[list[int]] = []
        # each expert's device cache per [layer][expert] (bound only): ctx.is_cached per
        # order without its two calls
        self._cache_of: list[list[ExpertCache]] = []
        self._prompt_emb: dict[str, np.ndarray] = {}
        # (request ids, prepared query, has, rows with one) of the last batch embedded from
        # prompt embeddings: the decode steps of one batch prepare them once
        self._batch_query: tuple[tuple[str, ...], np.ndarray | None, np.ndarray, int] | None = None
        self._it: _IterState | None = None
        self._now = 0.0
        self._stats: Counter[str] = Counter()
        self._scores = {
            "lru": self._scores_lru,
            "lfu": self._scores_lfu,
            "lfu-global": self._scores_lfu_global,
            "fmoe": self._scores_fmoe,
        }[self.options.eviction]

    @property
    def use_semantic(self) -> bool:
        return self.options.prediction != "traj"

    @property
    def use_delta(self) -> bool:
        return self.options.prediction == "traj+sem+delta"

    # -- lifecycle ----------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        """Size the state for ``ctx.spec``; load the store when ``store_path`` is set."""
        super().bind(ctx)
        self._setup(ctx.spec, ctx.prefetch_distance)
        L, J = ctx.spec.num_moe_layers, ctx.spec.num_experts
        self._cache_of = [[ctx.cache_of((lay, j)) for j in range(J)] for lay in range(L)]

    def _setup(self, spec: ModelSpec, ctx_distance: int | None) -> None:
        L, J = spec.num_moe_layers, spec.num_experts
        if self.options.prefetch_distance is not None:
            d = self.options.prefetch_distance
        elif ctx_distance is not None:
            d = ctx_distance
        else:
            d = default_prefetch_distance(spec)
        if d < 1:
            raise InputError(f"policy 'fmoe': prefetch distance must be >= 1, got {d}")
        self.distance = min(int(d), L)
        # how far ahead each layer is predicted in a decode iteration, as float64 [L, 1]:
        # layers 0..d-1 by the semantic search (executing layer -1), the rest d ahead
        self._decode_dist = np.minimum(np.arange(1.0, L + 1), self.distance)[:, None]
        if self.store is None:
            if self.options.store_path:
                # the file's capacity unless store_capacity was given explicitly
                explicit = "store_capacity" in self.options.model_fields_set
                cap = self.options.store_capacity if explicit else None
                self.store = ExpertMapStore.load(self.options.store_path, capacity=cap)
            else:
                self.store = ExpertMapStore(
                    self.options.store_capacity,
                    L,
                    J,
                    self.distance,
                    project_dim=self.options.embed_dim,
                )
        if (self.store.num_layers, self.store.num_experts) != (L, J):
            raise InputError(
                f"policy 'fmoe': expert map store is {self.store.num_layers} layers x "
                f"{self.store.num_experts} experts, model {spec.name!r} has {L} x {J}"
            )
        self.store.prefetch_distance = self.distance
        if self.spec is None or len(self._pred) != L or len(self._pred[0]) != J:
            self._pred = [[1.0] * J for _ in range(L)]  # no forecast yet: p = 1 (plain LFU)
            self._freq = [[0] * J for _ in range(L)]
        self.spec = spec

    def fit(self, training: Any) -> None:
        """Offline mode: offer every token of every training request to the store, in order.

        Each token's row is (its embedding, else its request's prompt embedding; its gate
        probabilities [L, J], else rows from its top-K ids and weights).
        """
        from traces.types import Workload

        if not isinstance(training, Workload):
            raise InputError(f"policy 'fmoe': fit needs a Workload, got {type(training).__name__}")
        if self.spec is None:
            self._setup(training.spec, None)
        assert self.store is not None and self.spec is not None
        L, J = self.spec.num_moe_layers, self.spec.num_experts
        if (training.spec.num_moe_layers, training.spec.num_experts) != (L, J):
            raise InputError(
                f"policy 'fmoe': training workload is for {training.spec.num_moe_layers} layers x "
                f"{training.spec.num_experts} experts, bound model has {L} x {J}"
            )
        maps: list[np.ndarray] = []
        embs: list[np.ndarray | None] = []
        pending = 0
        for req in training.requests:
            r = req.routing
            T = r.num_tokens
            if r.gate_probs is not None:
                m = np.asarray(r.gate_probs, np.float32)
                self._stats["fit_rows_gate_probs"] += T
            else:
                m = topk_rows(
                    r.topk_ids.reshape(T * L, -1), r.topk_weights.reshape(T * L, -1), J
                ).reshape(T, L, J)
                self._stats["fit_rows_topk_weights"] += T
            if r.embeddings is not None:
                e = np.asarray(r.embeddings, np.float32)
                self._stats["fit_rows_emb_token"] += T
            elif req.prompt_embedding is not None:
                e = np.broadcast_to(
                    np.asarray(req.prompt_embedding, np.float32), (T, req.prompt_embedding.shape[0])
                )
                self._stats["fit_rows_emb_prompt"] += T
            else:
                e = None
                self._stats["fit_rows_emb_none"] += T
            maps.append(m)
            embs.append(e)
            pending += T
            if pending >= FIT_CHUNK_ROWS:
                self._fit_chunk(maps, embs)
                maps, embs, pending = [], [], 0
        if maps:
            self._fit_chunk(maps, embs)

    def _fit_chunk(self, maps: list[np.ndarray], embs: list[np.ndarray | None]) -> None:
        assert self.store is not None
        width = next((e.shape[1] for e in embs if e is not None), None)
        emb = None
        if width is not None:
            emb = np.concatenate(
                [
                    e if e is not None else np.zeros((len(m), width), np.float32)
                    for m, e in zip(maps, embs, strict=True)
                ]
            )
        self.store.add_batch(np.concatenate(maps), emb)

    def save_store(self, path: str | Path) -> None:
        """Write the expert map store to ``path`` (.npz, atomic)."""
        if self.store is None:
            raise InputError("policy 'fmoe': no store to save (bind or fit first)")
        self.store.save(path)

    def metadata(self) -> dict[str, Any]:
        """Options plus what the run used: prefetch distance, embedding and gate-row sources, store size."""
        s = self._stats
        emb_counts = {k: s[f"rows_emb_{k}"] for k in ("token", "prompt", "none")}
        used = [k for k, v in emb_counts.items() if v]
        out = super().metadata()
        out.update(
            prefetch_distance_used=self.distance,
            embedding_source=used[0] if len(used) == 1 else ("mixed" if used else "none"),
            embedding_rows=emb_counts,
            gate_rows_source={k: s[f"gate_rows_{k}"] for k in ("gate_probs", "topk_weights")},
            fit_rows={k[9:]: v for k, v in s.items() if k.startswith("fit_rows_")},
            semantic_searches=s["semantic_searches"],
            trajectory_searches=s["trajectory_searches"],
            orders_issued=s["orders_issued"],
            predictions_widened_by_delta=s["delta_widened"],
            store_rows=0 if self.store is None else self.store.size,
            store_writes=0 if self.store is None else self.store.version,
            store_bytes=0 if self.store is None else self.store.nbytes,
            store_embed_width=0 if self.store is None else self.store.embed_width,
        )
        return out

    # -- observe ------------------------------------------------------------------------
    def on_request_arrival(self, ev: RequestArrival) -> None:
        if ev.prompt_embedding is not None:
            self._prompt_emb[ev.request_id] = np.asarray(ev.prompt_embedding, np.float32)
            self._batch_query = None  # a batch of this request must see its embedding

    def on_iteration_start(self, ev: IterationStart) -> None:
        """Step 1: semantic search per row; predict layers 0..d-1."""
        self._now = max(self._now, ev.now)
        B = len(ev.request_ids)
        query, has = self._row_queries(ev, B)
        it = self._new_state(ev.iteration, B, query)
        store = self._need_store()
        n = store.size
        if ev.gates is not None and n > 0 and B * store.num_layers * n <= PLAN_MAX_ELEMENTS:
            it.plan = self._plan(ev.gates, B, store)
        lead = self._semantic_search(it, has, store)
        if it.plan is not None and B == 1:
            self._plan_decode(it, it.plan, lead, store)
        elif lead is not None:
            pred, score = lead
            for layer in range(self.distance):
                self._issue(it, layer, pred[layer], score, now_layer=-1)

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
        fresh[: self.distance] = pred.max(axis=1).tolist()
        self._pred = fresh
        return pred, score

    def on_gate(self, ev: GateOutput) -> None:
        """Step 2: add layer g to every row's running dots; predict layer g + d."""
        self._now = max(self._now, ev.now)
        store = self._need_store()
        L, J = store.num_layers, store.num_experts  # the spec's (checked at bind)
        g = int(ev.layer)
        if not 0 <= g < L:
            raise InputError(f"policy 'fmoe': gate output for layer {g}, model has {L} MoE layers")
        B = len(ev.topk_ids)
        it = self._it
        if it is None or it.iteration != ev.iteration or it.rows != B:
            it = self._new_state(ev.iteration, B, None)  # no iteration start seen: no embeddings
        if it.seen[g]:
            return  # a repeated gate (e.g. a prefill run in waves) adds nothing new
        plan = it.plan
        if plan is not None:
            if plan.next_layer == g and plan.version == store.version:
                self._planned_gate(it, plan, g, ev.probs is not None, B, store)
                return
            self._drop_plan(it)  # out of order or the store changed: search layer by layer
        if ev.probs is not None:
            probs = np.asarray(ev.probs, np.float32)
            self._stats["gate_rows_gate_probs"] += B
        else:
            probs = topk_rows(ev.topk_ids, ev.topk_weights, J)
            self._stats["gate_rows_topk_weights"] += B
        if probs.shape != (B, J):
            raise InputError(
                f"policy 'fmoe': gate probs of layer {g} have shape {probs.shape}, expected ({B}, {J})"
            )
        self._refresh(it)
        it.observed[:, g] = probs
        it.seen[g] = True
        it.norm2 += np.einsum("bj,bj->b", probs, probs)
        n = store.size
        if n == 0:
            return
        it.dots[:, :n] += store.layer_dots(g, probs)
        target = g + self.distance
        if target >= L:
            return
        self._stats["trajectory_searches"] += B
        if B == 1:  # decode: the same float32 arithmetic on scalars, fewer numpy calls
            sim = it.dots[0, :n] * store.inv_prefix[g, :n]  # cosine up to a positive factor
            b = int(sim.argmax())
            x = it.norm2[0]  # a float32 scalar: float32 maths as in _inv_sqrt
            score = float(sim[b] * (1.0 / np.sqrt(np.maximum(x, 1e-30))))
            row = store.maps[target, b].tolist()
            self._pred[target] = row  # one reference swap: thread-safe
            self._issue_row(it, target, row, score, now_layer=g)
            return
        sims = it.dots[:, :n] * store.inv_prefix[g, :n]  # cosine up to a positive per-row factor
        best = np.argmax(sims, axis=1)
        score_rows = sims[np.arange(B), best] * _inv_sqrt(it.norm2)  # the rows' maxima
        rows = store.maps[target, best, :]
        self._pred[target] = rows.max(axis=0).tolist()  # one reference swap: thread-safe
        self._issue(it, target, rows, score_rows, now_layer=g)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        if now > self._now:  # max(), without its call: this runs for every expert used
            self._now = now
        if self._count_uses and self._freq:
            self._freq[key[0]][key[1]] += 1

    def on_iteration_end(self, ev: IterationEnd) -> None:
        """Step 6: offer each row that saw all layers to the store."""
        self._now = max(self._now, ev.now)
        it, self._it = self._it, None
        for rid in ev.finished:
            self._prompt_emb.pop(rid, None)
        if it is None or it.iteration != ev.iteration or not all(it.seen):
            return
        store = self._need_store()
        plan = it.plan
        if plan is not None and plan.version == store.version:
            # every gate came from the plan (in order, as all were seen): its last running
            # sums are the iteration's, without copying them into the state first
            observed, dots, norm2 = plan.rows, plan.cum_dots[-1], plan.cum_norm2[-1]
        else:
            if plan is not None:
                self._drop_plan(it)
            self._refresh(it)
            observed, dots, norm2 = it.observed, it.dots[:, : store.size], it.norm2
        n = store.size
        traj = dots * store.inv_prefix[-1, :n] * _inv_sqrt(norm2)[:, None]
        store.add_batch(
            observed, it.query, sem=it.sem[:, :n], traj=traj, prepared=it.query is not None
        )

    # -- decide -------------------------------------------------------------------------
    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: ``fmoe`` p x uses while cached, ``lfu`` uses while cached,
        ``lfu-global`` uses over the run, ``lru`` last use (ties: least recent first)."""
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

    def _scores_fmoe(self, entries: list[CacheEntry]) -> list[float]:
        # one comprehension, no call per entry: this runs for every load once a cache is full
        pred, tie = self._pred, _TIE_EPS / (abs(self._now) + 1.0)
        if not pred:  # unbound: no forecast, p = 0
            return [tie * e.last_used for e in entries]
        return [pred[lay][j] * e.uses + tie * e.last_used for e in entries for lay, j in (e.key,)]

    # -- helpers ------------------------------------------------------------------------
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
        # running float32 sums in layer order, [L, B, n], one in-place add per layer view
        # (np.cumsum over axis 0 walks the array column by column, several times slower)
        layers = iter(cum_dots)
        prev = next(layers)
        for cur in layers:
            cur += prev
            prev = cur
        cum_norm2 = np.cumsum(np.einsum("blj,blj->lb", rows, rows), axis=0)  # [L, B]
        d = self.distance
        T = L - d  # the layers g whose search predicts layer g + d
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
        picks, prio = self._row_orders(rows, scores, self._decode_dist[lo:])
        for layer in range(lo, d):
            self._issue_picks(it, layer, picks[layer], prio[layer])
        plan.targets = list(zip(targets.tolist(), picks[d - lo :], prio[d - lo :], strict=True))

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
        if target >= len(self._pred):
            return
        self._stats["trajectory_searches"] += B
        if plan.targets is not None:
            row, picks, prio = plan.targets[g]
            self._pred[target] = row  # one reference swap: thread-safe
            self._issue_picks(it, target, picks, prio)
            return
        rows = store.maps[target, plan.best[g], :]
        self._pred[target] = rows.max(axis=0).tolist()  # one reference swap: thread-safe
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
        self._order(it, layer, sorted(merged, key=lambda j: (-merged[j], j)), merged)

    def _row_orders(
        self, rows: np.ndarray, scores: np.ndarray, dist: np.ndarray
    ) -> tuple[list[list[int]], list[list[float]]]:
        """:meth:`_issue_row`'s selection and priorities for R one-row predictions at once
        (its per-row Python costs more from a few rows on): rows [R, J] with their scores
        [R], ``dist`` [R, 1] the float64 layer distances (so p / dist is Python's float
        division). Returns each row's selected experts, best first, and every expert's
        priority."""
        assert self.spec is not None
        order = np.argsort(-rows, axis=1, kind="stable")
        picks = select_rows(rows, scores, self.spec.top_k, self.use_delta, order)
        return picks, (rows / dist).tolist()

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
        self._issue_picks(it, layer, chosen, prio)

    def _issue_picks(
        self, it: _IterState, layer: int, picks: list[int], prio: Sequence[float]
    ) -> None:
        """Order one row's selected experts ``picks`` (best first) at priorities ``prio[j]``."""
        assert self.spec is not None
        if len(picks) > self.spec.top_k:  # the weak match took more than the top-K (step 3)
            self._stats["delta_widened"] += 1
        self._order(it, layer, picks, prio)

    def _order(
        self,
        it: _IterState,
        layer: int,
        experts: list[int],
        prio: Sequence[float] | dict[int, float],
    ) -> None:
        """Queue orders for ``experts`` (best first) at priorities ``prio[j]``, skipping
        those already ordered this iteration or cached (resident or loading)."""
        issued, cache_of = it.issued, self._cache_of
        orders = 0
        for j in experts:
            key = (layer, j)
            # ctx.is_cached(key), inlined: this runs for every candidate order
            if key in issued or (cache_of and key in cache_of[layer][j].entries):
                continue
            issued.add(key)
            self.prefetch(layer, j, prio[j])
            orders += 1
        if orders:
            self._stats["orders_issued"] += orders
