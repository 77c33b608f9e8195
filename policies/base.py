"""The Policy interface: one class drives both the simulator and the real executor.

The executor (simulator or real) owns time, the transfer queue and one ExpertCache per
device; a policy only observes and decides, as in vLLM's scheduler interface:

observe (the executor calls these, in this order per iteration)
    on_request_arrival -> on_iteration_start -> for each MoE layer l:
    on_gate_now(l) -> on_gate(l) -> on_expert_used(...)* -> ... -> on_iteration_end.
    on_load_finished whenever a copy lands.
decide
    decide_prefetch(): drains the prefetch orders (to enqueue) and cancellations the
    policy produced since the last call. The executor calls it after every observe call.
    Demand loads (misses) are the executor's job and always go before prefetches.
    eviction_score(entry): lower is evicted first; the cache never evicts pinned keys
    and evicts protected (predicted, not yet used) ones only when nothing else can go.
    The cache asks through eviction_scores(entries), which a policy may override to
    score many entries at once (same values, faster).

Contracts an executor guarantees: layers are MoE-layer indices 0..L-1 and arrive in
order within an iteration; arrays are numpy; ``now`` is seconds on the executor's clock
(simulated or wall). Contracts a policy guarantees: every order names a valid
(layer, expert) and a finite priority (higher goes first); the same seed and inputs give
the same decisions.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from policies.cache import (
    CacheEntry,
    ExpertCache,
    ExpertKey,
    KernelEviction,
    by_recency,
    lru_score,
    lru_scores,
)
from policies.cache_victims import KernelVictims
from policies.compiled_gate import CompiledGate
from policies.placement import Placement
from specs.errors import InputError
from specs.model_spec import ModelSpec


# -- events (observe) ---------------------------------------------------------------------
@dataclass(frozen=True)
class RequestArrival:
    """A request entered the system. ``prompt_embedding`` [H] when known (e.g. mean token embedding)."""

    request_id: str
    prompt_len: int
    prompt_text: str | None = None
    prompt_embedding: np.ndarray | None = None


@dataclass(frozen=True)
class IterationGates:
    """Every MoE layer's gate output of one iteration, known before it runs.

    Only an executor replaying a trace (the simulator) has them; it passes them to a
    policy that sets ``precomputes_from_gates``. Arrays: ``topk_ids``/``topk_weights``
    [B, L, K], ``probs`` [B, L, J] or None, row b as in :class:`IterationStart`.
    """

    topk_ids: np.ndarray
    topk_weights: np.ndarray
    probs: np.ndarray | None = None


@dataclass(frozen=True)
class IterationStart:
    """A forward pass starts. One entry per token row of the batch.

    ``request_ids[b]`` and ``positions[b]`` name row b's request and its token index in
    that request's routing; ``prefill[b]`` tells prefill rows from decode rows;
    ``embeddings`` [B, H] are the embedding layer's outputs (None when unknown);
    ``gates`` the iteration's gate outputs of all layers, for ``precomputes_from_gates``
    policies when the executor knows them in advance (else None).
    """

    iteration: int
    request_ids: tuple[str, ...]
    positions: np.ndarray
    prefill: np.ndarray
    embeddings: np.ndarray | None = None
    now: float = 0.0
    gates: IterationGates | None = None


class GateOutput(NamedTuple):
    """Layer ``layer``'s router ran for the batch's B rows.

    ``topk_ids``/``topk_weights`` [B, K] are the experts actually chosen; ``probs`` [B, J]
    the full probability rows (None when the source lacks them); ``lookahead`` [B, J] the
    next layer's gate on this layer's hidden state (None unless the executor has it).
    Immutable; a NamedTuple rather than a frozen dataclass because the executor builds
    one per MoE layer step (a third of the cost).
    """

    iteration: int
    layer: int
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    probs: np.ndarray | None = None
    lookahead: np.ndarray | None = None
    now: float = 0.0


@dataclass(frozen=True)
class IterationEnd:
    """A forward pass finished; ``finished`` lists requests that produced their last token."""

    iteration: int
    request_ids: tuple[str, ...]
    finished: tuple[str, ...] = ()
    now: float = 0.0


# -- decisions ----------------------------------------------------------------------------
class PrefetchOrder(NamedTuple):
    """Load (layer, expert) ahead of use; higher priority goes first.

    Immutable and hashable; a NamedTuple rather than a frozen dataclass because policies
    build one per order (about half the cost)."""

    layer: int
    expert: int
    priority: float

    @property
    def key(self) -> ExpertKey:
        return (self.layer, self.expert)


@dataclass
class PrefetchDecision:
    enqueue: list[PrefetchOrder] = field(default_factory=list)
    cancel: list[ExpertKey] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.enqueue or self.cancel)


class MissAction(StrEnum):
    """How a demanded expert that is not resident is served (one action per demand).

    ``FETCH`` copies it to its GPU (exact; the default); ``CPU`` computes it on the host
    CPU from its host copy, moving only the rows' activations (exact); ``LOWBIT`` fetches
    a low-bit copy (lossy); ``SKIP`` drops it and renormalises the other weights (lossy).
    Lossy actions run only where the user opted in; every result counts each action.
    """

    FETCH = "fetch"
    CPU = "cpu"
    LOWBIT = "lowbit"
    SKIP = "skip"

    @property
    def lossy(self) -> bool:
        return self in (MissAction.LOWBIT, MissAction.SKIP)


class LinkState(NamedTuple):
    """A host->GPU link as the executor sees it now: ``queued_s`` seconds of copies ahead
    of a new one, ``bandwidth_Bps`` its bandwidth, ``copy_s`` one expert copy's time."""

    queued_s: float
    bandwidth_Bps: float
    copy_s: float


class CpuState(NamedTuple):
    """The host CPU's expert work as the executor sees it now: ``queued_s`` seconds of
    expert work ahead of a new one; one expert FFN on n rows takes about
    ``expert_s_fixed + n * expert_s_per_token`` (activations' transfer included);
    ``copy_slowdown``: the share of a busy CPU's expert work lost while one host->GPU copy
    runs (the host memory bandwidth the copy reads; 0 where the executor does not model
    it)."""

    queued_s: float
    expert_s_per_token: float
    expert_s_fixed: float
    copy_slowdown: float = 0.0


@dataclass(frozen=True)
class Residency:
    """Cache membership as arrays, read only, kept current by the executor between the
    policy's hooks (:meth:`ExecutorView.residency`): ``state`` [layers x experts] int64,
    row ``layer * J + expert`` (0 absent, 1 loading, 2 resident on the key's own GPU:
    ``state[k] != 0`` is ``key in ctx.cache_of(key).entries``); ``counts`` / ``caps`` per
    GPU its cache's entries and slots. Views of the executor's own arrays (no Python
    objects in them): a hook reads them, never writes them, and fetches them again
    at its next call (the executor may hand out others, or none, later)."""

    state: np.ndarray
    counts: np.ndarray
    caps: np.ndarray


class ExecutorView(Protocol):
    """What an executor tells a policy so it can decide well (deadline-aware prefetch,
    hybrid miss actions). Times are seconds on the executor's clock; estimates, not
    promises. An executor that cannot answer leaves ``PolicyContext.executor`` None."""

    def link_state(self, device: int) -> LinkState:
        """The link into GPU ``device`` now."""
        ...

    def layer_time_s(self, tokens: int) -> float:
        """Expected time of one MoE layer step (dense part plus resident experts) at
        ``tokens`` rows; a policy's clock for "how many layers until this lands"."""
        ...

    def cpu_state(self) -> CpuState | None:
        """The host CPU's expert queue, or None when this executor cannot compute
        experts on the CPU (no host figures in the profile)."""
        ...

    def residency(self) -> Residency | None:
        """The caches' membership as arrays (:class:`Residency`), where this executor
        keeps it in arrays (the simulator's prefetching compiled path); None elsewhere,
        and the policy reads ``ctx.caches`` as before. Optional: a view without this
        method answers None (read it with ``getattr(view, "residency", None)``)."""
        ...


@dataclass
class PolicyContext:
    """What an executor tells a policy when binding it. ``executor`` is a live view of
    links, CPU and layer time (None when the executor offers none). ``cache_guard`` is the
    lock an executor changes ``caches`` under on threads other than the one that calls
    the policy's hooks (the real executor's copy and compute threads, while an
    ``async_search`` policy runs on its searcher thread); a hook that reads more than one
    field of a cache at once (a cache's candidate arrays, a walk over its entries) holds
    it for that read, and nothing else. None: the caches change only between hooks (the
    simulator)."""

    spec: ModelSpec
    placement: Placement
    caches: Sequence[ExpertCache]
    prefetch_distance: int | None = None
    seed: int = 0
    executor: ExecutorView | None = None
    allow_lossy: bool = False
    cache_guard: AbstractContextManager[object] | None = None

    def cache_of(self, key: ExpertKey) -> ExpertCache:
        return self.caches[self.placement.device_of(key)]

    def is_cached(self, key: ExpertKey) -> bool:
        """Resident or loading on its device."""
        return key in self.cache_of(key).entries


class PolicyOptions(BaseModel):
    """Options of a policy; subclasses add typed fields that become `--policy-opt k=v`."""

    model_config = ConfigDict(extra="forbid")


class Policy(ABC):  # noqa: B024 - abstract by intent; every hook has a safe default
    """Base class: every hook has a do-nothing default; subclasses override what they use."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[PolicyOptions]] = PolicyOptions
    reads_future: ClassVar[bool] = False
    """Reads the trace's future (oracle): simulator and replay only; the real executor refuses it."""
    wants_lookahead: ClassVar[bool] = False
    """Uses lookahead rows; the real executor computes them only for such policies."""
    async_search: ClassVar[bool] = False
    """Orders produced in on_gate / on_iteration_start need the policy's search: they
    become usable only after the profile's search latency (``gate_search_s`` /
    ``start_search_s``, by default ``policy_search_s``; the simulator delays them, the
    real executor runs the policy on a searcher thread and applies them when the search
    is done). Orders produced in :meth:`on_gate_now` never wait for it."""
    preload_all: ClassVar[bool] = False
    """Every expert resident before the run (no-offload)."""
    needs_training: ClassVar[bool] = False
    """fit() must see a training workload for the policy to predict anything."""
    precomputes_from_gates: ClassVar[bool] = False
    """Takes ``IterationStart.gates`` (when the executor has them) only to do at once the
    per-layer work it would do in each ``on_gate``: its decisions must be exactly those it
    makes without them (a speed-up for trace replay, not a look into the future)."""

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:  # -> one line naming each bad option
            raise InputError(
                f"policy {self.name!r}: bad option ({_option_errors(exc, self.Options)})"
            ) from None
        except Exception as exc:  # an Options validator raised something else
            raise InputError(
                f"policy {self.name!r}: bad option ({exc.__class__.__name__}: {_first_line(exc)})"
            ) from None
        self.ctx: PolicyContext | None = None
        self._enqueue: list[PrefetchOrder] = []
        self._cancel: list[ExpertKey] = []

    # -- lifecycle --------------------------------------------------------------------
    def bind(self, ctx: PolicyContext) -> None:
        """Attach to an executor before the run. Subclasses extend to size their state."""
        self.ctx = ctx

    def fit(self, training: Any) -> None:
        """Offline preparation from a training Workload (store fill, predictor training)."""

    def bind_future(self, workload: Any) -> None:
        """Give a future-reading policy the whole workload. Only for ``reads_future``."""
        raise InputError(f"policy {self.name!r} does not read the future")

    def metadata(self) -> dict[str, Any]:
        """Facts about this run's policy for the results (options, which embeddings, ...)."""
        return {"policy": self.name, **self.options.model_dump()}

    # -- observe ----------------------------------------------------------------------
    def on_request_arrival(self, ev: RequestArrival) -> None:
        """A request arrived."""

    def on_iteration_start(self, ev: IterationStart) -> None:
        """An iteration starts; only embeddings are known."""

    def on_gate_now(self, ev: GateOutput) -> None:
        """Layer ``ev.layer``'s gate ran: the part of the gate's work that needs no search,
        only what the executor already holds (the gate output, the lookahead rows: data on
        the GPU) and the policy's own state. Every executor calls it immediately before
        :meth:`on_gate`, with the same event object, and applies the orders it makes at
        once, after the gate's demand loads (as a synchronous policy's gate orders), even
        for an ``async_search`` policy, whose :meth:`on_gate` orders wait for the search.
        The real executor runs both on the searcher thread, this one first, and applies its
        orders before :meth:`on_gate` starts. Default: nothing (every gate order is
        :meth:`on_gate`'s)."""

    def on_gate(self, ev: GateOutput) -> None:
        """Layer ``ev.layer``'s gate ran; its experts are about to be demanded. Orders made
        here wait for the search when the policy is ``async_search`` (see
        :meth:`on_gate_now` for those that do not)."""

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        """Compute used ``key`` for ``tokens`` rows."""

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        """A copy of ``key`` landed."""

    def on_iteration_end(self, ev: IterationEnd) -> None:
        """An iteration finished all layers."""

    # -- decide -----------------------------------------------------------------------
    def prefetch(self, layer: int, expert: int, priority: float) -> None:
        """Queue an order for the next decide_prefetch (helper for subclasses)."""
        self._enqueue.append(PrefetchOrder(layer, expert, float(priority)))

    def cancel(self, layer: int, expert: int) -> None:
        """Queue a cancellation of a pending prefetch (helper for subclasses)."""
        self._cancel.append((layer, expert))

    def decide_prefetch(self) -> PrefetchDecision:
        """Drain orders and cancellations produced since the last call."""
        out = PrefetchDecision(self._enqueue, self._cancel)
        self._enqueue, self._cancel = [], []
        return out

    def miss_action(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        """How to serve ``key``, demanded for ``tokens`` rows and not resident. Default:
        fetch it (the only action before hybrid execution). An executor refuses a lossy
        answer unless ``ctx.allow_lossy`` and CPU when it has no host figures."""
        return MissAction.FETCH

    def eviction_score(self, entry: CacheEntry) -> float:
        """Lower is evicted first. Default: least recently used."""
        return lru_score(entry)

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        """``eviction_score`` of each entry; what caches call. Overrides must return the
        same values (a batch form only saves a Python call per entry)."""
        score = self.eviction_score
        return [score(e) for e in entries]

    def kernel_eviction(self) -> KernelEviction | None:
        """This policy's eviction order for the simulator's compiled path (None: the
        simulator calls the policy, its reference engine). A policy returns one only when
        its decisions are exactly that order: no prefetch, cancel or miss action, hooks
        that do nothing besides the counts the spec names. Read only from the class that
        defines it (a subclass must define its own), so overriding a hook never inherits
        a spec that no longer holds."""
        return None

    def kernel_victims(self) -> KernelVictims | None:
        """This policy's victim choice for a compiled executor's kernel
        (:class:`~policies.cache_victims.KernelVictims`; None, the default: the executor
        calls :meth:`eviction_scores`). A policy returns one only when it is exactly what
        its scorer (and ``victim_index``) would choose, side effects included."""
        return None

    def compiled_gate(self) -> CompiledGate | None:
        """This policy's gate as compiled code, called from inside a compiled executor's
        kernel instead of ``on_gate_now`` and ``on_gate``
        (:class:`~policies.compiled_gate.CompiledGate`, whose docstring is the contract;
        None, the default: the executor calls the hooks). A policy returns one only when
        its orders are exactly those the hooks would make at every gate."""
        return None


class RecencyEviction:
    """Mixin for a policy that evicts the least recently used expert, Policy's default
    ``eviction_score`` (put it before :class:`Policy` in the bases): its batch scorer is
    :func:`~policies.cache.lru_scores`, marked :func:`by_recency`, so the cache answers
    from its recency order instead of scoring every entry (same choice)."""

    @by_recency
    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        return lru_scores(entries)


def _option_errors(exc: ValidationError, options: type[BaseModel]) -> str:
    """Each failed option of ``exc`` (up to three) as "name: problem"; an unknown name
    lists the policy's options."""
    parts = []
    for err in exc.errors()[:3]:
        name = ".".join(str(x) for x in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(options.model_fields)) or "none"
            parts.append(f"unknown option {name!r}; known: {known}")
        else:
            parts.append(f"{name}: {err['msg']}, got {err.get('input')!r}")
    return "; ".join(parts)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return "; ".join(t.strip() for t in text[:3])


def validate_order(order: PrefetchOrder, spec: ModelSpec) -> None:
    """Raise InputError when an order names a non-existent expert or a bad priority."""
    if not (0 <= order.layer < spec.num_moe_layers and 0 <= order.expert < spec.num_experts):
        raise InputError(
            f"prefetch order for non-existent expert (layer {order.layer}, expert {order.expert}); "
            f"model has {spec.num_moe_layers} layers x {spec.num_experts} experts"
        )
    if not math.isfinite(order.priority):  # a Python float: math is ~10x cheaper than numpy
        raise InputError(f"prefetch order for {order.key} has non-finite priority {order.priority}")


def has_gate_now(policy: Policy) -> bool:
    """Whether ``policy`` overrides :meth:`Policy.on_gate_now` (an executor may skip the
    call, and the drain after it, otherwise)."""
    return type(policy).on_gate_now is not Policy.on_gate_now


def guarded(fn: Callable[..., Any], guard: AbstractContextManager[object]) -> Callable[..., Any]:
    """``fn`` called with ``guard`` held (a policy wraps its cache-reading steps in
    :attr:`PolicyContext.cache_guard` this way at bind, so executors without one pay
    nothing)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with guard:
            return fn(*args, **kwargs)

    return call
