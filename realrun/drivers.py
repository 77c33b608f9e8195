"""Policy drivers: deliver observe events to a policy and hand its decisions to the executor.

:class:`SyncDriver` calls the policy on the compute thread and ``decide_prefetch()`` after
every observe call (the contract in policies/base.py). :class:`AsyncDriver` is for
policies with ``async_search`` (fMoE): events go through the shared bounded-queue
:class:`policies.async_runner.AsyncPolicyRunner` to a searcher thread, and the compute
thread applies the orders it produced at its next hook (``pump``). A full queue blocks the
compute thread (back-pressure; nothing is dropped).
"""

from __future__ import annotations

from collections.abc import Callable

from policies.async_runner import AsyncPolicyRunner, Event, dispatch
from policies.base import Policy, PrefetchDecision

Apply = Callable[[PrefetchDecision], None]


class SyncDriver:
    """Observe and decide on the caller's thread."""

    def __init__(self, policy: Policy, apply: Apply) -> None:
        self.policy = policy
        self._apply = apply

    def observe(self, ev: Event) -> None:
        dispatch(self.policy, ev)
        dec = self.policy.decide_prefetch()
        if dec:
            self._apply(dec)

    def pump(self) -> None:
        """Nothing is produced off-thread."""

    def flush(self) -> None:
        """Nothing is pending."""

    def close(self) -> None:
        """No thread to stop."""


class AsyncDriver:
    """Observe on a searcher thread; apply its decisions on the compute thread."""

    def __init__(self, policy: Policy, apply: Apply, maxsize: int = 256) -> None:
        self.policy = policy
        self._apply = apply
        self.runner = AsyncPolicyRunner(policy, maxsize=maxsize, on_full="block").start()

    def observe(self, ev: Event) -> None:
        self.runner.submit(ev)
        self.pump()

    def pump(self) -> None:
        dec = self.runner.drain_orders()
        if dec:
            self._apply(dec)

    def flush(self) -> None:
        """Wait until the searcher handled every event, then apply what it decided."""
        self.runner.flush()
        self.pump()

    def close(self) -> None:
        self.runner.close()


def make_driver(policy: Policy, apply: Apply) -> SyncDriver | AsyncDriver:
    """The driver a policy asks for (``async_search``)."""
    return AsyncDriver(policy, apply) if policy.async_search else SyncDriver(policy, apply)
