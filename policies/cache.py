"""ExpertCache: the one cache mechanism, shared by the simulator and the real executor.

One cache per device. Each (layer, expert) key is ABSENT, LOADING (a slot is reserved
and a copy is in flight) or RESIDENT. Capacity counts LOADING and RESIDENT keys, so a
load can never overfill the device. The executor owns time and transfers; the cache only
keeps state, chooses victims with a caller-supplied score (lower goes first) and counts.

Rules the executor follows (checked here, raising CacheError when broken):
- ``begin_load`` reserves a slot, evicting resident keys if needed; pinned keys are never
  evicted, protected keys only when nothing unprotected can go. Victims are scored by a
  caller-supplied *batch* scorer (one call per choice, scoring the candidates at once:
  a policy's ``eviction_scores``), lowest first. The scorer must be pure (an entry's
  score does not depend on the other entries passed): it may also be given entries that
  cannot be evicted, which are then skipped.
- ``finish_load`` makes a loading key resident; ``cancel_load`` frees its slot.
- ``demand`` records a compute demand (hit iff RESIDENT at that moment) and the executor
  must have made the key resident and pinned it before computing (``use``).
- An entry's ``last_used`` is written by the cache only (policies read entries, never
  write them): a scorer marked :func:`by_recency` is answered from the cache's own
  recency order.

Over 450 lines on purpose: one state machine (states, pins, protection, counters, victim
choice) whose invariants are property-tested together and read best in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, TypeVar

from policies.cache_victims import CandidateArrays, VictimIndex, victim_index_of
from specs.errors import InputError

ExpertKey = tuple[int, int]  # (layer, expert)


class CacheError(RuntimeError):
    """An executor broke the cache protocol (a bug, not bad user input)."""


class CacheFullError(CacheError):
    """No slot can be freed: every cached key is pinned or loading."""


class ExpertState(Enum):
    ABSENT = "absent"
    LOADING = "loading"
    RESIDENT = "resident"


# the members as module globals: reading ExpertState.X costs ~80 ns (the enum class's
# attribute lookup), a global ~10 ns, and the states are read on every demand, use and load
_ABSENT, _LOADING, _RESIDENT = ExpertState.ABSENT, ExpertState.LOADING, ExpertState.RESIDENT


@dataclass(slots=True)  # slots: policies read these fields per entry on every eviction
class CacheEntry:
    """What the cache knows about one cached key; policies read it to score evictions."""

    key: ExpertKey
    state: ExpertState
    loaded_at: float
    last_used: float
    uses: int = 0  # uses while cached (MoE-Infinity's in-cache visits)
    pins: int = 0
    protected: bool = False
    by_prefetch: bool = False
    prefetch_used: bool = False


@dataclass(slots=True)  # slots: updated on every demand and load
class CacheCounters:
    """Counters of one cache; all are monotone and never negative."""

    demands: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    demand_loads: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0  # demanded at least once (resident or still loading then)
    prefetches_timely: int = 0  # resident at their first demand
    prefetches_late: int = 0  # still loading at their first demand
    prefetches_wasted: int = 0  # evicted before any demand
    prefetches_cancelled: int = 0
    evictions: int = 0
    evictions_by_prefetch: int = 0  # victims chosen to make room for a prefetch
    bytes_loaded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: CacheCounters) -> CacheCounters:
        return CacheCounters(**{k: v + getattr(other, k) for k, v in asdict(self).items()})


# candidates from which a scorer's compiled victim choice (victim_index) is used: below,
# scoring the few entries in Python costs less than the kernel call (about a microsecond
# of dispatch) and the arrays' upkeep; either way the same victim
VICTIM_INDEX_MIN = 32

EvictionScore = Callable[[CacheEntry], float]
EvictionScores = Callable[[list[CacheEntry]], list[float]]


def _lowest(group: list[CacheEntry], sc: list[float]) -> CacheEntry:
    """The entry of ``group`` with the lowest score in ``sc``, ties to the lowest key (the
    group's order does not matter)."""
    best = min(sc)
    n = sc.count(best)
    return group[sc.index(best)] if n == 1 else _lowest_key_at(group, sc, best, n)


def _lowest_key_at(group: list[CacheEntry], sc: list[float], best: float, n: int) -> CacheEntry:
    """The lowest-keyed of the ``n`` entries of ``group`` whose score in ``sc`` is ``best``
    (found by scanning ``sc`` in C, not by a generator over every entry)."""
    i = sc.index(best)
    e = group[i]
    for _ in range(n - 1):
        i = sc.index(best, i + 1)
        other = group[i]
        if other.key < e.key:
            e = other
    return e


def _last_used(entry: CacheEntry) -> float:
    return entry.last_used


def lru_score(entry: CacheEntry) -> float:
    """Default eviction score: least recently used goes first."""
    return entry.last_used


_Scores = TypeVar("_Scores", bound=EvictionScores)


def by_recency(scores: _Scores) -> _Scores:
    """Mark the batch scorer ``scores`` as returning each entry's ``last_used`` (exactly, as
    :func:`lru_scores` does): the cache then picks its victim by walking its recency order
    instead of scoring every entry. The choice is the same. Usable on a method."""
    scores.by_recency = True  # type: ignore[attr-defined]
    return scores


@by_recency
def lru_scores(entries: list[CacheEntry]) -> list[float]:
    """:func:`lru_score` of each entry."""
    return [e.last_used for e in entries]


@dataclass(frozen=True)
class KernelEviction:
    """A policy's eviction order in a form a compiled executor reproduces without calling
    the policy (``Policy.kernel_eviction``): the executor then scores victims itself.

    ``kind``: ``"recency"`` (scores are ``last_used``, as :func:`lru_scores`) or
    ``"count_then_recency"`` (``count * scale + last_used``, the count being the entry's
    ``uses`` or, with ``run_counts``, ``counts[layer, expert]``). ``counts``: an int64
    [layers, experts] array the executor adds 1 to for every expert a layer step used, in
    place of the policy's ``on_expert_used`` (which must do exactly that and nothing else);
    None when the policy keeps no such count. Ties go to the lower key, as in the cache."""

    kind: str
    counts: Any = None
    run_counts: bool = False
    scale: float = 0.0


@dataclass
class ExpertCache:
    """Expert slots of one device.

    ``capacity`` is in experts; build from bytes with :meth:`from_bytes`. Contract:
    ``capacity >= 1``; ``expert_bytes > 0``.
    """

    capacity: int
    expert_bytes: int
    device: int = 0
    entries: dict[ExpertKey, CacheEntry] = field(default_factory=dict)
    counters: CacheCounters = field(default_factory=CacheCounters)
    # LOADING entries and protected keys, kept by the methods below; they pick how the
    # victim is searched (see _victim), never which one is chosen, and which entries
    # unprotect_layer visits (so an entry's protection changes through these methods only)
    _n_loading: int = field(default=0, init=False, repr=False, compare=False)
    _protected: set[ExpertKey] = field(default_factory=set, init=False, repr=False, compare=False)
    # the unprotected candidates: RESIDENT, unpinned, unprotected entries (any order), kept
    # by every method that changes a state, a pin count or a protection; a general scorer's
    # victim is chosen among them without filtering every entry (hundreds on fine-grained
    # models)
    _cands: dict[ExpertKey, CacheEntry] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # the entries by ascending last_used (ties in any order) while _in_order holds, i.e.
    # while every new last_used was >= _latest, the largest so far; with a by_recency
    # scorer the least recently used entry is then near the front (see _least_recent)
    _recency: dict[ExpertKey, CacheEntry] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _in_order: bool = field(default=True, init=False, repr=False, compare=False)
    _latest: float = field(default=-math.inf, init=False, repr=False, compare=False)
    # the last scorer seen and whether it is marked by_recency (a missing attribute costs
    # a caught exception: look it up once per scorer, not per load)
    _scorer: EvictionScores | None = field(default=None, init=False, repr=False, compare=False)
    _scorer_recent: bool = field(default=False, init=False, repr=False, compare=False)
    # a scorer's compiled victim choice (policies.cache_victims), and the candidates as
    # arrays for it: built at its first use, then kept in step with _cands (None: not kept)
    _scorer_vix: VictimIndex | None = field(default=None, init=False, repr=False, compare=False)
    _arr: CandidateArrays | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise InputError(
                f"device {self.device}: expert cache capacity must be >= 1 expert, got {self.capacity}"
            )
        if self.expert_bytes <= 0:
            raise InputError(f"expert_bytes must be positive, got {self.expert_bytes}")
        values = self.entries.values()
        self._n_loading = sum(e.state is _LOADING for e in values)
        self._protected = {e.key for e in values if e.protected}
        self._cands = {
            k: e
            for k, e in self.entries.items()
            if e.state is _RESIDENT and not e.pins and not e.protected
        }
        for e in sorted(values, key=_last_used):
            self._recency[e.key] = e
            self._touched(e.last_used)

    @classmethod
    def from_bytes(cls, budget_bytes: int, expert_bytes: int, device: int = 0) -> ExpertCache:
        """A cache holding as many whole experts as ``budget_bytes`` allows."""
        return cls(
            capacity=int(budget_bytes // max(expert_bytes, 1)),
            expert_bytes=expert_bytes,
            device=device,
        )

    # -- queries ----------------------------------------------------------------------
    def state(self, key: ExpertKey) -> ExpertState:
        e = self.entries.get(key)
        return e.state if e else _ABSENT

    def is_resident(self, key: ExpertKey) -> bool:
        e = self.entries.get(key)
        return e is not None and e.state is _RESIDENT

    def is_loading(self, key: ExpertKey) -> bool:
        e = self.entries.get(key)
        return e is not None and e.state is _LOADING

    @property
    def used(self) -> int:
        """Slots taken by LOADING and RESIDENT keys."""
        return len(self.entries)

    @property
    def free(self) -> int:
        return self.capacity - len(self.entries)

    def resident_keys(self) -> list[ExpertKey]:
        return [k for k, e in self.entries.items() if e.state is _RESIDENT]

    def loading_keys(self) -> list[ExpertKey]:
        return [k for k, e in self.entries.items() if e.state is _LOADING]

    def can_make_room(self) -> bool:
        """True when a slot is free or some resident key is unpinned."""
        return self.free > 0 or any(
            e.state is _RESIDENT and e.pins == 0 for e in self.entries.values()
        )

    # -- loads ------------------------------------------------------------------------
    def choose_victim(self, scores: EvictionScores = lru_scores) -> ExpertKey | None:
        """Lowest-score evictable key: unprotected first, protected only if nothing else.

        ``scores`` maps a list of candidate entries to their scores (lower goes first).
        Never a pinned or loading key. Ties break by key, so choices are deterministic.
        """
        victim = self._victim(scores)
        return None if victim is None else victim.key

    def _victim(self, scores: EvictionScores) -> CacheEntry | None:
        """The entry :meth:`choose_victim` names (None when nothing can be evicted)."""
        # the lexicographic minimum of (protected, score, key): this runs for every load
        # once the cache is full
        if scores is not self._scorer:
            self._scorer = scores
            self._scorer_recent = getattr(scores, "by_recency", False)
            self._scorer_vix = victim_index_of(scores)
        if self._scorer_recent and self._in_order:
            return self._least_recent()
        resident = _RESIDENT
        cands = self._cands
        if cands:  # the unprotected candidates: the victim is among them
            e = None
            if self._scorer_vix is not None and len(cands) >= VICTIM_INDEX_MIN:
                e = self._victim_by_index(cands)
            if e is None:
                group = list(cands.values())
                e = group[0] if len(group) == 1 else _lowest(group, scores(group))
            if e.state is resident and not e.pins and not e.protected:
                return e
            # an entry changed outside the cache's methods (a test setting a flag): the
            # set is rebuilt from the entries and the choice made again
            self._arr = None
            self._cands = {
                k: e
                for k, e in self.entries.items()
                if e.state is resident and not e.pins and not e.protected
            }
            return self._victim(scores)
        # none: protected ones may go
        group = [e for e in self.entries.values() if e.state is resident and not e.pins]
        if not group:
            return None
        return group[0] if len(group) == 1 else _lowest(group, scores(group))

    def _victim_by_index(self, cands: dict[ExpertKey, CacheEntry]) -> CacheEntry | None:
        """The scorer's compiled choice among ``cands`` (None: it gave no answer)."""
        arr = self.candidate_arrays()
        i = self._scorer_vix(arr)  # type: ignore[misc]
        return arr.entries[i] if i >= 0 else None

    def candidate_arrays(self) -> CandidateArrays:
        """The unprotected candidates (RESIDENT, unpinned, unprotected entries) as arrays
        (:class:`~policies.cache_victims.CandidateArrays`), kept in step with the cache
        from the first call on; read-only for the caller."""
        arr, cands = self._arr, self._cands
        if arr is None or arr.src is not cands or arr.n != len(cands):
            # first use, or the dict was replaced or changed outside these methods
            arr = self._arr = CandidateArrays(cands)
        return arr

    def _least_recent(self) -> CacheEntry | None:
        """:meth:`_victim` for a by_recency scorer, entries in recency order: the first
        evictable entry (unprotected ones first) has the lowest last_used; entries of
        equal last_used follow it, and the lowest key among them wins."""
        resident = _RESIDENT
        order = self._recency.values()
        for protected_ok in (False, True):
            best = None
            for e in order:
                if best is None:
                    if e.state is resident and not e.pins and (protected_ok or not e.protected):
                        best = e
                elif e.last_used != best.last_used:
                    break
                elif (
                    e.state is resident
                    and not e.pins
                    and (protected_ok or not e.protected)
                    and e.key < best.key
                ):
                    best = e
            if best is not None:
                return best
        return None

    def _touched(self, now: float) -> None:
        """An entry just got ``last_used = now`` and moved to the end of the recency order:
        the order stays ascending only if ``now`` is not below any earlier value."""
        if now >= self._latest:
            self._latest = now
        else:  # also for NaN
            self._in_order = False

    def begin_load(
        self,
        key: ExpertKey,
        now: float,
        *,
        prefetch: bool,
        scores: EvictionScores = lru_scores,
        pin: bool = False,
    ) -> list[ExpertKey]:
        """Reserve a slot for ``key`` (ABSENT -> LOADING), evicting as needed.

        Returns the evicted keys. Raises CacheFullError when no slot can be freed, and
        CacheError when ``key`` is already cached. ``pin``: the new entry starts pinned
        once (as :meth:`pin` right after, for a demand load the executor computes next).
        """
        entries = self.entries
        if key in entries:
            raise CacheError(f"begin_load of {key}: already {entries[key].state.value}")
        c = self.counters
        evicted: list[ExpertKey] = []
        while len(entries) >= self.capacity:
            # _victim's first branches, tested here: this runs for every load once full
            victim = None
            if scores is self._scorer:
                if self._scorer_recent and self._in_order:
                    victim = self._least_recent()
                elif self._scorer_vix is not None and len(self._cands) >= VICTIM_INDEX_MIN:
                    # _victim_by_index on the kept arrays (candidate_arrays' check)
                    arr, cands = self._arr, self._cands
                    if arr is not None and arr.src is cands and arr.n == len(cands):
                        i = self._scorer_vix(arr)
                        if i >= 0:
                            e = arr.entries[i]
                        else:  # no answer: scored as usual
                            group = list(cands.values())
                            e = group[0] if len(group) == 1 else _lowest(group, scores(group))
                        if e.state is _RESIDENT and not e.pins and not e.protected:
                            victim = e  # (else _victim rebuilds the set and chooses again)
            if victim is None:
                victim = self._victim(scores)
            if victim is None:
                raise CacheFullError(
                    f"device {self.device}: all {self.capacity} slots pinned or loading"
                )
            self._drop_evicted(victim)  # resident and unpinned by choice: no checks
            evicted.append(victim.key)
        if prefetch and evicted:
            c.evictions_by_prefetch += len(evicted)
        # positional: key, state, loaded_at, last_used, uses, pins, protected, by_prefetch
        entries[key] = self._recency[key] = CacheEntry(
            key, _LOADING, now, now, 0, 1 if pin else 0, prefetch, prefetch
        )
        if now >= self._latest:  # self._touched(now), inlined: once per copy
            self._latest = now
        else:
            self._in_order = False
        self._n_loading += 1
        c.loads += 1
        c.bytes_loaded += self.expert_bytes
        if prefetch:
            self._protected.add(key)
            c.prefetches_issued += 1
        else:
            c.demand_loads += 1
        return evicted

    def finish_load(self, key: ExpertKey, now: float) -> None:
        """LOADING -> RESIDENT."""
        e = self.entries.get(key)
        if e is None or e.state is not _LOADING:
            raise CacheError(f"finish_load of {key}: not loading")
        e.state = _RESIDENT
        e.loaded_at = now
        self._n_loading -= 1
        if not e.pins and not e.protected:
            self._cands[key] = e
            if self._arr is not None:
                self._arr.put(key, e)

    def cancel_load(self, key: ExpertKey) -> None:
        """Abort an in-flight load: LOADING -> ABSENT; the bytes already counted stay counted."""
        e = self.entries.get(key)
        if e is None or e.state is not _LOADING:
            raise CacheError(f"cancel_load of {key}: not loading")
        if e.pins:
            raise CacheError(f"cancel_load of {key}: pinned")
        del self.entries[key]
        del self._recency[key]
        self._n_loading -= 1
        if e.protected:
            self._protected.discard(e.key)
        if e.by_prefetch:
            self.counters.prefetches_cancelled += 1

    def evict(self, key: ExpertKey) -> None:
        """RESIDENT -> ABSENT. Raises CacheError for a pinned or loading key."""
        e = self.entries.get(key)
        if e is None or e.state is not _RESIDENT:
            raise CacheError(f"evict of {key}: not resident")
        if e.pins:
            raise CacheError(f"evict of {key}: pinned")
        self._drop_evicted(e)

    def _drop_evicted(self, e: CacheEntry) -> None:
        """Remove a resident, unpinned entry and count the eviction."""
        del self.entries[e.key]
        del self._recency[e.key]
        self._cands.pop(e.key, None)
        if self._arr is not None:
            self._arr.drop(e.key)
        if e.protected:
            self._protected.discard(e.key)
        c = self.counters
        c.evictions += 1
        if e.by_prefetch and not e.prefetch_used:
            c.prefetches_wasted += 1

    def preload(self, keys: Iterable[ExpertKey], now: float = 0.0) -> None:
        """Make keys resident before a run starts (no-offload, warm starts); not counted as loads."""
        for key in keys:
            if key in self.entries:
                continue
            if self.free <= 0:
                raise CacheFullError(
                    f"device {self.device}: preload exceeds capacity {self.capacity}"
                )
            e = CacheEntry(key, _RESIDENT, loaded_at=now, last_used=now)
            self.entries[key] = self._recency[key] = self._cands[key] = e
            if self._arr is not None:
                self._arr.put(key, e)
            self._touched(now)

    # -- compute ----------------------------------------------------------------------
    def demand(self, key: ExpertKey) -> bool:
        """Record that compute needs ``key`` now; True (a hit) iff it is RESIDENT."""
        e = self._count_demand(key)
        return e is not None and e.state is _RESIDENT

    def demand_and_pin(self, key: ExpertKey) -> ExpertState:
        """:meth:`demand` ``key`` and :meth:`pin` it when cached, in one call; returns its
        state (RESIDENT: a hit; LOADING: a miss, now pinned; ABSENT: a miss, not pinned)."""
        # self._count_demand(key), inlined: this runs for every expert a layer step demands
        c = self.counters
        c.demands += 1
        e = self.entries.get(key)
        if e is None:
            c.misses += 1
            return _ABSENT
        state = e.state
        if state is _RESIDENT:
            c.hits += 1
        else:
            c.misses += 1
        if e.by_prefetch and not e.prefetch_used:
            e.prefetch_used = True
            c.prefetches_used += 1
            if state is _RESIDENT:
                c.prefetches_timely += 1
            else:
                c.prefetches_late += 1
        if not e.pins and state is _RESIDENT:
            self._cands.pop(key, None)
            if self._arr is not None:
                self._arr.drop(key)
        e.pins += 1
        return state

    def _count_demand(self, key: ExpertKey) -> CacheEntry | None:
        """Count a demand of ``key`` (a hit iff RESIDENT); returns its entry, if cached."""
        c = self.counters
        c.demands += 1
        e = self.entries.get(key)
        if e is None:
            c.misses += 1
            return None
        if e.state is _RESIDENT:
            c.hits += 1
        else:
            c.misses += 1
        if e.by_prefetch and not e.prefetch_used:
            # a prefetch that was in flight when demanded still saved part of the copy
            # (used, late); one resident at its first demand was timely
            e.prefetch_used = True
            c.prefetches_used += 1
            if e.state is _RESIDENT:
                c.prefetches_timely += 1
            else:
                c.prefetches_late += 1
        return e

    def pin(self, key: ExpertKey) -> None:
        e = self.entries.get(key)
        if e is None:
            raise CacheError(f"pin of {key}: not cached")
        if not e.pins:
            self._cands.pop(key, None)
            if self._arr is not None:
                self._arr.drop(key)
        e.pins += 1

    def unpin(self, key: ExpertKey) -> None:
        e = self.entries.get(key)
        if e is None or e.pins == 0:
            raise CacheError(f"unpin of {key}: not pinned")
        e.pins -= 1
        if not e.pins and e.state is _RESIDENT and not e.protected:
            self._cands[key] = e
            if self._arr is not None:
                self._arr.put(key, e)

    def use(self, key: ExpertKey, now: float, unpin: bool = False) -> None:
        """Compute used ``key`` (must be RESIDENT): update recency and frequency, lift
        protection; with ``unpin``, also :meth:`unpin` it (must be pinned) in the same
        call. A refused call (CacheError) changes nothing."""
        e = self.entries.get(key)
        if e is None or e.state is not _RESIDENT:
            raise CacheError(f"use of {key}: not resident")
        if unpin:
            if e.pins == 0:
                raise CacheError(f"unpin of {key}: not pinned")
            e.pins -= 1
        e.uses += 1
        e.last_used = now
        recency = self._recency
        del recency[key]  # to the end of the recency order
        recency[key] = e
        if now >= self._latest:  # self._touched(now), inlined: once per expert per layer step
            self._latest = now
        else:
            self._in_order = False
        if e.protected:
            e.protected = False
            self._protected.discard(key)
        if not e.pins:
            self._cands[key] = e
            if self._arr is not None:
                self._arr.put(key, e)

    def unprotect_layer(self, layer: int) -> None:
        """A layer has passed: its predicted-but-unused prefetches lose their protection."""
        protected, entries = self._protected, self.entries
        for key in [k for k in protected if k[0] == layer]:
            e = entries[key]
            e.protected = False
            protected.discard(key)
            if not e.pins and e.state is _RESIDENT:
                self._cands[key] = e
                if self._arr is not None:
                    self._arr.put(key, e)
