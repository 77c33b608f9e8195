"""The unprotected eviction candidates of an :class:`~policies.cache.ExpertCache` as
arrays, for a policy that picks its victim in compiled code (``victim_index``).

A cache holds hundreds of entries on fine-grained models (DeepSeek-V3: 256 experts x 58
layers), and a scorer called with every candidate costs a Python step per entry at every
load once the cache is full. :class:`CandidateArrays` mirrors the cache's candidate set
(RESIDENT, unpinned, unprotected entries) in three arrays kept in step with it, O(1) per
change (swap-remove), so a policy's kernel scans the candidates without touching an entry
object. The cache builds the mirror lazily, for a scorer marked :func:`with_victim_index`
only, and keeps it while it mirrors the same candidate dict; it decides nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

ExpertKey = tuple[int, int]

# victim_index(arrays) -> the victim's slot among arrays' first n, or a negative number:
# no answer (the cache then scores the entries as usual)
VictimIndex = Callable[["CandidateArrays"], int]

_S = TypeVar("_S")


def with_victim_index(scores: _S) -> _S:
    """Mark a policy's batch scorer *method* as having a companion
    ``victim_index(arrays)`` (a :class:`CandidateArrays`) on the same object, which names
    the slot of the entry the scorer's scores would (lowest score, ties to the lowest
    key), or answers negative to let the cache score as usual. Usable on a method; a subclass overriding
    the scorer loses the mark (and so the shortcut)."""
    scores.victim_index = True  # type: ignore[attr-defined]
    return scores


def victim_index_of(scores: Any) -> VictimIndex | None:
    """The companion of a marked bound scorer (None when unmarked or not a method)."""
    if not getattr(scores, "victim_index", False):
        return None
    owner = getattr(scores, "__self__", None)
    return None if owner is None else getattr(owner, "victim_index", None)


class CandidateArrays:
    """Slots 0..n-1 hold the candidates' layers, experts, ``last_used`` and entries (any
    order: victims are chosen by score and key, never by slot); ``slot`` maps a key to its
    slot. ``src`` is the candidate dict it mirrors (a cache that replaces its dict gets a
    new mirror). ``puts`` counts the candidates added or refreshed: while it stands, the
    set has only lost members and every member's ``last_used`` is unchanged (a scorer may
    keep a ranking of them that long)."""

    def __init__(self, src: dict[ExpertKey, Any]) -> None:
        self.src = src
        cap = max(16, 2 * len(src))
        self.layers = np.zeros(cap, np.int64)
        self.experts = np.zeros(cap, np.int64)
        self.last_used = np.zeros(cap, np.float64)
        self._views()
        self.entries: list[Any] = []
        self.slot: dict[ExpertKey, int] = {}
        self.puts = 0
        for key, e in src.items():
            self.put(key, e)

    def _views(self) -> None:
        # memoryview item writes cost a fraction of numpy's scalar assignment
        self._lay, self._exp, self._lu = (
            memoryview(self.layers),
            memoryview(self.experts),
            memoryview(self.last_used),
        )

    @property
    def n(self) -> int:
        return len(self.entries)

    def _grow(self) -> None:
        cap = 2 * len(self.layers)
        for name in ("layers", "experts", "last_used"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)
        self._views()

    def put(self, key: ExpertKey, e: Any) -> None:
        """``key`` is (still) a candidate with entry ``e`` (its last_used refreshed)."""
        self.puts += 1
        i = self.slot.get(key)
        if i is None:
            i = len(self.entries)
            if i >= len(self.layers):
                self._grow()
            self.slot[key] = i
            self.entries.append(e)
            self._lay[i] = key[0]
            self._exp[i] = key[1]
        else:
            self.entries[i] = e
        self._lu[i] = e.last_used

    def drop(self, key: ExpertKey) -> None:
        """``key`` is no candidate (any more); a no-op when it was none."""
        i = self.slot.pop(key, None)
        if i is None:
            return
        entries = self.entries
        last = len(entries) - 1
        if i != last:  # the last slot moves into the freed one
            e = entries[last]
            entries[i] = e
            self.slot[e.key] = i
            self._lay[i] = self._lay[last]
            self._exp[i] = self._exp[last]
            self._lu[i] = self._lu[last]
        entries.pop()


# KernelVictims.state's slots: vi[KV_ON] whether the kernel's choice applies now (else
# the executor calls the policy's scorer), KV_G the last gate's layer, KV_IT the
# iteration, KV_ROWS its rows, KV_DIRTY whether the eviction table is stale, KV_CHANCE
# whether this iteration's chance table is made, KV_EV a version of the policy's state
# that changes whenever a score may (the clock's tie weight aside; the executor may keep
# a ranking while it stands); vf[KV_TIE] the recency tie weight
KV_ON, KV_G, KV_IT, KV_ROWS, KV_DIRTY, KV_CHANCE = range(6)
KV_EV = 10
KV_TIE = 0


@dataclass(frozen=True)
class KernelVictims:
    """A policy's victim choice in a form a compiled executor makes itself, without a call
    back per victim (``Policy.kernel_victims``); the executor still calls the policy where
    its Python would make a table lazily, so the policy's state stays the reference's.

    ``kind`` ``"expected-time"`` (fMoE's default eviction, policies/fmoe_eviction.py):
    among the cache's unprotected candidates (else its protected ones) the lowest
    ``score + tie * last_used`` wins, ties to the lower key; from ``VICTIM_INDEX_MIN``
    unprotected candidates on the score is :func:`policies.fmoe_jit._victim_etnu` of
    (``ist``, ``fl``, ``prot``) at gate ``vi[KV_G]`` of iteration ``vi[KV_IT]`` of
    ``vi[KV_ROWS]`` rows (what the policy's ``victim_index`` computes), after
    ``make_chance()`` when ``vi[KV_CHANCE]`` is 0; below, ``etnu[layer, expert]`` (its
    ``eviction_scores``), after ``make_table()`` when ``vi[KV_DIRTY]`` is 1. A NaN score:
    the policy's scorer decides. The arrays are the policy's own, updated in place (never
    replaced); ``state(vi, vf)`` writes the scalars above, read whenever the executor
    enters its kernel (they change only in the policy's hooks and in the two makers)."""

    kind: str
    ist: np.ndarray
    fl: np.ndarray
    prot: np.ndarray
    etnu: np.ndarray
    state: Callable[[np.ndarray, np.ndarray], None]
    make_chance: Callable[[], Any]
    make_table: Callable[[], Any]
