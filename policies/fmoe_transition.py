"""Token-to-token transitions in fMoE's eviction (``transitions=True``, the default since
issue 20's branch ``learnevict``; measured in docs/fmoe.md), as a mixin of :class:`policies.fmoe.FmoePolicy`.

The eviction's table (:mod:`policies.fmoe_eviction`) knows an expert's age and its
request's frequency, not *which* experts the latest token chose. In text, consecutive
tokens' experts are correlated beyond "the same expert again": expert i at layer l for
token t makes some experts j likelier at layer l for token t + 1. This mixin learns, per
layer, how often each j follows each i (the training requests' tokens at fit, and the
served requests' as they run), each row shrunk toward the marginal by empirical Bayes
(one between-row variance per layer; none: the marginal exactly, so without structure
nothing changes), and feeds the chance of j at the next token into the expert's
request-frequency *bin*: the frequency's odds times the odds ratio of the transition
chance to the marginal's. The bin is the table's row, so the table's cells (counted at
each visit, as before) calibrate the combined evidence: no weight is set by hand, and
where the transitions carry nothing the bins are the plain ones.

A layer's bins are refreshed at its gate, when its current token's choices are known:
they then describe the next iteration's visit of that layer, which is what the expected
time to next use of an expert of a passed layer waits for. Tokens follow each other
within a request, so the transitions need the rows' request ids (``request_frequency``;
without them the bins stay the plain ones). Kernels: :mod:`policies.fmoe_trans_jit`.

``transitions_later`` (an option, measured in docs/fmoe.md) sets the chance of the visits
*after* the next one, which the expected time to next use waits for geometrically:
``same`` (the default) the next visit's bin; ``plain`` the request-frequency bin without
transitions; ``two`` the bin from counted two-step transitions (j two tokens after i,
kept and shrunk as the one-step counts; another L x J x J float32). Either goes to
ist[4], read by :func:`policies.fmoe_jit.expected_next_use`.
"""

from __future__ import annotations

import numpy as np

from policies.fmoe_eviction import CAL_BINS


class FmoeTransition:
    """Per-layer transition counts feeding the request-frequency bins (module doc)."""

    def _setup_transitions(self, L: int, J: int, K: int) -> None:
        """Empty counts (option on) or nothing at all (off: every hook returns at once)."""
        self._tr_on = bool(getattr(self.options, "transitions", False))
        if not self._tr_on:
            return
        from policies import fmoe_trans_jit  # numba: loaded at bind, not at import

        self._tjit = fmoe_trans_jit
        self._tc = np.zeros((L, J, J), np.float32)
        self._tn = np.zeros((L, J + 1))
        self._tm = np.zeros((L, J))
        self._tau = np.zeros(L)
        self._tprev = np.full((max(len(self._rc), 1), L, K), -1, np.int64)
        self._tr_it = np.full(L, -1, np.int64)  # the iteration each layer was last counted
        self._tr_fit_prev: np.ndarray | None = None
        # transitions_later="two": the two-step counts, as the one-step ones, and each
        # slot's token before its latest; their bins go to ist[4]
        self._tr2 = self.options.transitions_later == "two"
        if self._tr2:
            self._tc2 = np.zeros((L, J, J), np.float32)
            self._tn2 = np.zeros((L, J + 1))
            self._tm2 = np.zeros((L, J))
            self._tau2 = np.zeros(L)
            self._tprev2 = np.full_like(self._tprev, -1)

    def _transition_slot(self, s: int) -> None:
        """Request slot ``s`` starts a new request: no latest token yet."""
        if not self._tr_on:
            return
        if s >= len(self._tprev):
            grow = np.full((len(self._rc) - len(self._tprev),) + self._tprev.shape[1:], -1)
            self._tprev = np.concatenate((self._tprev, grow.astype(np.int64)))
            if self._tr2:
                self._tprev2 = np.concatenate((self._tprev2, grow.astype(np.int64)))
        self._tprev[s] = -1
        if self._tr2:
            self._tprev2[s] = -1

    def _transition_gate(self, layer: int, ids: np.ndarray, row_slot: np.ndarray) -> None:
        """Layer ``layer`` chose ``ids`` [B, K] in the current iteration (after the
        eviction's own bookkeeping): count the transitions at its first gate of the
        iteration, then set the layer's bins with the transitions' evidence."""
        if self._tr_on and int(self._tr_it[layer]) != self._cur_it:
            self._tr_it[layer] = self._cur_it
            ids = np.asarray(ids, np.int64)
            if ids.ndim != 2:
                ids = ids.reshape(len(ids), -1)
            if self._tr2:  # before the one-step count moves the rows into _tprev
                self._tjit.transition_count2(
                    self._tc2, self._tn2, self._tm2, self._tprev, self._tprev2, layer, ids,
                    row_slot,
                )  # fmt: skip
            self._tjit.transition_count(
                self._tc, self._tn, self._tm, self._tprev, layer, ids, row_slot
            )
            self._transition_bins(layer)

    def _transition_bins(self, layer: int = -1) -> None:
        """Layer ``layer``'s (all layers: -1) request-frequency bins with the evidence."""
        if self._tr_on:
            self._tjit.transition_bins(
                self._ist, self._tc, self._tn, self._tm, self._tau, self._tprev, self._rc,
                self._rn, self._slots, self._pop, self._base, CAL_BINS, layer,
            )  # fmt: skip
            if self._tr2:
                self._tjit.transition_bins_into(
                    self._ist, 4, self._tc2, self._tn2, self._tm2, self._tau2, self._tprev,
                    self._rc, self._rn, self._slots, self._pop, self._base, CAL_BINS, layer,
                )  # fmt: skip
            self._etnu_dirty = True
            self._ev += 1

    def _transition_refresh(self) -> None:
        """Re-estimate each layer's shrinkage from the counts (at a request's end and after
        each training request: once per request, O(L J^2))."""
        if self._tr_on:
            self._tjit.shrinkage(self._tc, self._tn, self._tm, self._tau, self._base)
            if self._tr2:
                self._tjit.shrinkage(self._tc2, self._tn2, self._tm2, self._tau2, self._base)
            self._transition_bins(-1)

    def _transition_fit(self, st: dict, layer: int, ids: np.ndarray, slots: np.ndarray) -> None:
        """The training replay (``st``: policies.fmoe_fit's state, one request slot) saw
        rows ``ids`` [B, K] of its request at ``layer``, in order (a prompt's rows, or one
        decode token): counted as a served request's would be, and the replay's bins set
        as the served run's are (its table counts the same cells)."""
        if not self._tr_on:
            return
        prev = st.get("tprev")
        if prev is None:
            prev = st["tprev"] = np.full((1,) + self._tprev.shape[1:], -1, np.int64)
        ids = np.asarray(ids, np.int64).reshape(len(ids), -1)
        zero = np.zeros(len(ids), np.int64)
        if self._tr2:
            prev2 = st.get("tprev2")
            if prev2 is None:
                prev2 = st["tprev2"] = np.full_like(prev, -1)
            self._tjit.transition_count2(
                self._tc2, self._tn2, self._tm2, prev, prev2, layer, ids, zero
            )
        self._tjit.transition_count(
            self._tc, self._tn, self._tm, prev, layer, ids, np.zeros(len(ids), np.int64)
        )
        self._tjit.transition_bins(
            st["ist"], self._tc, self._tn, self._tm, self._tau, prev, st["rc"], st["rn"],
            slots, st["pop"], self._base, CAL_BINS, layer,
        )  # fmt: skip
        if self._tr2:
            self._tjit.transition_bins_into(
                st["ist"], 4, self._tc2, self._tn2, self._tm2, self._tau2, prev, st["rc"],
                st["rn"], slots, st["pop"], self._base, CAL_BINS, layer,
            )  # fmt: skip

    def _transition_fit_start(self, st: dict) -> None:
        """A new training request: its slot has no latest token."""
        if self._tr_on and st.get("tprev") is not None:
            st["tprev"][:] = -1
        if self._tr_on and st.get("tprev2") is not None:
            st["tprev2"][:] = -1
