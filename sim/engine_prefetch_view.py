"""What a policy reads of the caches while the prefetching compiled path runs
(:mod:`sim.engine_prefetch`): each entry's fields, ``ExpertCache._cands``,
``candidate_arrays()`` and ``counters`` of each device answered from the kernel's arrays at
the moment of the read, so a hook or the policy's victim scorer sees exactly the state the
Python engine would show it. ``ExpertCache.entries`` stays the cache's own dict (a policy
may hold it from bind): the path keeps its members in step with the kernel, one
:class:`LiveEntry` per load, frozen (:func:`freeze`) when it leaves. Policies read entries
and never write them (the cache's contract); the caches' own private indexes (recency
order, candidate arrays) are rebuilt at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.base import Residency
from policies.cache import CacheCounters, CacheEntry, ExpertCache, ExpertKey, ExpertState

if TYPE_CHECKING:
    from sim.engine_prefetch import PrefetchPath

COUNTERS = tuple(CacheCounters.__dataclass_fields__)
STATES = {1: ExpertState.LOADING, 2: ExpertState.RESIDENT}
# sim.fastkernel_prefetch's columns (PrefetchPath checks them): read per entry field
K_STATE, K_PINS, K_USES, K_DEV, K_PROT, K_BYPF, K_PFUSED = 0, 1, 2, 5, 6, 7, 8
KF_LAST, KF_LOADED, G_COUNT = 0, 1, 2


class LiveEntries(Mapping):
    """The cache entries of one device while the kernel runs: a read-only mapping
    answered from the kernel's arrays at the moment of the read (membership, length, the
    entries in the dict's insertion order, each the key's :class:`LiveEntry`); the base of
    :class:`LiveCands`."""

    def __init__(self, fp: PrefetchPath, g: int) -> None:
        self.fp, self.g = fp, g

    def _k(self, key: object) -> int:
        fp = self.fp
        try:
            lay, e = key  # type: ignore[misc]
        except (TypeError, ValueError):
            return -1
        L, J = fp.experts_shape
        if not (0 <= lay < L and 0 <= e < J):
            return -1
        k = lay * J + e
        ki = fp.kim
        if ki[k, K_STATE] == 0 or ki[k, K_DEV] != self.g:
            return -1
        return k

    def __contains__(self, key: object) -> bool:
        return self._k(key) >= 0

    def __getitem__(self, key: object) -> CacheEntry:
        k = self._k(key)
        if k < 0:
            raise KeyError(key)
        return self.fp.entry(k)

    def get(self, key: object, default: Any = None) -> Any:
        k = self._k(key)
        return default if k < 0 else self.fp.entry(k)

    def __len__(self) -> int:
        return self.fp.gim[self.g, G_COUNT]

    def __iter__(self) -> Iterator[ExpertKey]:
        fp = self.fp
        n = fp.fk.cached_keys(fp.ki, fp.gi, self.g, fp.keybuf)
        J, keys = fp.J, fp.keys
        return iter([keys[k // J][k % J] for k in fp.keybuf[:n].tolist()])


class LiveCands(LiveEntries):
    """``ExpertCache._cands`` of one device while the kernel runs: its resident, unpinned,
    unprotected entries (what a policy's victim pricing reads), from the arrays."""

    def _k(self, key: object) -> int:
        k = super()._k(key)
        if k < 0:
            return -1
        ki = self.fp.kim
        ok = ki[k, K_STATE] == 2 and ki[k, K_PINS] == 0 and ki[k, K_PROT] == 0
        return k if ok else -1

    def __len__(self) -> int:
        return self.fp.cand_arrays[self.g].refresh().n

    def __iter__(self) -> Iterator[ExpertKey]:
        fp = self.fp
        n = fp.fk.cached_cands(fp.ki, fp.gi, self.g, fp.keybuf)
        J, keys = fp.J, fp.keys
        return iter([keys[k // J][k % J] for k in fp.keybuf[:n].tolist()])

    def values(self) -> list[CacheEntry]:  # type: ignore[override]
        fp = self.fp
        n = fp.fk.cached_cands(fp.ki, fp.gi, self.g, fp.keybuf)
        live, entry = fp._live, fp.entry
        return [live.get(k) or entry(k) for k in fp.keybuf[:n].tolist()]


class LiveEntry(CacheEntry):
    """A cache entry whose fields are read from the kernel's arrays (one per key, made at
    its first read): what a hook or the policy's scorer sees of an entry on this path.
    Reads go through memoryviews of the arrays (a Python int or float per read)."""

    __slots__ = ("_i", "_f", "_k")

    def __init__(self, fp: PrefetchPath, k: int, key: ExpertKey) -> None:  # noqa: D107
        self._i, self._f, self._k = fp.kim, fp.kfm, k
        self.key = key  # CacheEntry's own slot: a key never changes

    state = property(lambda self: STATES[self._i[self._k, K_STATE]])  # type: ignore[assignment]
    loaded_at = property(lambda self: self._f[self._k, KF_LOADED])  # type: ignore[assignment]
    last_used = property(lambda self: self._f[self._k, KF_LAST])  # type: ignore[assignment]
    uses = property(lambda self: self._i[self._k, K_USES])  # type: ignore[assignment]
    pins = property(lambda self: self._i[self._k, K_PINS])  # type: ignore[assignment]
    protected = property(lambda self: bool(self._i[self._k, K_PROT]))  # type: ignore[assignment]
    by_prefetch = property(lambda self: bool(self._i[self._k, K_BYPF]))  # type: ignore[assignment]
    prefetch_used = property(lambda self: bool(self._i[self._k, K_PFUSED]))  # type: ignore[assignment]


def live_counters(fp: PrefetchPath, g: int) -> Any:
    """``ExpertCache.counters`` of one device while the kernel runs: each field read from
    the kernel's arrays (``as_dict`` and ``add`` as on :class:`CacheCounters`)."""
    c0 = fp.fk.G_C0
    gim = fp.gim

    def field(i: int) -> property:
        return property(lambda self: gim[g, c0 + i])

    ns = {name: field(i) for i, name in enumerate(COUNTERS)}
    ns["as_dict"] = lambda self: {n: getattr(self, n) for n in COUNTERS}
    ns["add"] = lambda self, other: CacheCounters(**self.as_dict()).add(other)
    return type("LiveCounters", (), ns)()


class FrozenEntry(LiveEntry):
    """A :class:`LiveEntry` whose key has left its cache: its fields as they were then
    (what the Python cache's dropped entry object keeps), in CacheEntry's own slots."""

    __slots__ = ()


for _name in (
    "state", "loaded_at", "last_used", "uses", "pins", "protected", "by_prefetch",
    "prefetch_used",
):  # fmt: skip
    setattr(FrozenEntry, _name, CacheEntry.__dict__[_name])  # the slot, not LiveEntry's property


def freeze(e: LiveEntry, row: list[int], floats: list[float]) -> None:
    """Make ``e`` a :class:`FrozenEntry` with the fields the kernel's log noted when its
    key left (``row``: sim.fastkernel_prefetch's M_* columns; ``floats``: last_used,
    loaded_at)."""
    e.__class__ = FrozenEntry
    _, _, st, uses, pins, prot, bypf, pfused = row
    e.state = STATES[st]
    e.uses, e.pins = uses, pins
    e.protected, e.by_prefetch, e.prefetch_used = bool(prot), bool(bypf), bool(pfused)
    e.last_used, e.loaded_at = floats


class _CandEntries:
    """``CandidateArrays.entries`` of :class:`LiveCandidateArrays`: slot -> the entry."""

    __slots__ = ("fp", "keys", "n")

    def __init__(self, fp: PrefetchPath, keys: np.ndarray, n: int) -> None:
        self.fp, self.keys, self.n = fp, keys, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> CacheEntry:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.fp.entry(int(self.keys[i]))


class LiveCandidateArrays:
    """``ExpertCache.candidate_arrays()`` of one device while the kernel runs (a
    :class:`policies.cache_victims.CandidateArrays` in what a policy reads: ``layers``,
    ``experts``, ``last_used``, ``n``, ``entries``, ``slot``, ``puts``): :meth:`refresh`,
    which the path puts in the method's place, fills them from the kernel's arrays at
    the call (the candidates in recency order) and counts a put, so a ranking kept from
    an earlier call is never reused."""

    def __init__(self, fp: PrefetchPath, g: int, cap: int, src: LiveCands) -> None:
        self.fp, self.g = fp, g
        self.keys = np.zeros(cap, np.int64)
        self.layers = np.zeros(cap, np.int64)
        self.experts = np.zeros(cap, np.int64)
        self.last_used = np.zeros(cap, np.float64)
        self.n = 0
        self.puts = 0
        self.src = src  # the cache's _cands (ExpertCache.candidate_arrays' check)
        self.entries = _CandEntries(fp, self.keys, 0)
        # G_PUTS and G_CLOST at the last fill (-1: none yet; the counts start at 0)
        self._puts = self._lost = -1
        self._c_puts, self._c_lost = fp.fk.G_PUTS, fp.fk.G_CLOST

    def refresh(self) -> LiveCandidateArrays:
        """The device's candidates now (ExpertCache.candidate_arrays' contract): filled
        again unless none was added, refreshed or lost since the last fill (the kernel's
        counts of those, per GPU)."""
        fp = self.fp
        gim, g = fp.gim, self.g
        puts, lost = gim[g, self._c_puts], gim[g, self._c_lost]
        if puts == self._puts and lost == self._lost:
            return self
        self._puts, self._lost = puts, lost
        self.n = n = int(
            fp.fk.fill_cands(
                fp.ki, fp.kf, fp.gi, self.g, self.keys, self.layers, self.experts,
                self.last_used, fp.J,
            )
        )  # fmt: skip
        self.puts += 1
        self.entries = _CandEntries(fp, self.keys, n)
        return self

    @property
    def slot(self) -> dict[ExpertKey, int]:
        fp = self.fp
        J, keys = fp.J, fp.keys
        return {keys[k // J][k % J]: i for i, k in enumerate(self.keys[: self.n].tolist())}


class LiveCache(ExpertCache):
    """An :class:`ExpertCache` while the kernel runs (the path sets it as the cache's
    class, and back after): its ``_arr``, the candidate arrays the cache keeps and a
    policy may read directly, is the device's :class:`LiveCandidateArrays`, filled at
    the read when a candidate changed. The cache's own upkeep of ``_arr`` does not run on
    this path (its methods are not called), so a write is ignored."""

    @property  # type: ignore[override]
    def _arr(self) -> LiveCandidateArrays:
        return self.__dict__["_live_arr"].refresh()

    @_arr.setter
    def _arr(self, value: object) -> None:
        pass


def residency_of(fp: PrefetchPath) -> Callable[[], Residency]:
    """The view's ``residency`` while the kernel runs: read-only views of the kernel's
    own arrays (its K_STATE column per flat key and G_COUNT / G_CAP per GPU), current at
    every hook (the kernel writes them in place; they are never reallocated). Made
    once: each call hands out the same object."""
    st = fp.ki[:, K_STATE]
    cn = fp.gi[:, G_COUNT]
    cp = fp.gi[:, fp.fk.G_CAP]
    for a in (st, cn, cp):
        a.flags.writeable = False  # a view of its own: the kernel's arrays stay writable
    res = Residency(st, cn, cp)
    return lambda: res
