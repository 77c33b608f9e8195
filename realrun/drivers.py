"""Policy drivers: deliver observe events to a policy and hand its decisions to the executor.

:class:`SyncDriver` calls the policy on the compute thread and ``decide_prefetch()`` after
every observe call (the contract in policies/base.py). :class:`AsyncDriver` is for
policies with ``async_search`` (fMoE): events go through the shared bounded-queue
:class:`policies.async_runner.AsyncPolicyRunner` to a searcher thread, which applies the
orders of each search itself as soon as it is done (as fMoE's searcher issues its
prefetches, and as the simulator applies them ``policy_search_s`` after the event): the
copies of an iteration start's orders can then run during the first layer's dense
compute instead of waiting for the compute thread's next hook, which is that layer's gate
(their layer's gate: stale by then). So an async driver's ``apply`` must be thread-safe. A
full queue blocks the compute thread (back-pressure; nothing is dropped). At a gate the
searcher runs ``on_gate_now`` first and applies its orders (they need no search) before
it starts ``on_gate``, as the simulator applies them at the gate and ``on_gate``'s after
the search latency.

Each decision reaches the executor with the stamp (``stamp()``, the executor's gate
sequence number) read when the event it answers was observed, not when the decision is
applied: a searcher that answers late cannot make an order look newer than the gates that
ran meanwhile (the simulator stamps a delayed order when the policy is asked, too, and
drops it as stale once its layer's gate has run since).
"""

from __future__ import annotations

from collections.abc import Callable

from policies.async_runner import AsyncPolicyRunner, Event, dispatch
from policies.base import Policy, PrefetchDecision

Apply = Callable[[PrefetchDecision, int], None]
Stamp = Callable[[], int]


class SyncDriver:
    """Observe and decide on the caller's thread."""

    def __init__(self, policy: Policy, apply: Apply, stamp: Stamp) -> None:
        self.policy = policy
        self._apply = apply
        self._stamp = stamp

    def observe(self, ev: Event) -> None:
        dispatch(self.policy, ev)
        dec = self.policy.decide_prefetch()
        if dec:
            self._apply(dec, self._stamp())

    def pump(self) -> None:
        """Nothing is produced off-thread."""

    def flush(self) -> None:
        """Nothing is pending."""

    def close(self) -> None:
        """No thread to stop."""


class AsyncDriver:
    """Observe on a searcher thread, which applies its decisions (``apply`` is called on
    that thread: it must be thread-safe)."""

    def __init__(self, policy: Policy, apply: Apply, stamp: Stamp, maxsize: int = 256) -> None:
        self.policy = policy
        self._stamp = stamp
        self.runner = AsyncPolicyRunner(
            policy,
            maxsize=maxsize,
            on_full="block",
            deliver=lambda stamp, dec: apply(dec, stamp),  # type: ignore[arg-type]
        ).start()

    def observe(self, ev: Event) -> None:
        self.runner.submit(ev, self._stamp())

    def pump(self) -> None:
        """Nothing to collect (the searcher applies its orders); surfaces a searcher error."""
        self.runner.drain_tagged()

    def flush(self) -> None:
        """Wait until the searcher handled (and applied) every event."""
        self.runner.flush()

    def close(self) -> None:
        self.runner.close()


def make_driver(policy: Policy, apply: Apply, stamp: Stamp) -> SyncDriver | AsyncDriver:
    """The driver a policy asks for (``async_search``); ``stamp()`` is read per event."""
    cls = AsyncDriver if policy.async_search else SyncDriver
    return cls(policy, apply, stamp)
