"""The weight of the population prior in a request's expert frequency, learned by
empirical Bayes (``request_prior="eb"``, the default since issue 20's branch ``qwen25``;
``"one"``: the earlier rule), as a mixin of :class:`policies.fmoe.FmoePolicy`; measured in
docs/fmoe.md ("The Qwen-shaped gap at 25%").

fMoE's eviction bins each expert by the batch's request frequency, per request
f_r = (c + w q) / (n + w): c its choices in the request's n rows at that layer, q the
population's rate, w the prior's weight in pseudo-observations. The earlier w = 1 trusts
a request's few rows almost entirely (one choice in two rows: f = 0.5 whatever the
expert's rate). How far a request's rates really stray from the population's is
measured here, from the requests that finished (the training requests at fit, then the
served ones): per layer, the spread of the requests' rates c / n around the population's
rate m beyond what sampling explains (the method of moments the transitions and the
per-layer table use),

    tau2 = (sum_r sum_j n_r (c_rj / n_r - m_j)^2 - R sum_j m_j (1 - m_j)) / (J sum_r n_r),

and the prior weighs w = mean_j m_j (1 - m_j) / tau2 pseudo-observations, the
beta-binomial's (Efron and Morris's) weight: requests that differ little from the
population get a strong prior, ones that differ much a weak one; no excess spread:
w = inf, every request at the population's rate. Before the first request finishes w = 1
(the earlier rule). Nothing is set by hand. The sums are sufficient statistics kept per
(layer, expert): sum_r c^2 / n, sum_r c, and per layer sum_r n and R.

The weight rides in an extra column of the population's counts (``pop[:, J + 1]``), which
the request-frequency kernels read (policies.fmoe_jit.request_bins,
policies.fmoe_trans_jit._request_f); without the column (``"one"``) they compute what
they did. Needs ``population_prior`` (the prior is the population's rate).
"""

from __future__ import annotations

import numpy as np

from policies.fmoe_eviction import CAL_BINS


class FmoeRequestPrior:
    """Empirical-Bayes weight of the population prior per layer (module doc)."""

    _rp_on = False  # until bound

    def _setup_request_prior(self, L: int, J: int) -> None:
        """With the option on: the population counts get the weight column (1.0 until
        measured) and the sufficient statistics start empty."""
        self._rp_on = self.options.request_prior == "eb" and self._pop.shape[0] > 0
        if not self._rp_on:
            return
        pop = np.zeros((L, J + 2))
        pop[:, J + 1] = 1.0
        self._pop = pop
        self._rp_s2 = np.zeros((L, J))  # sum over requests of c^2 / n
        self._rp_s1 = np.zeros((L, J))  # sum of c
        self._rp_n = np.zeros(L)  # sum of n
        self._rp_r = np.zeros(L)  # requests with rows at the layer

    def _request_prior_add(self, rc: np.ndarray, rn: np.ndarray) -> None:
        """A request finished with choices ``rc`` [L, J] in ``rn`` [L] rows per layer:
        add it to the sums."""
        seen = rn > 0
        if not seen.any():
            return
        n = np.where(seen, rn, 1.0)[:, None]
        self._rp_s2 += np.where(seen[:, None], rc * rc / n, 0.0)
        self._rp_s1 += np.where(seen[:, None], rc, 0.0)
        self._rp_n += np.where(seen, rn, 0.0)
        self._rp_r += seen

    def _request_prior_weights(self, pop: np.ndarray) -> None:
        """pop[:, J + 1] = each layer's weight from the sums and ``pop``'s population
        rates (module doc); a layer with no finished request keeps its weight."""
        J = pop.shape[1] - 2
        m = (pop[:, :J] + self._base) / (pop[:, J : J + 1] + 1.0)
        var = m * (1.0 - m)
        for lay in range(pop.shape[0]):
            if self._rp_r[lay] == 0:
                continue
            mm = m[lay]
            obs = float(
                (self._rp_s2[lay] - 2.0 * mm * self._rp_s1[lay] + mm * mm * self._rp_n[lay]).sum()
            )
            tau2 = (obs - self._rp_r[lay] * float(var[lay].sum())) / (J * self._rp_n[lay])
            pop[lay, J + 1] = float(var[lay].mean()) / tau2 if tau2 > 0 else np.inf

    def _request_prior_served(self, slot: int) -> None:
        """The served request in ``slot`` finished: count it, refresh the bins."""
        if not self._rp_on:
            return
        self._request_prior_add(self._rc[slot], self._rn[slot])
        self._request_prior_weights(self._pop)
        self._request_prior_bins()

    def _request_prior_fit_state(self, pop: np.ndarray) -> None:
        """The replay's new population counts ``pop`` start with the current weights."""
        if self._rp_on and pop.shape == self._pop.shape:
            pop[:, -1] = self._pop[:, -1]

    def _request_prior_fit(self, st: dict) -> None:
        """A training request of the replay (``st``: policies.fmoe_fit's state) ended:
        count it; the replay's population and the served one's share the weights."""
        if not self._rp_on:
            return
        pop = st["pop"]
        if pop.shape != self._pop.shape:
            return
        self._request_prior_add(st["rc"][0], st["rn"][0])
        self._request_prior_weights(pop)  # with the replay's own population rates
        self._pop[:, -1] = pop[:, -1]  # the served run starts with them (no population yet)
        self._request_prior_bins()

    def _request_prior_bins(self) -> None:
        """The request-frequency bins (and the transitions' on top) with the new weights."""
        self._jit.request_bins(
            self._ist, self._rc, self._rn, self._slots, self._base, CAL_BINS, -1, self._pop
        )
        self._transition_bins(-1)  # off: nothing
        self._etnu_dirty = True
        self._ev += 1

    def request_prior_metadata(self) -> dict[str, float | int | None]:
        """The measured weights (pseudo-observations per layer: min and max of the finite
        ones, None when there are none) and how many layers showed no excess spread
        (weight infinite: every request at the population's rate). Infinity is kept out
        of the numbers: it is not valid JSON."""
        w = self._pop[:, -1]
        finite = w[np.isfinite(w)]
        return {
            "request_prior_weight_min": float(finite.min()) if finite.size else None,
            "request_prior_weight_max": float(finite.max()) if finite.size else None,
            "request_prior_layers_no_spread": int((~np.isfinite(w)).sum()),
        }
