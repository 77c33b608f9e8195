"""fMoE's eviction scores (FMOE_ALGORITHM.md step 5) and the ablation's alternatives,
as a mixin of :class:`policies.fmoe.FmoePolicy`.

``fmoe`` (the default) evicts the expert with the longest *expected time to its next
use*, in layer steps: an online approximation of Belady's MIN, which evicts the expert
used furthest in the future, with the future replaced by its learned chances. It joins
the maps' predictions, the running requests' own routing, and recency through one table
the policy learns as it runs: for every expert at every gate, the chance it is chosen
given (its forecast for this iteration, binned by the map's probability p and by source,
semantic or trajectory; or, without a fresh forecast, its *request frequency*: how often
the batch's requests chose it at that layer so far, f = 1 - prod_r (1 - (c_r + w q) /
(n_r + w)), with the prior q its rate over all requests so far (the population's rate
(C + K/J) / (N + 1); ``population_prior=False``: q = K/J) weighing w
pseudo-observations, learned by empirical Bayes (policies/fmoe_reqprior.py;
``request_prior="one"``: w = 1), binned in equal steps of f / (f + K/J), which puts the uninformed rate in the middle bin for any
number of experts) x (its age: iterations since the layer last chose it, in doubling
buckets, or "never"). That is recency, the request's own frequency (what MoE-Infinity's
request-level activation matrix tracks; a request's prompt rows already tell which
experts its tokens favour), calibrated predictions, and how they combine, all counted,
none set by hand: one pseudo-observation at the uninformed rate K/J per forecast cell;
the request-frequency rows are shrunk toward their pooled chance by age by empirical
Bayes (no excess variance between the bins: pooled completely, so where request
frequency tells nothing the order is LRU's) and made non-decreasing in frequency (LFU's
assumption); every row is non-increasing in age (pool-adjacent-violators), the one
assumption LRU makes. From it:

- a layer still ahead in this iteration (l > g, the last gate): with probability P (its
  cell now) it is used in l - g steps, else at the next iteration's visit, L - g + l
  steps, plus L per further iteration, waiting geometrically with its request-frequency
  chance at its next age;
- a layer already passed: the next iteration's visit plus the geometric wait.

When neither maps nor requests carry information, the ordering within a layer is by age
(least recently used first, as LRU; ties by last use); across layers it is by how soon
each layer comes back. Experts selected for a layer still ahead in this iteration
(resident or in flight) are protected until that layer has run.

``layer_table=True`` (an option, measured in docs/fmoe.md) learns the table per layer as well (one block of rows
per layer after the pooled block, :func:`policies.fmoe_jit.layer_row`): each layer's
cells are its own counts shrunk toward the pooled cell by empirical Bayes (one
between-layer variance for the table; none: the pooled table exactly), so a layer whose
consecutive tokens re-use their experts keeps its just-used experts longer than a layer
at chance. The admission's chances and the hybrid's read the pooled block.

``eviction_order="uses"`` (:mod:`policies.fmoe_duel`) turns the same chances into the
expected uses while resident instead; the default (``"time"``) evicts by the expected time
itself. The admission prices victims by the expected time either way.

``paper`` is the paper's p x uses while cached (p the searched map's probability, K/J
before a layer is first forecast); ``lfu``, ``lfu-global`` and ``lru`` are the ablation's.
"""

from __future__ import annotations

import numpy as np

from policies.cache import CacheEntry
from policies.cache_victims import (
    KV_CHANCE,
    KV_DIRTY,
    KV_EV,
    KV_G,
    KV_IT,
    KV_ON,
    KV_ROWS,
    KV_TIE,
    CandidateArrays,
    KernelVictims,
    with_victim_index,
)
from specs.errors import InputError

_TIE_EPS = 1e-9  # recency tie-break weight, far below any meaningful score gap
CAL_BINS = 10  # forecast probability bins (per source)
SEMANTIC, TRAJECTORY = 0, 1  # forecast sources
AGE_BUCKETS = 16  # ages 1, 2, 3-4, 5-8, ... (doubling), the last also "never chosen"
PROTECTED_E = 0.0  # expected time of a protected expert: below every real estimate (>= 1)
_NEVER = -(1 << 40)  # last iteration of an expert never chosen
# victims victim_index ranks per kernel call (the next loads' victims, while nothing changes)
VICTIM_RANKED = 8
# [L, J] tables up to this size are recomputed at every gate (a few microseconds);
# larger ones (fine-grained models: DeepSeek-V3 has 58 x 256) only when read
EAGER_TABLE_MAX = 4096


def forecast_rows(p: np.ndarray, source: int) -> np.ndarray:
    """The table rows of a forecast's experts: source's block, binned by probability
    ``p`` (float64, as the map's float32 values) into CAL_BINS equal bins."""
    return (1 + source) * CAL_BINS + np.minimum((p * CAL_BINS).astype(np.int64), CAL_BINS - 1)


def age_bucket(age: np.ndarray) -> np.ndarray:
    """Bucket of ages >= 1 (iterations): 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3, ...; huge
    ages (never chosen) land in the last bucket."""
    a = np.maximum(age, 1)
    return np.minimum(np.ceil(np.log2(a)).astype(np.int64), AGE_BUCKETS - 1)


class FmoeEviction:
    """Step 5 of fMoE: which cached expert goes first (see the module doc)."""

    # -- state ----------------------------------------------------------------------------
    def _setup_usage(self, L: int, J: int, K: int) -> None:
        """The learned table and the routing bookkeeping (all start empty), in arrays the
        kernels of :mod:`policies.fmoe_jit` update in place (one call per gate)."""
        from policies import fmoe_jit  # numba: loaded at bind, not at import

        self._jit = fmoe_jit
        self._base = K / J
        # table rows: the request-frequency bins (no fresh forecast), then the semantic
        # and the trajectory forecasts' probability bins
        rows = 3 * CAL_BINS
        # [0]: choices (hits), [1]: visits per (row, age bucket); [2]: the chance table;
        # layer_table: L more blocks of rows, one per layer (fmoe_jit.layer_row), after
        # the pooled block (the admission and the hybrid read the pooled rows)
        blocks = 1 + L if self.options.layer_table else 1
        self._fl = np.zeros((3, rows * blocks, AGE_BUCKETS))
        self._tab_hit, self._tab_n, self._chance_tab = self._fl[:, :rows]
        # [0]: last iteration that chose each expert; [1]: its forecast's table row;
        # [2, :, 0]: iteration of each layer's last forecast; [3]: its request-frequency bin
        # [4] (transitions_later "plain" or "two"): the bin of the visits after the next
        # one (policies.fmoe_jit.expected_next_use; fmoe_transition writes "two"'s)
        later = self.options.transitions and self.options.transitions_later != "same"
        self._ist = np.zeros((5 if later else 4, L, J), np.int64)
        self._ist[0] = _NEVER
        self._ist[2] = -1
        self._last_it, self._fc_row = self._ist[0], self._ist[1]
        self._fc_it = self._ist[2, :, 0]
        # each running request's choices and rows seen per layer, in slots
        self._rc = np.zeros((4, L, J))
        self._rn = np.zeros((4, L))
        self._slot_of: dict[str, int] = {}
        self._free_slots = [3, 2, 1, 0]
        self._no_slots = np.zeros(0, np.int64)
        self._row_slot = self._slots = self._no_slots
        self._batch_rids: tuple[str, ...] | None = None
        # the population's choices per [layer, expert] and rows per layer ([:, J]): the
        # prior of every request's frequency (empty: the uninformed K/J)
        self._pop = np.zeros((L, J + 1) if self.options.population_prior else (0, 0))
        self._setup_request_prior(L, J)  # policies.fmoe_reqprior (eb: a weight column)
        self._jit.request_bins(
            self._ist, self._rc, self._rn, self._no_slots, self._base, CAL_BINS, -1, self._pop
        )
        self._layer_table = self.options.layer_table
        self._fit_st: dict | None = None  # the training replay's state (_eviction_fit)
        self._fit_counts: np.ndarray | None = None  # the table counts it added
        self._g = -1  # the layer whose gate ran last in this iteration (-1: none yet)
        # rows of the current iteration: a layer still ahead is used in it by any of them
        self._ev_rows = 1
        self._cur_it = 0  # the policy's iteration count
        # protected experts (selected for a layer still ahead): an array the kernels read
        # and clear, set per order through a memoryview (no numpy call)
        self._prot = np.zeros((L, J), np.bool_)
        self._prot_mv = memoryview(self._prot)
        # minus the expected time to next use per [layer, expert]; the scores read it per
        # cached entry through a memoryview indexed by the entry's key (a float per read)
        self._etnu = np.zeros((L, J))
        self._etnu_mv = memoryview(self._etnu)
        self._etnu_dirty = True
        # the version of everything eviction scores read but the clock (ages, forecasts,
        # bins, protections, the chance table, the gate): bumped wherever those change;
        # victim_index keeps its ranking of the cache's candidates while it stands
        self._ev = 0
        self._vmemo = None
        self._vbuf = np.empty(VICTIM_RANKED, np.int64)
        self._vbuf_s = np.empty(VICTIM_RANKED)  # the ranked victims' scores and etnu (unread)
        self._vbuf_e = np.empty(VICTIM_RANKED)
        # whether each gate recomputes the whole table (cheap while it is small, and then
        # the caches score their few candidates from it) or leaves it to its readers
        self._eager_table = L * J <= EAGER_TABLE_MAX
        self._chance_it = -1
        self._scores_fast = self.options.eviction == "fmoe"
        order = self.options.eviction_order if self._scores_fast else "time"
        self._setup_duel(order)  # policies.fmoe_duel
        if order in ("blend", "uses"):  # scored in Python (no compiled victim choice)
            self._scores_fast = False
            self._scores = self._scores_blend if order == "blend" else self._scores_uses
        self._setup_transitions(L, J, K)  # policies.fmoe_transition (off: nothing kept)
        self._setup_min_labels(L, J)  # policies.fmoe_minlabel (off: nothing kept)

    def _forecast(self, layer: int, source: int) -> None:
        """Layer ``layer`` was just forecast (``self._pred[layer]``) in this iteration."""
        self._fc_it[layer] = self._cur_it
        self._fc_row[layer] = forecast_rows(np.asarray(self._pred[layer], dtype=float), source)
        self._etnu_dirty = True
        self._ev += 1

    def _batch_requests(self, request_ids: tuple[str, ...]) -> None:
        """The iteration's rows belong to ``request_ids``: give each request a slot of
        counts (a new one starts empty) and set every expert's request-frequency bin."""
        if request_ids == self._batch_rids:
            return  # the same batch as the last iteration: slots and bins stand
        self._batch_rids = request_ids
        slot_of = self._slot_of
        for rid in request_ids:
            if rid not in slot_of:
                if not self._free_slots:
                    n = len(self._rc)
                    self._rc = np.concatenate((self._rc, np.zeros_like(self._rc)))
                    self._rn = np.concatenate((self._rn, np.zeros_like(self._rn)))
                    self._free_slots = list(range(2 * n - 1, n - 1, -1))
                s = self._free_slots.pop()
                self._rc[s] = 0.0
                self._rn[s] = 0.0
                slot_of[rid] = s
                self._transition_slot(s)
        self._row_slot = np.array([slot_of[r] for r in request_ids], np.int64).reshape(-1)
        self._slots = np.unique(self._row_slot) if len(self._row_slot) else self._no_slots
        self._jit.request_bins(
            self._ist, self._rc, self._rn, self._slots, self._base, CAL_BINS, -1, self._pop
        )
        self._transition_bins(-1)  # off: nothing
        self._etnu_dirty = True
        self._ev += 1

    def _request_finished(self, request_id: str) -> None:
        if self._fit_counts is not None:  # the served run has a history of its own now
            self._fl[:2] -= self._fit_counts
            self._fit_counts = None
            self._chance_it = -1
            self._etnu_dirty = True
            self._ev += 1
        self._transition_refresh()  # off: nothing
        s = self._slot_of.pop(request_id, None)
        if s is not None:
            self._request_prior_served(s)  # policies.fmoe_reqprior (off: nothing)
            self._free_slots.append(s)
            self._batch_rids = None  # its slot may be reused: rebuild the batch's slots

    def _observe_choice(self, layer: int, ids: np.ndarray) -> None:
        """Layer ``layer``'s gate chose ``ids`` (any shape, repeats allowed) in the current
        iteration: count every expert's cell at the layer's first gate of the iteration,
        then update ages and lift the protection of layers up to ``layer``."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            ids = ids.reshape(len(ids), -1)
        self._set_rows(len(ids))
        row_slot = self._row_slot if len(self._row_slot) == len(ids) else self._no_slots
        if self._ml_on:
            self._min_gate(layer, ids)
        if not self._jit.observe_choice(
            self._ist, self._fl, self._prot, layer, self._cur_it, ids, self._rc, self._rn,
            row_slot, self._slots, self._base, CAL_BINS, self._pop,
        ):  # fmt: skip
            self._bad_ids(layer)
        self._g = layer
        self._etnu_dirty = True
        self._ev += 1
        if self._tr_on:
            self._transition_gate(layer, ids, row_slot)

    def _set_rows(self, rows: int) -> None:
        """The current iteration has ``rows`` rows (a prompt's tokens, a decode batch): an
        expert of a layer still ahead is used in it when any row chooses it."""
        rows = max(int(rows), 1) if self.options.prompt_rows else 1
        if rows != self._ev_rows:
            self._ev_rows = rows
            self._etnu_dirty = True
            self._ev += 1

    def _bad_ids(self, layer: int) -> None:
        J = self._last_it.shape[1]
        raise InputError(f"policy 'fmoe': gate of layer {layer} chose experts outside [0, {J})")

    def _protect(self, key: tuple[int, int]) -> None:
        """Protect ``key`` (selected for a layer still ahead) until its layer has run; its
        expected time becomes 0 in the current table too (what a recompute would give)."""
        self._prot_mv[key] = True
        self._etnu_mv[key] = -0.0
        self._ev += 1

    # -- expected time to next use ----------------------------------------------------------
    def _chance(self) -> np.ndarray:
        """The learned table: P(chosen at a visit) per (forecast row, age bucket), each
        row made non-increasing in age (pooled where the counts say otherwise, as LRU
        assumes: an expert used longer ago is not likelier to come back). Made once per
        iteration, from the counts when it is first needed."""
        if self._chance_it != self._cur_it:
            self._jit.decreasing_rows(self._fl, self._base, CAL_BINS)
            self._chance_it = self._cur_it
            self._ev += 1
        return self._chance_tab

    def _fl_chance(self) -> np.ndarray:
        """The whole chance table fl[2] (with ``layer_table``, every layer's block after
        the pooled one), made as :meth:`_chance` makes it."""
        self._chance()
        return self._fl[2]

    def _etnu_table(self) -> memoryview:
        """[L, J] minus the expected layer steps until each expert's next use (module doc),
        as a memoryview indexed by (layer, expert); recomputed when the state changed."""
        if self._etnu_dirty:
            self._etnu_dirty = False  # first: a change made meanwhile (another thread) stays
            self._chance()
            self._jit.expected_next_use(
                self._ist,
                self._fl,
                self._prot,
                self._etnu,
                self._g,
                self._cur_it,
                CAL_BINS,
                self._ev_rows,
            )
        return self._etnu_mv

    def expected_next_use(self, layer: int, expert: int) -> float:
        """Expected layer steps until (layer, expert) is used next (the ``fmoe`` score's
        estimate; protected experts 0)."""
        return -self._etnu_table()[layer, expert]

    def _candidate_etnu(self, layer: int, j: int, g: int) -> float:
        """A prefetch candidate's expected time to next use (unprotected; layer > g)."""
        L = self._last_it.shape[0]
        it = self._cur_it
        tab = self._fl_chance()  # with layer_table, the layer's block (as the victims')
        age = it - int(self._last_it[layer, j])
        off = self._jit.layer_row(self._fl, layer)
        freq = off + int(self._ist[3, layer, j])
        row = off + int(self._fc_row[layer, j]) if self._fc_it[layer] == it else freq
        p_now = float(tab[row, age_bucket(np.array(age))])
        if self._ev_rows > 1:  # fmoe_jit._victim_etnu's R-row chance
            p_now = 1.0 - self._jit.pow_rows(1.0 - p_now, self._ev_rows)
        later = off + int(self._ist[4, layer, j]) if len(self._ist) > 4 else freq
        p_next = float(tab[later, age_bucket(np.array(age + 1))])
        wait = (L - g + layer) + L * (1.0 / p_next - 1.0)
        return p_now * (layer - g) + (1.0 - p_now) * wait

    def _candidate_chance(self, layer: int, j: int) -> float:
        """The learned chance that (layer, j) is chosen at its layer's visit in this
        iteration (its fresh forecast's cell, else its request-frequency cell, by age)."""
        it = self._cur_it
        ist = self._ist
        age = it - ist.item(0, layer, j)
        row = ist.item(1, layer, j) if ist.item(2, layer, 0) == it else ist.item(3, layer, j)
        b = 0 if age <= 1 else min((age - 1).bit_length(), AGE_BUCKETS - 1)  # age_bucket
        return self._chance().item(row, b)  # the pooled table (as the admission's kernel)

    # -- scores ---------------------------------------------------------------------------
    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower goes first: ``fmoe`` minus the expected time to next use, ``paper`` p x
        uses while cached, ``lfu`` uses while cached, ``lfu-global`` uses over the run,
        ``lru`` last use (ties: least recent first)."""
        return self._scores([entry])[0]

    @with_victim_index
    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        if self._scores_fast:  # _scores_etnu, inlined: this runs for every victim choice
            tab = self._etnu_table() if self._etnu_dirty else self._etnu_mv
            tie = _TIE_EPS / (abs(self._now) + 1.0)
            return [tab[e.key] + tie * e.last_used for e in entries]
        return self._scores(entries)

    def victim_index(self, arr: CandidateArrays) -> int:
        """The cache's victim among its candidates ``arr`` (policies.cache_victims): the
        slot :meth:`eviction_scores` ranks first, from the ``fmoe`` score computed in one
        kernel for the candidates only (no [L, J] table); -1 (score them as usual) for
        the other scores or before bind.

        One kernel call ranks the best VICTIM_RANKED candidates; while the scores cannot
        have changed (the same state version ``_ev`` and clock tie-break, the same
        arrays that only lost members since: ``arr.puts``) the next call answers with the
        first of them still a candidate, which is the lowest of what is left."""
        if not self._scores_fast:
            return self._uses_victim_index(arr) if self._uses_on else -1
        if self._chance_it != self._cur_it:
            self._chance()  # what _etnu_table does first (once per iteration)
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        memo = self._vmemo
        if (
            memo is not None
            and memo[0] is arr
            and memo[1] == arr.puts
            and memo[2] == self._ev
            and memo[3] == tie
        ):
            slot, keys, at = arr.slot, memo[4], memo[5]
            while at < len(keys):
                i = slot.get(keys[at])
                if i is not None:
                    memo[5] = at
                    return i
                at += 1
        buf = self._vbuf
        c = self._jit.victims(
            self._ist, self._fl, self._prot, self._g, self._cur_it, arr.layers, arr.experts,
            arr.last_used, arr.n, tie, buf, self._vbuf_s, self._vbuf_e, self._ev_rows,
        )  # fmt: skip
        if c <= 0:
            self._vmemo = None
            return -2 if c < 0 else -1
        entries = arr.entries
        ranked = buf[:c].tolist()
        self._vmemo = [arr, arr.puts, self._ev, tie, [entries[i].key for i in ranked], 0]
        return ranked[0]

    def _tie(self, entry: CacheEntry) -> float:
        return _TIE_EPS * entry.last_used / (abs(self._now) + 1.0)

    def _scores_lru(self, entries: list[CacheEntry]) -> list[float]:
        return [float(e.last_used) for e in entries]

    def _scores_lfu(self, entries: list[CacheEntry]) -> list[float]:
        return [e.uses + self._tie(e) for e in entries]

    def _scores_lfu_global(self, entries: list[CacheEntry]) -> list[float]:
        freq = self._freq
        return [float(freq[e.key[0]][e.key[1]] if freq else e.uses) + self._tie(e) for e in entries]

    def _scores_paper(self, entries: list[CacheEntry]) -> list[float]:
        # one comprehension, no call per entry: this runs for every load once a cache is full
        pred, tie = self._pred, _TIE_EPS / (abs(self._now) + 1.0)
        if not pred:  # unbound: no forecast, p = 0
            return [tie * e.last_used for e in entries]
        return [pred[lay][j] * e.uses + tie * e.last_used for e in entries for lay, j in (e.key,)]

    def _scores_etnu(self, entries: list[CacheEntry]) -> list[float]:
        tie = _TIE_EPS / (abs(self._now) + 1.0)
        if not self._pred:  # unbound: least recently used
            return [tie * e.last_used for e in entries]
        tab = self._etnu_table()
        return [tab[e.key] + tie * e.last_used for e in entries]

    # -- the compiled executor's victim choice (issue 21) ----------------------------------
    def kernel_victims(self) -> KernelVictims | None:
        """The ``fmoe`` score's victim choice for a compiled executor
        (:class:`~policies.cache_victims.KernelVictims`: what :meth:`eviction_scores`
        and :meth:`victim_index` choose, from this policy's arrays); None when bound to no
        model, for the other scores and eviction orders (they change the scorer as they
        run), or when a subclass scores its own way."""
        cls = type(self)
        if (
            not self._pred
            or not self._scores_fast
            or self.options.eviction != "fmoe"
            or self.options.eviction_order != "time"
            or cls.eviction_scores is not FmoeEviction.eviction_scores
            or cls.victim_index is not FmoeEviction.victim_index
            or cls._etnu_table is not FmoeEviction._etnu_table
            or cls._chance is not FmoeEviction._chance
        ):
            return None
        return KernelVictims(
            "expected-time", self._ist, self._fl, self._prot, self._etnu,
            self._kernel_victim_state, self._chance, self._etnu_table,
        )  # fmt: skip

    def _kernel_victim_state(self, vi: np.ndarray, vf: np.ndarray) -> None:
        """KernelVictims.state: the scalars the victim choice reads now."""
        vi[KV_ON] = self._scores_fast
        vi[KV_G] = self._g
        vi[KV_IT] = self._cur_it
        vi[KV_ROWS] = self._ev_rows
        vi[KV_DIRTY] = self._etnu_dirty
        vi[KV_CHANCE] = self._chance_it == self._cur_it
        vi[KV_EV] = self._ev
        vf[KV_TIE] = _TIE_EPS / (abs(self._now) + 1.0)
