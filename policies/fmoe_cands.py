"""fMoE's deadline candidates of one hook as arrays (issue 21, speed only): what was a
dict ``(layer, expert) -> p`` (:class:`policies.fmoe_deadline.FmoeDeadline`'s
``_dl_cands``) kept as a flat [L x J] float array of p (-1.0: absent) plus the flat
indices (layer x J + expert) in first-insertion order, so the admission reads them
without a tuple per candidate. The dict's rule is kept exactly: a candidate is set
where its p is larger than the one held (``p > get(key, -1.0)``; absent counts as -1.0,
so a p at or below -1.0, or NaN, never enters) and keeps its first position when raised.
tests/test_fmoe_cands.py compares it with the dict."""

from __future__ import annotations

from typing import Any

import numpy as np

_ABSENT = -1.0
_NONE_I = np.zeros(0, np.int64)
_NONE_F = np.zeros(0, np.float64)


class CandidateSet:
    """A hook's candidates over ``n_layers`` x ``n_experts``."""

    def __init__(self, n_layers: int, n_experts: int) -> None:
        self.J = n_experts
        size = n_layers * n_experts
        self.p = np.full(size, _ABSENT)
        self._pm = memoryview(self.p)  # item access a fraction of numpy's scalar one
        self.idx = np.zeros(size, np.int64)  # flat indices, first insertion first
        self._im = memoryview(self.idx)
        self.cnt = 0  # how many
        # take_merged's scratch (all -1) and outputs (each key at most once: <= size)
        self._pos = np.full(size, -1, np.int64)
        self._out = (
            np.zeros(size, np.int64),
            np.zeros(size, np.int64),
            np.zeros(size),
            np.zeros(size, np.bool_),
            np.zeros(size),
        )
        self._merge: Any = None  # policies.fmoe_admit_jit.merge_cands (numba: at first use)

    def __len__(self) -> int:
        return self.cnt

    def put(self, layer: int, j: int, p: float) -> None:
        """``cands[(layer, j)] = p`` where ``p > cands.get((layer, j), -1.0)``."""
        f = layer * self.J + j
        cur = self._pm[f]
        if p > cur:
            if cur == _ABSENT:  # every value held is above -1.0
                self._im[self.cnt] = f
                self.cnt += 1
            self._pm[f] = p

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (flat indices int64, p float64, in insertion order), and empty
        the set."""
        f = self.idx[: self.cnt].copy()
        p = self.p[f]
        self.p[f] = _ABSENT
        self.cnt = 0
        return f, p

    def take_merged(
        self,
        live: list[tuple[tuple[int, int], float]],
        old: dict,
        g: int,
        look_q: dict[tuple[int, int], float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``_admit``'s candidates as arrays (layers, experts, p, was queued, lookahead
        chance), and empty the set: ``live`` the pending (key, p) not started whose layer
        is still ahead of gate ``g`` (in ``old``'s order), then this set's candidates
        whose layer is ahead of ``g``, each kept at the larger p where already one (``p >
        cands.get(key, -1.0)``) at its first position: the dict the Python loop builds,
        in its order. ``was``: the key is in ``old``; the lookahead chance
        ``look_q.get(key, -1.0)``. The arrays are views of buffers the next call
        overwrites."""
        merge = self._merge
        if merge is None:
            from policies.fmoe_admit_jit import merge_cands  # numba: bound with fmoe_jit

            merge = self._merge = merge_cands
        of, op, oldf, lqf, lqv = self.merge_inputs(live, old, look_q)
        lay, jj, p, was, look = self._out
        n = merge(self.p, self.idx, self.cnt, of, op, oldf, lqf, lqv, g, self.J, self._pos,
                  lay, jj, p, was, look)  # fmt: skip
        self.cnt = 0
        return lay[:n], jj[:n], p[:n], was[:n], look[:n]

    def merge_inputs(
        self,
        live: list[tuple[tuple[int, int], float]],
        old: dict,
        look_q: dict[tuple[int, int], float],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`take_merged`'s arrays for merge_cands: the live keys (flat) and p, the
        pending keys where more than the live ones, the lookahead chances' keys and
        values."""
        J = self.J
        if live:
            of = np.array([k[0] * J + k[1] for k, _ in live], np.int64)
            op = np.array([v for _, v in live], np.float64)
        else:
            of, op = _NONE_I, _NONE_F
        # the pending keys not live (with a live one's, found the same)
        oldf = (
            np.array([k[0] * J + k[1] for k in old], np.int64) if len(old) > len(live) else _NONE_I
        )
        if look_q:
            lqf = np.array([k[0] * J + k[1] for k in look_q], np.int64)
            lqv = np.array(list(look_q.values()), np.float64)
        else:
            lqf, lqv = _NONE_I, _NONE_F
        return of, op, oldf, lqf, lqv
