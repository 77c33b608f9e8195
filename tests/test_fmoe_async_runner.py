"""AsyncPolicyRunner: a searcher thread fed by a bounded queue (fMoE step 7)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from policies.async_runner import AsyncPolicyRunner, ExpertUsed, LoadFinished, dispatch
from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    RequestArrival,
)
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from tests.strategies import random_workload, small_spec


def _events(wl) -> list:
    """The event stream an executor publishes for a workload played request by request."""
    out: list = []
    it = 0
    for req in wl.requests:
        r = req.routing
        out.append(RequestArrival(req.request_id, req.prompt_len))
        for i in range(req.num_iterations):
            rows = req.iteration_rows(i)
            B = rows.stop - rows.start
            rids = (req.request_id,) * B
            out.append(
                IterationStart(
                    it,
                    rids,
                    np.arange(rows.start, rows.stop),
                    np.full(B, i == 0),
                    r.embeddings[rows],
                )
            )
            for layer in range(wl.spec.num_moe_layers):
                out.append(
                    GateOutput(
                        it,
                        layer,
                        r.topk_ids[rows, layer],
                        r.topk_weights[rows, layer],
                        r.gate_probs[rows, layer],
                    )
                )
                for j in np.unique(r.topk_ids[rows, layer]):
                    out.append(ExpertUsed((layer, int(j)), B, float(it)))
            out.append(IterationEnd(it, rids))
            it += 1
    return out


def _bound_fmoe(spec) -> FmoePolicy:
    pol = FmoePolicy(store_capacity=8, prefetch_distance=1)
    pol.bind(
        PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [ExpertCache(64, 1)])
    )
    return pol


def test_runner_gives_the_orders_of_direct_calls():
    spec = small_spec(layers=3, experts=6, top_k=2)
    events = _events(random_workload(spec, num_requests=5, seed=2))
    direct = _bound_fmoe(spec)
    expected = []
    for ev in events:
        dispatch(direct, ev)
        expected.extend(direct.decide_prefetch().enqueue)
    threaded = _bound_fmoe(spec)
    got = []
    with AsyncPolicyRunner(threaded, maxsize=4) as runner:
        for n, ev in enumerate(events):
            assert runner.submit(ev)
            if n % 7 == 0:
                got.extend(runner.drain_orders().enqueue)
        runner.flush()
        got.extend(runner.drain_orders().enqueue)
    assert got == expected and len(expected) > 0
    assert threaded.store.size == direct.store.size


class _Slow(Policy):
    """Records events; blocks in on_iteration_start until released."""

    name = "test-slow"

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.seen: list[tuple[str, int]] = []

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.entered.set()
        self.release.wait(5)
        self.seen.append(("start", ev.iteration))

    def on_gate(self, ev: GateOutput) -> None:
        if ev.layer < 0:
            raise RuntimeError("bad layer in test")
        self.seen.append(("gate", ev.layer))
        self.prefetch(ev.layer + 1, 0, 1.0)

    def on_load_finished(self, key, by_prefetch, now) -> None:
        self.seen.append(("load", key[1]))


def _start(it: int) -> IterationStart:
    return IterationStart(it, ("a",), np.zeros(1, int), np.zeros(1, bool))


def _gate(it: int, layer: int) -> GateOutput:
    return GateOutput(it, layer, np.zeros((1, 1), int), np.ones((1, 1), np.float32))


def test_drop_mode_drops_the_rest_of_an_iteration_once_a_gate_is_dropped():
    pol = _Slow()
    with AsyncPolicyRunner(pol, maxsize=1, on_full="drop") as runner:
        runner.submit(_start(0))
        assert pol.entered.wait(5)  # the searcher is busy with the start; the queue is empty
        assert runner.submit(_gate(0, 0))
        assert not runner.submit(_gate(0, 1))  # queue full
        assert not runner.submit(LoadFinished((0, 7), True))  # notifications drop too
        pol.release.set()
        runner.flush()
        assert not runner.submit(_gate(0, 2))  # room now, but layer 1 is missing: keep the hole out
        runner.submit(IterationEnd(0, ("a",)))
        runner.submit(_start(1))
        runner.flush()
        assert runner.submit(_gate(1, 0))  # a new iteration is accepted again
        runner.flush()
        assert runner.dropped == 3
        assert [o.layer for o in runner.drain_orders().enqueue] == [1, 1]
    assert pol.seen == [("start", 0), ("gate", 0), ("start", 1), ("gate", 0)]


def test_block_mode_applies_back_pressure():
    pol = _Slow()
    runner = AsyncPolicyRunner(pol, maxsize=1).start()
    runner.submit(_start(0))
    assert pol.entered.wait(5)
    runner.submit(_gate(0, 0))  # fills the queue
    producer = threading.Thread(target=runner.submit, args=(_gate(0, 1),))
    producer.start()
    producer.join(0.2)
    assert producer.is_alive()  # waiting for room
    pol.release.set()
    producer.join(5)
    assert not producer.is_alive()
    runner.close()
    assert pol.seen == [("start", 0), ("gate", 0), ("gate", 1)] and runner.dropped == 0


def test_policy_errors_surface_on_the_producer_and_stop_dispatch():
    pol = _Slow()
    pol.release.set()
    runner = AsyncPolicyRunner(pol, maxsize=4).start()
    runner.submit(_gate(0, -1))
    with pytest.raises(RuntimeError, match="bad layer"):
        runner.flush()
    runner.submit(_gate(0, 3))
    runner.close()
    assert ("gate", 3) not in pol.seen


def test_misuse_is_reported():
    with pytest.raises(ValueError):
        AsyncPolicyRunner(_Slow(), maxsize=0)
    with pytest.raises(ValueError):
        AsyncPolicyRunner(_Slow(), on_full="spill")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="start"):
        AsyncPolicyRunner(_Slow()).submit(_gate(0, 0))
    with pytest.raises(TypeError):
        dispatch(_Slow(), object())  # type: ignore[arg-type]


def test_orders_come_back_with_the_tag_of_the_event_they_answer():
    """An executor tags each event with its clock (the gate sequence number): orders keep
    the tag of the event after which the policy made them, however late they are drained."""
    pol = _Slow()
    pol.release.set()
    with AsyncPolicyRunner(pol) as runner:
        runner.submit(_start(0), tag=4)  # no order
        runner.submit(_gate(0, 0), tag=5)
        runner.submit(_gate(0, 1), tag=6)
        runner.submit(_gate(0, 2), tag=6)  # same tag: one group
        runner.flush()
        got = [(tag, [o.layer for o in dec.enqueue]) for tag, dec in runner.drain_tagged()]
        assert got == [(5, [1]), (6, [2, 3])]
        assert not runner.drain_orders()
        runner.submit(_gate(1, 0), tag=9)
        runner.flush()
        assert [o.layer for o in runner.drain_orders().enqueue] == [1]  # merged form


def test_deliver_hands_each_decision_over_on_the_searcher_thread():
    """With ``deliver``, each search's orders go to it at once, with their event's tag, on
    the searcher thread; nothing is left to drain; an error it raises surfaces."""
    pol = _Slow()
    pol.release.set()
    got: list[tuple[object, list[int], str]] = []

    def deliver(tag: object, dec) -> None:  # noqa: ANN001
        got.append((tag, [o.layer for o in dec.enqueue], threading.current_thread().name))

    with AsyncPolicyRunner(pol, deliver=deliver) as runner:
        runner.submit(_start(0), tag=4)  # no order: nothing delivered
        runner.submit(_gate(0, 0), tag=5)
        runner.submit(_gate(0, 1), tag=6)
        runner.flush()
        assert not runner.drain_tagged()
    assert [(t, layers) for t, layers, _ in got] == [(5, [1]), (6, [2])]
    assert {name for *_, name in got} == {f"policy-{pol.name}"}

    def fail(tag: object, dec) -> None:  # noqa: ANN001
        raise RuntimeError("apply failed")

    runner = AsyncPolicyRunner(pol, deliver=fail).start()
    runner.submit(_gate(1, 0), tag=1)
    with pytest.raises(RuntimeError, match="apply failed"):
        runner.flush()
    runner.close()
