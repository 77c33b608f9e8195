"""The fMoE policy (FMOE_ALGORITHM.md steps 1-7), registered as ``fmoe``.

Per iteration (one forward pass over B token rows) the policy keeps, for every row, its
semantic query, its observed gate rows P_1..P_m and running dot products with all C
stored maps, so each layer step costs one [B, J] x [J, C] product (step 2's incremental
dot products), vectorised over rows x store.

- iteration start: semantic search (step 1) predicts layers 0..d-1;
- gate of layer g: trajectory search (step 2) on the prefix 0..g predicts layer g+d;
- each prediction selects experts with the similarity-aware threshold (step 3), per row,
  merged over the batch as the union with priority max p / (l - l_now) (step 4);
- eviction (step 5): by default the expected time to each expert's next use, from a
  table learned as the policy runs (forecasts, the requests' own frequencies, recency,
  token-to-token transitions; policies/fmoe_eviction.py, fmoe_transition.py);
  ``eviction="paper"`` is the paper's p * freq with p the searched map's probability (max
  over rows) and freq the entry's uses while cached, a layer's p changing only when that
  layer is forecast, as the official FineMoE cache keeps per-expert probabilities; the
  cache protects pinned/predicted entries;
- iteration end: rows that saw all L gates are offered to the store (step 6);
- ``async_search``: executors apply the orders of the searches (iteration start, map
  search at a gate) after the search latency (step 7); the orders ``on_gate_now`` makes
  from the gate's own data (lookahead picks, re-ranked earlier candidates, cancellations)
  go at once (policies/base.py).

Embeddings: the iteration's per-token embeddings when the executor passes them, else the
request's prompt embedding; gate rows: full probabilities when present, else rows built
from top-K ids and weights. :meth:`FmoePolicy.metadata` reports which were used.

Over 450 lines on purpose: the options, the lifecycle and the observe hooks that put the
mixins' steps in order (each step in its own module) read best in one place.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import numpy as np
from pydantic import Field

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PolicyOptions,
    RequestArrival,
    guarded,
)
from policies.cache import ExpertCache, ExpertKey
from policies.expert_map_store import ExpertMapStore
from policies.fmoe_deadline import FmoeDeadline
from policies.fmoe_duel import FmoeDuel
from policies.fmoe_eviction import CAL_BINS, TRAJECTORY, FmoeEviction
from policies.fmoe_fit import FIT_CHUNK_ROWS, FmoeFit  # noqa: F401 - FIT_CHUNK_ROWS re-exported
from policies.fmoe_lookahead import FmoeLookahead
from policies.fmoe_minlabel import FmoeMinLabel
from policies.fmoe_orders import FmoeOrders
from policies.fmoe_reqprior import FmoeRequestPrior
from policies.fmoe_residence import FmoeResidence
from policies.fmoe_search import FmoeSearch
from policies.fmoe_select import topk_rows
from policies.fmoe_shadow import FmoeShadow
from policies.fmoe_state import PLAN_MAX_ELEMENTS, _inv_sqrt, _IterState, _SearchPlan
from policies.fmoe_transition import FmoeTransition
from policies.fmoe_victim import FmoeVictim
from policies.fmoe_window import FmoeWindow
from policies.registry import register_policy
from specs.errors import InputError
from specs.model_spec import ModelSpec

# The paper's prefetch distances per model family (transformers model_type).
FAMILY_DISTANCE: dict[str, int] = {"mixtral": 3, "qwen2_moe": 6, "phimoe": 4}
DEFAULT_DISTANCE = 3

Prediction = Literal["traj", "traj+sem", "traj+sem+delta", "sem+delta"]
Eviction = Literal["lru", "lfu", "lfu-global", "paper", "fmoe"]
Admission = Literal["deadline", "all", "none"]


def default_prefetch_distance(spec: ModelSpec) -> int:
    """The paper's d for the spec's family (Mixtral 3, Qwen1.5-MoE 6, Phi-3.5-MoE 4), else 3."""
    return FAMILY_DISTANCE.get(spec.family, DEFAULT_DISTANCE)


EvictionOrder = Literal["time", "uses", "switch", "blend", "layer", "shadow", "density", "window"]


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
        "traj+sem+delta: + similarity-aware threshold (full fMoE); sem+delta: no trajectory "
        "search (the semantic search's layers only)",
    )
    eviction: Eviction = Field(
        default="fmoe",
        description="fmoe (expected time to next use: calibrated predictions, recency and "
        "frequency); paper (p x uses while cached, the paper's); lru; lfu (uses while cached, "
        "the paper's ablation); lfu-global (uses over the whole run, kept across evictions)",
    )
    prompt_rows: bool = Field(
        default=True,
        description="eviction=fmoe: in an iteration of R rows (a prompt) an expert of a "
        "layer still ahead is used if any row chooses it: chance 1 - (1 - p)^R (False: "
        "one row's chance p, the earlier rule)",
    )
    layer_table: bool = Field(
        default=False,
        description="eviction=fmoe: learn the chance table per layer too (each layer's "
        "cells shrunk toward the pooled ones by empirical Bayes), so a layer whose "
        "consecutive tokens reuse experts more keeps its recent experts longer (False: "
        "one table pooled over layers; docs/fmoe.md has both measured)",
    )
    eviction_order: EvictionOrder = Field(
        default="time",
        description="eviction=fmoe: time: the expected time to next use alone; uses: the "
        "expected uses while resident, the stay memoryless at the cache's measured "
        "residency (policies/fmoe_duel.py); switch: "
        "follow recency (LRU's order) while it has the lower counterfactual regret on "
        "the decisions the two orders disagree on, measured online; blend: weigh the "
        "expected time and the age since last use by those regrets (policies/fmoe_duel.py); "
        "layer: evict from the layer whose next visit is furthest, within it by the "
        "expected time; shadow: simulate the time and layer orders on the demands seen "
        "(key-only shadow caches) and follow the one with more hits; density: evict the "
        "fewest expected hits per slot-step, max(P1 / t1, p / L) (policies/fmoe_shadow.py); "
        "window: evict the lowest chance of use within the cache's measured residence "
        "time (Che's characteristic time; policies/fmoe_window.py)",
    )
    window_time: Literal["residence", "age"] = Field(
        default="residence",
        description="eviction_order=window: the window T. residence: the cache's mean "
        "residence, capacity over loads per layer step (Little's law); age: the mean age "
        "(since last use or load) at which the order's victims leave the cache, measured",
    )
    # Default "deadline": a copy is sent when its expected saving (the part done before its
    # layer, if its expert is used) beats the delay its unused rest causes demand loads;
    # the paper's "all" stays available (docs/fmoe.md compares both on every preset).
    admission: Admission = Field(
        default="deadline",
        description="deadline: order a prefetch when the part of its copy done before its "
        "layer, times the chance its expert is used, beats the delay the unused rest of it "
        "causes demand loads; re-ranked at each gate; distance from copy time over layer "
        "time (needs the executor's view; else all); all: every selected expert (the "
        "paper's); none: no prefetch (predictions still steer eviction: the eviction-only "
        "ablation)",
    )
    request_frequency: bool = Field(
        default=True,
        description="count each running request's expert choices: the eviction's learned "
        "chance is by (request frequency, age) instead of age alone (False: the ablation)",
    )
    population_prior: bool = Field(
        default=True,
        description="a request's frequency starts from the population's: every expert's "
        "rate over all requests so far (one pseudo-observation), so experts popular across "
        "requests rank as such before a request has chosen them; False: the uninformed "
        "rate K/J (the earlier rule)",
    )
    request_prior: Literal["eb", "one"] = Field(
        default="eb",
        description="eviction=fmoe with population_prior: the weight of the population's rate "
        "in a request's frequency. eb: learned per layer by empirical Bayes from how far "
        "finished requests' rates stray from the population's (policies/fmoe_reqprior.py; "
        "docs/fmoe.md); one: one pseudo-observation (the earlier rule)",
    )
    table_fit: bool = Field(
        default=True,
        description="fit also replays the training requests, one at a time and in order, "
        "through the eviction's counts (as the gates would count them, no forecast): the "
        "chance table starts from the training rows' measured rates by (request frequency, "
        "age) until the first served request finishes, then the served run's own counts alone "
        "(policies/fmoe_eviction.py); False: it starts empty (the earlier rule)",
    )
    victim: Literal["residence", "priced", "ignored"] = Field(
        default="residence",
        description="deadline admission: priced: a copy is admitted only when its expected "
        "saving also beats the chance that the expert it evicts at its start is used before "
        "a demand load would have evicted it anyway, its layer's (policies/fmoe_victim.py); "
        "residence: as priced, but if the copy goes unused (chance 1 - q) the victim is lost "
        "for as long as the unused copy stays resident, measured online "
        "(policies/fmoe_residence.py); ignored: no victim term (the earlier rule)",
    )
    blocking: Literal["measured", "ignored"] = Field(
        default="measured",
        description="deadline admission: measured: a copy is charged, for each gate at which "
        "it is forecast to be on the link, the measured wait of that gate's demand loads "
        "behind a prefetch (a link preempts a copy only at a chunk boundary; "
        "policies/fmoe_blocking.py); ignored: no such charge (the earlier rule)",
    )
    forecast: Literal["gate", "mean"] = Field(
        default="gate",
        description="deadline admission: gate: the link time a copy has before the next gate "
        "is forecast from this gate's demand loads (the layer waits for the slowest device's "
        "and then computes, the measured step time less the measured mean of the slowest "
        "device's loads; a device's own loads go first): on one GPU the same as mean; mean: "
        "every layer step gets the measured mean prefetch time (the earlier rule)",
    )
    saving: Literal["finish", "copy"] = Field(
        default="copy",
        description="deadline admission: copy: a used copy saves one demand load's copy time; "
        "finish (measured worse on the testbed, docs/fmoe.md): it saves the measured worth of "
        "an avoided demand load to the layer step (the step waits for the last device's loads), "
        "and the link time a copy pushes onto demand loads is weighed against that "
        "(policies/fmoe_finish.py)",
    )
    rank: Literal["chance", "p"] = Field(
        default="chance",
        description="deadline admission's ranking: chance: each candidate's measured chance "
        "of use (the eviction table's calibrated cell for map picks, the measured precision "
        "for lookahead picks) over its distance; p: the searched map's probability over its "
        "distance (the paper's)",
    )
    map_value: Literal["marginal", "whole"] = Field(
        default="marginal",
        description="deadline admission: marginal: a map pick for a layer two or more "
        "ahead saves only what the lookahead would not save anyway at the gate before that "
        "layer (its measured recall there times one layer step's prefetch time); whole: "
        "its whole saving (the earlier rule)",
    )
    transitions: bool = Field(
        default=True,
        description="eviction=fmoe: learn per layer how often expert j follows expert i "
        "from one token to the next (training requests at fit, served ones as they run; "
        "shrunk toward the marginal by empirical Bayes) and fold the chance of use at the "
        "next token into the request-frequency bins the table calibrates "
        "(policies/fmoe_transition.py; docs/fmoe.md); False: the bins by request "
        "frequency alone (the earlier rule)",
    )
    transitions_later: Literal["same", "plain", "two"] = Field(
        default="same",
        description="eviction=fmoe with transitions: the chance of the visits after an "
        "expert's next one. same: the next visit's transition-informed chance (the "
        "earlier rule); plain: the request-frequency chance without transitions; two: "
        "the chance from counted two-step transitions (j two tokens after i, shrunk as "
        "the one-step ones), binned into the same table (policies/fmoe_trans_jit.py; "
        "docs/fmoe.md)",
    )
    min_labels: Literal["off", "lru", "time"] = Field(
        default="off",
        description="eviction=fmoe: at fit, run Belady's MIN on the training requests' "
        "demands with the cache's slots and learn per table cell how often MIN keeps a "
        "demanded expert until its next demand; served, experts whose latest cell MIN "
        "mostly evicts go first, then lru: least recently used, time: the expected time "
        "to next use (policies/fmoe_minlabel.py; measured in docs/fmoe.md, not the default)",
    )
    min_feature: Literal["cell", "expert"] = Field(
        default="cell",
        description="min_labels: what the MIN-friendly rate is learned per: cell: the "
        "eviction table's cell (request-frequency bin x age) at the demand; expert: the "
        "(layer, expert) itself",
    )
    candidate_chance: Literal["measured", "table"] = Field(
        default="measured",
        description="deadline admission, one-row iterations: measured: a map candidate's "
        "chance of use is its chance-table cell's measured rate among earlier map "
        "candidates (one pseudo-observation at the table's chance; policies.fmoe_calib); "
        "table: the eviction table's cell, learned over every expert (the earlier rule)",
    )
    lookahead: bool | Literal["auto"] = Field(
        default="auto",
        description="auto: measure online how often each layer's lookahead rows (the next "
        "layer's gate on this layer's hidden state, Mixtral-Offloading's speculation) name "
        "the next layer's experts, and order their top-K at gate l for layer l+1 only where "
        "they beat chance, at their measured precision (docs/fmoe.md); true: always, at the "
        "row's probability; false: never (the paper's fMoE)",
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


@register_policy
class FmoePolicy(
    FmoeFit,
    FmoeSearch,
    FmoeOrders,
    FmoeLookahead,
    FmoeDeadline,
    FmoeVictim,
    FmoeResidence,
    FmoeDuel,
    FmoeTransition,
    FmoeMinLabel,
    FmoeShadow,
    FmoeWindow,
    FmoeRequestPrior,
    FmoeEviction,
    Policy,
):
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
    wants_lookahead = True  # the default (lookahead="auto") reads them

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        # the real executor computes lookahead rows only for a policy that asks
        self._la_mode: bool | str = self.options.lookahead
        self.wants_lookahead = self._la_mode is not False  # type: ignore[misc]
        self._look_q: dict[ExpertKey, float] = {}  # lookahead chances (fmoe_lookahead)
        if (
            "admission" not in self.options.model_fields_set
            and type(self).decide_prefetch is not FmoePolicy.decide_prefetch
        ):
            # a subclass that decides its prefetches itself (fmoe-hybrid) applies its own
            # rule to every selection: by default ours does not filter them first
            self.options = self.options.model_copy(update={"admission": "all"})
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
        self._ents_of: list[list[dict]] = []  # their entries dicts (bind)
        self._layer_ents: list[dict | None] = []
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
            "paper": self._scores_paper,
            "fmoe": self._scores_etnu,
        }[self.options.eviction]
        self._view = None  # the executor's view while deadline admission is on (bind)
        self._no_prefetch = self.options.admission == "none"
        self._victim_priced = self.options.victim in ("priced", "residence")
        self._victim_resid = self.options.victim == "residence"
        self._map_marginal = self.options.map_value == "marginal"
        self._rank_chance = self.options.rank == "chance"
        self._distance_source = "unbound"
        self._orders_issued = 0  # orders sent without deadline admission
        # rows of planned decode gates: [with gate probabilities, with top-K weights,
        # trajectory searches] (counted apart from _stats: a Counter update per gate costs)
        self._planned_rows = [0, 0, 0]
        self._top_k = 0
        self._scores_fast = False  # eviction_scores' inlined fmoe path (set at bind)
        self._eager_table = True  # gates recompute the eviction table (set at bind)
        self._ev = 0  # eviction state version (FmoeEviction.victim_index)
        self._vmemo: list | None = None  # victim_index's ranking while _ev stands
        # the gate event on_gate_now last handled (on_gate runs it itself otherwise) and
        # its decode plan when the planned path took it
        self._gate_ev: GateOutput | None = None
        self._gate_plan: _SearchPlan | None = None

    @property
    def use_semantic(self) -> bool:
        return self.options.prediction != "traj"

    @property
    def use_trajectory(self) -> bool:
        return self.options.prediction != "sem+delta"

    @property
    def use_delta(self) -> bool:
        return self.options.prediction in ("traj+sem+delta", "sem+delta")

    # -- lifecycle ----------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        """Size the state for ``ctx.spec``; load the store when ``store_path`` is set."""
        super().bind(ctx)
        if ctx.cache_guard is not None:  # caches that change on other threads (real executor)
            self._admit = guarded(self._admit, ctx.cache_guard)  # it reads candidate arrays
        derived = self.derived_distance(ctx) if self.options.admission == "deadline" else None
        self._setup(ctx.spec, ctx.prefetch_distance, derived)
        L, J = ctx.spec.num_moe_layers, ctx.spec.num_experts
        self._cache_of = [[ctx.cache_of((lay, j)) for j in range(J)] for lay in range(L)]
        # each layer's one entries dict when one cache holds all its experts (else None),
        # and each expert's cache's entries: _order's membership tests without attribute reads
        self._ents_of = [[c.entries for c in row] for row in self._cache_of]
        self._layer_ents = [
            row[0] if all(e is row[0] for e in row) else None for row in self._ents_of
        ]
        self._no_hit = np.zeros(J, np.bool_)  # _order_candidates' "none cached" (<= J experts)
        self._setup_deadline(ctx)

    def _set_distance(self, d: int, L: int) -> None:
        """Use prefetch distance ``d`` (at most L) from now on (store included)."""
        self.distance = min(int(d), L)
        # how far ahead each layer is predicted in a decode iteration, as float64 [L, 1]:
        # layers 0..d-1 by the semantic search (executing layer -1), the rest d ahead
        self._decode_dist = np.minimum(np.arange(1.0, L + 1), self.distance)[:, None]
        if self.store is not None:
            self.store.prefetch_distance = self.distance

    def _setup(self, spec: ModelSpec, ctx_distance: int | None, derived: int | None = None) -> None:
        L, J = spec.num_moe_layers, spec.num_experts
        if self.options.prefetch_distance is not None:
            d, self._distance_source = self.options.prefetch_distance, "option"
        elif ctx_distance is not None:
            d, self._distance_source = ctx_distance, "executor"
        elif derived is not None:
            d, self._distance_source = derived, "copy time / layer time"
        else:
            d, self._distance_source = default_prefetch_distance(spec), "model family"
        if d < 1:
            raise InputError(f"policy 'fmoe': prefetch distance must be >= 1, got {d}")
        self._set_distance(d, L)
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
            # no forecast yet: p = K/J, the uninformed rate (1.0 would pin the layers a
            # prediction mode never forecasts, e.g. 0..d-1 without the semantic search)
            self._pred = [[spec.top_k / J] * J for _ in range(L)]
            self._freq = [[0] * J for _ in range(L)]
            self._setup_usage(L, J, spec.top_k)
            self._setup_lookahead(L, J, spec.top_k)
        self.spec = spec
        self._top_k = spec.top_k

    def metadata(self) -> dict[str, Any]:
        """Options plus what the run used: prefetch distance, embedding and gate-row sources, store size."""
        s = Counter(self._stats)
        s["gate_rows_gate_probs"] += self._planned_rows[0]
        s["gate_rows_topk_weights"] += self._planned_rows[1]
        s["trajectory_searches"] += self._planned_rows[2]
        s["orders_issued"] += self._orders_issued
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
            prefetch_distance_source=self._distance_source,
            prefetch_distance_changes=s["distance_changes"],
            admission="deadline" if self._view is not None else "all",
            orders_issued=s["orders_issued"],
            orders_rejected_late=s["orders_rejected_late"],
            orders_queued_none_done=s["orders_queued_none_done"],
            orders_admitted_late=s["orders_admitted_late"],
            orders_rejected_value=s["orders_rejected_value"],
            orders_rejected_blocking=s["orders_rejected_blocking"],
            orders_reranked=s["orders_reranked"],
            orders_cancelled_stale=s["orders_cancelled_stale"],
            lookahead_gates=s["lookahead_gates"],
            **(self.blocking_metadata() if self._view is not None else {}),
            **(self.residence_metadata() if getattr(self, "_res_on", False) else {}),
            **(self.finish_metadata() if getattr(self, "_fin_on", False) else {}),
            **(self.calib_metadata() if getattr(self, "_cal_on", False) else {}),
            **self.lookahead_metadata(),
            **(self.shadow_metadata() if self._shadow_on else {}),
            **(self.window_metadata() if self._window_on else {}),
            **(self.request_prior_metadata() if self._rp_on else {}),
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
        self._cur_it += 1
        self._g = -1
        self._etnu_dirty = True
        self._ev += 1
        if self._pred:
            self._set_rows(B)
            self._batch_requests(tuple(ev.request_ids) if self.options.request_frequency else ())
        if self._view is not None:
            self._deadline_iteration_start(B, bool(np.any(ev.prefill)))
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
        if self._view is not None:
            self._admit(-1)

    def on_gate_now(self, ev: GateOutput) -> None:
        """The gate's work that needs no map search (its orders go at once, step 7 split):
        the gate's choice feeds the eviction's statistics and the deadline measurements,
        the lookahead rows (the next layer's gate on this hidden state: data on the GPU)
        are scored and picked, and with deadline admission the candidates known so far are
        ranked and admitted. :meth:`on_gate` then runs the search."""
        g = int(ev.layer)
        self._gate_ev = ev
        self._gate_plan = None
        it = self._it
        plan = None if it is None else it.plan
        if (
            plan is not None
            and plan.fc_rows is not None
            and plan.next_layer == g
            and it.iteration == ev.iteration
            and g < len(it.seen)
            and not it.seen[g]
            and type(ev.topk_ids) is np.ndarray  # for the kernel (a trace's rows always are)
            and ev.topk_ids.ndim == 2
            and len(ev.topk_ids) == it.rows
            and plan.version == self.store.version  # type: ignore[union-attr]
        ):
            if self._view is not None:
                # one row of top-K ids: distinct, as np.unique would list them
                self._deadline_gate(g, ev.topk_ids[0].tolist(), ev.now)
            looked = self._planned_decode_observe(ev, it, plan, g)
            self._gate_plan = plan
        else:
            looked = False
            if self._pred and 0 <= g < len(self._pred):
                if it is None or it.iteration != ev.iteration:  # no iteration start seen
                    self._cur_it += 1
                    self._g = -1
                    self._ev += 1
                    self._batch_requests(())  # rows of unknown requests
                    if self._view is not None:
                        self._deadline_iteration_start(len(ev.topk_ids))
                if self._view is not None:
                    self._deadline_gate(g, np.unique(ev.topk_ids).tolist(), ev.now)
                self._observe_choice(g, ev.topk_ids)
            self._now = max(self._now, ev.now)
            B = len(ev.topk_ids)
            if (it is None or it.iteration != ev.iteration or it.rows != B) and self.spec:
                self._new_state(ev.iteration, B, None)  # no iteration start: no embeddings
        if self._duel_on:
            self._duel_gate(g, ev.topk_ids)
        if not looked:
            self._lookahead_gate(ev, g)
        if self._view is not None:
            self._admit(g)

    def on_gate(self, ev: GateOutput) -> None:
        """Step 2: add layer g to every row's running dots; predict layer g + d (the map
        search: with ``async_search`` its orders wait for the search latency). Runs
        :meth:`on_gate_now` first unless the executor just did, with this event; with
        deadline admission the hook ends by admitting the search's new candidates with
        the ones not started yet."""
        if ev is not self._gate_ev:
            self.on_gate_now(ev)
        self._gate_ev = None
        g = int(ev.layer)
        plan, self._gate_plan = self._gate_plan, None
        if plan is not None:
            self._planned_decode_search(it=self._it, plan=plan, g=g)  # type: ignore[arg-type]
        else:
            self._on_gate_search(ev)
        if self._view is not None and self._dl_cands.cnt:
            self._admit(g)

    def _planned_decode_observe(
        self, ev: GateOutput, it: _IterState, plan: _SearchPlan, g: int
    ) -> bool:
        """The no-search half of on_gate(g) of one decode row whose searches were all done
        at the iteration's start (``plan.targets``) and whose order the gates keep: the
        same statistics as the general path, in one kernel call for the eviction's
        bookkeeping (the caller checked every condition the general path would branch
        on); :meth:`_planned_decode_search` is the other half. True when the gate's
        lookahead work was done too (policies/fmoe_gate_row.py, one kernel call)."""
        if self._gate_row_applies():
            return self._gate_row(ev, it, plan, g)
        self._planned_gate_seen(ev, it, plan, g)
        # FmoeEviction._observe_choice in one kernel call, which on a small [L, J] table
        # also brings the expected times up to date once this iteration's chance table
        # exists (a large one waits for a reader: the caches' victim choice computes its
        # candidates' own, FmoeEviction.victim_index)
        eager = self._eager_table and self._chance_it == self._cur_it
        ids = ev.topk_ids
        row_slot = self._row_slot if len(self._row_slot) == len(ids) else self._no_slots
        if self._ml_on:
            self._min_gate(g, ids)
        if not self._jit.gate_step(
            self._ist, self._fl, self._prot, self._etnu, g, self._cur_it, ids, plan.fc_rows,
            -1, eager, self._rc, self._rn, row_slot, self._slots, self._base, CAL_BINS,
            self._pop,
            self._ev_rows,
        ):  # fmt: skip
            self._bad_ids(g)
        self._g = g
        self._etnu_dirty = not eager
        self._ev += 1
        if self._tr_on:
            self._transition_gate(g, ids, row_slot)
        return False

    def _planned_gate_seen(self, ev: GateOutput, it: _IterState, plan: _SearchPlan, g: int) -> None:
        """A planned gate's first bookkeeping (both observation paths): the clock, the
        plan's next layer, the layer seen, the gate-row counter."""
        if ev.now > self._now:
            self._now = ev.now
        plan.next_layer = g + 1
        it.seen[g] = True
        self._planned_rows[0 if ev.probs is not None else 1] += 1

    def _planned_decode_search(self, it: _IterState, plan: _SearchPlan, g: int) -> None:
        """The search half of a planned decode gate g: layer g + d's forecast (its table
        rows ``plan.fc_rows[g]``, as FmoeEviction._forecast makes them) and its orders."""
        target = g + self.distance
        if target >= len(self._pred) or not self.use_trajectory:
            return
        self._planned_rows[2] += 1
        self._ist[2, target, 0] = self._cur_it
        self._ist[1, target, :] = plan.fc_rows[g]  # type: ignore[index]
        self._etnu_dirty = True
        self._ev += 1
        row, picks, prio, arrs = plan.targets[g]  # type: ignore[index]
        self._pred[target] = row  # one reference swap: thread-safe
        if len(picks) > self._top_k:  # the weak match took more than the top-K (step 3)
            self._stats["delta_widened"] += 1
        self._order(it, target, picks, prio, arrs)

    def _on_gate_search(self, ev: GateOutput) -> None:
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
        if target >= L or not self.use_trajectory:
            return
        self._stats["trajectory_searches"] += B
        if B == 1:  # decode: the same float32 arithmetic on scalars, fewer numpy calls
            sim = it.dots[0, :n] * store.inv_prefix[g, :n]  # cosine up to a positive factor
            b = int(sim.argmax())
            x = it.norm2[0]  # a float32 scalar: float32 maths as in _inv_sqrt
            score = float(sim[b] * (1.0 / np.sqrt(np.maximum(x, 1e-30))))
            row = store.maps[target, b].tolist()
            self._pred[target] = row  # one reference swap: thread-safe
            self._forecast(target, TRAJECTORY)
            self._issue_row(it, target, row, score, now_layer=g)
            return
        sims = it.dots[:, :n] * store.inv_prefix[g, :n]  # cosine up to a positive per-row factor
        best = np.argmax(sims, axis=1)
        score_rows = sims[np.arange(B), best] * _inv_sqrt(it.norm2)  # the rows' maxima
        rows = store.maps[target, best, :]
        self._pred[target] = rows.max(axis=0).tolist()  # one reference swap: thread-safe
        self._forecast(target, TRAJECTORY)
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
            if self._pred:
                self._request_finished(rid)
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
        # the full-map trajectory cosines: only a full store's replacement (RDY) reads them
        full = len(observed) > store.capacity - n
        traj = dots * store.inv_prefix[-1, :n] * _inv_sqrt(norm2)[:, None] if full else None
        store.add_batch(
            observed, it.query, sem=it.sem[:, :n], traj=traj, prepared=it.query is not None
        )

    # -- decide -------------------------------------------------------------------------
