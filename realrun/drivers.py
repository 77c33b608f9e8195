"""Policy drivers: deliver observe events to a policy and hand its decisions to the executor.

:class:`SyncDriver` calls the policy on the compute thread and ``decide_prefetch()`` after
every observe call (the contract in policies/base.py). :class:`AsyncDriver` is for
policies with ``async_search`` (fMoE): events go through the shared bounded-queue
:class:`policies.async_runner.AsyncPolicyRunner` to a searcher thread, and the compute
thread applies the orders it produced at its next hook (``pump``). A full queue blocks the
compute thread (back-pressure; nothing is dropped).

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
    """Observe on a searcher thread; apply its decisions on the compute thread."""

    def __init__(self, policy: Policy, apply: Apply, stamp: Stamp, maxsize: int = 256) -> None:
        self.policy = policy
        self._apply = apply
        self._stamp = stamp
        self.runner = AsyncPolicyRunner(policy, maxsize=maxsize, on_full="block").start()

    def observe(self, ev: Event) -> None:
        self.runner.submit(ev, self._stamp())
        self.pump()

    def pump(self) -> None:
        for stamp, dec in self.runner.drain_tagged():
            self._apply(dec, stamp)  # type: ignore[arg-type]

    def flush(self) -> None:
        """Wait until the searcher handled every event, then apply what it decided."""
        self.runner.flush()
        self.pump()

    def close(self) -> None:
        self.runner.close()


def make_driver(policy: Policy, apply: Apply, stamp: Stamp) -> SyncDriver | AsyncDriver:
    """The driver a policy asks for (``async_search``); ``stamp()`` is read per event."""
    cls = AsyncDriver if policy.async_search else SyncDriver
    return cls(policy, apply, stamp)
