"""fMoE's offline preparation (FMOE_ALGORITHM.md step 6 on a training workload) and the
store's file, as a mixin of :class:`policies.fmoe.FmoePolicy`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from policies.fmoe_eviction import _NEVER, CAL_BINS
from policies.fmoe_select import topk_rows
from specs.errors import InputError

FIT_CHUNK_ROWS = 256


class FmoeFit:
    """Fill the expert map store from a training workload; save it."""

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
            if r.lookahead is not None and self._la_mode is not False:
                self._lookahead_fit(
                    r.topk_ids, r.lookahead
                )  # the cells' precision (fmoe_lookahead)
            if self.options.table_fit and self.options.eviction == "fmoe":
                self._eviction_fit(r.topk_ids, req.prompt_len)  # the chance table's counts
            maps.append(m)
            embs.append(e)
            pending += T
            if pending >= FIT_CHUNK_ROWS:
                self._fit_chunk(maps, embs)
                maps, embs, pending = [], [], 0
        if maps:
            self._fit_chunk(maps, embs)
        if self._ml_on:
            self._min_fit_end()  # policies.fmoe_minlabel: the cells' MIN-friendly rates

    def _eviction_fit(self, ids: np.ndarray, prompt_len: int) -> None:
        """Count one training request's routing (``ids`` [T, L, K], its first
        ``prompt_len`` rows the prompt's iteration, then one row per iteration) into the
        chance table's choices and visits, as :meth:`FmoeEviction._observe_choice` counts a served
        request alone in its batch with no forecast (the request-frequency rows). The
        replay's own state (ages, the request's counts, the population's) lives in
        :attr:`_fit_st` and carries from one training request to the next, as a run's
        does; the served run's state starts as before (ages "never", the population
        empty), so only the table's measured rates are carried over: what the first
        served request's eviction would otherwise learn from scratch. They stand in for
        the served run's own history only while it has none: when the first served
        request finishes (:meth:`FmoeEviction._request_finished`) the replay's counts are taken out
        and the table is the served run's alone, as before (kept for the whole run they
        were measured worse on the later requests, docs/fmoe.md)."""
        ids = np.asarray(ids, np.int64)
        T, L = ids.shape[0], ids.shape[1]
        if T == 0 or L != self._ist.shape[1]:
            return
        st = self._fit_st
        if st is None:
            ist = np.zeros_like(self._ist)
            ist[0] = _NEVER
            ist[2] = -1
            st = self._fit_st = {
                "ist": ist,
                "prot": np.zeros_like(self._prot),
                "rc": np.zeros((1,) + self._rc.shape[1:]),
                "rn": np.zeros((1,) + self._rn.shape[1:]),
                "pop": np.zeros_like(self._pop),
                "it": 0,
            }
            self._request_prior_fit_state(st["pop"])  # policies.fmoe_reqprior (off: nothing)
        ist, prot, rc, rn, pop = st["ist"], st["prot"], st["rc"], st["rn"], st["pop"]
        before = self._fl[:2].copy()
        rc[:] = 0.0
        rn[:] = 0.0
        self._transition_fit_start(st)  # off: nothing
        on = self.options.request_frequency
        slots = np.zeros(1, np.int64) if on else self._no_slots
        self._jit.request_bins(ist, rc, rn, slots, self._base, CAL_BINS, -1, pop)
        p = max(1, min(int(prompt_len), T))
        starts = [0, *range(p, T)]
        for a in starts:
            b = p if a == 0 else a + 1
            st["it"] += 1
            rows = np.zeros(b - a, np.int64) if on else self._no_slots
            for layer in range(L):
                if self._ml_on:
                    self._min_record(st, layer, ids[a:b, layer])
                self._jit.observe_choice(
                    ist, self._fl, prot, layer, st["it"], ids[a:b, layer], rc, rn, rows,
                    slots, self._base, CAL_BINS, pop,
                )  # fmt: skip
                if self._tr_on:
                    self._transition_fit(st, layer, ids[a:b, layer], slots)
        self._request_prior_fit(st)  # policies.fmoe_reqprior (off: nothing)
        # what the replay added, taken out again when the first served request finishes
        added = self._fl[:2] - before
        self._fit_counts = added if self._fit_counts is None else self._fit_counts + added
        self._chance_it = -1  # the table is made again from the new counts
        self._transition_refresh()  # off: nothing
        self._etnu_dirty = True
        self._ev += 1
        self._stats["table_fit_rows"] += T

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
