"""The real executor honours the Policy interface's split of a gate's work: on_gate_now
runs before on_gate with the same event, and for an ``async_search`` policy its orders
reach the copy engine without waiting for on_gate (the search) to finish, as the
simulator applies them at the gate and on_gate's after the search latency
(tests/test_search_split.py)."""

from __future__ import annotations

import time

import pytest

from policies.base import GateOutput
from realrun.models import load
from realrun.offload import offload_model
from realrun.session import RunSession, SessionOptions
from tests.test_realrun_hooks import AsyncRecorder, Recorder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SplitRecorder(Recorder):
    """Logs on_gate_now beside the other hooks."""

    name = "test-split-recorder"

    def on_gate_now(self, ev: GateOutput) -> None:
        self._note("gate_now", ev.iteration, ev.layer)
        self.now_ev = ev

    def on_gate(self, ev: GateOutput) -> None:
        assert ev is self.now_ev  # the same event object, right after on_gate_now
        super().on_gate(ev)


class SlowSearcher(AsyncRecorder):
    """An async policy that orders layer l+1's uncached experts in on_gate_now and whose
    search (on_gate) waits until those orders have reached the copy engine (up to 10 s
    once; a run whose orders wait for the search stops waiting after the first miss)."""

    name = "test-slow-searcher"

    def bind(self, ctx):
        super().bind(ctx)
        self.session: RunSession | None = None
        self.now_orders = 0
        self.at_search: list[tuple[int, int]] = []  # (orders applied, orders made at gates)
        self.gave_up = False

    def on_gate_now(self, ev: GateOutput) -> None:
        nxt = ev.layer + 1
        if nxt < self.ctx.spec.num_moe_layers:
            for e in range(self.ctx.spec.num_experts):
                if not self.ctx.is_cached((nxt, e)):
                    self.prefetch(nxt, e, priority=1.0)
                    self.now_orders += 1

    def on_gate(self, ev: GateOutput) -> None:
        super().on_gate(ev)
        if self.session is None:
            return
        res = self.session.res
        deadline = time.monotonic() + 10.0
        while not self.gave_up and res.stats.orders < self.now_orders:
            if time.monotonic() > deadline:
                self.gave_up = True
            time.sleep(0.001)
        self.at_search.append((res.stats.orders, self.now_orders))


def _session_run(policy, new: int = 3):
    loaded = load("tiny-mixtral")
    om = offload_model(loaded, store="ram")
    ids = loaded.tokenizer.encode("What is MoE?")
    with RunSession(om, policy, SessionOptions(12)) as s:
        policy.session = s
        s.generate("req", ids, new)
        s.driver.flush()
        m = s.metrics()
    return m


def test_on_gate_now_runs_right_before_on_gate_on_the_compute_thread():
    """A synchronous policy: every gate is on_gate_now then on_gate, the same event."""
    pol = SplitRecorder()
    _session_run(pol)
    gates = [e for e in pol.log if e[0] in ("gate_now", "gate")]
    assert gates and len(gates) % 2 == 0
    for now, search in zip(gates[::2], gates[1::2], strict=True):
        assert now[0] == "gate_now" and search[0] == "gate" and now[1:] == search[1:]


def test_an_async_policys_gate_orders_without_search_do_not_wait_for_its_search():
    """Every order made in on_gate_now has reached the copy engine while the searcher is
    still inside that gate's on_gate: the search never holds them back."""
    pol = SlowSearcher()
    m = _session_run(pol)
    assert pol.now_orders > 0 and pol.at_search
    assert not pol.gave_up
    assert all(applied >= made for applied, made in pol.at_search), pol.at_search
    assert m["prefetch_orders"] == pol.now_orders
