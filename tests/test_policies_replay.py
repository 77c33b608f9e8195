"""The timing-free replay driver: protocol, batching, waves, late orders, results, bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from policies.base import GateOutput, IterationEnd, IterationStart, Policy, RequestArrival
from policies.cache import ExpertKey
from policies.lru import LRU
from policies.replay import replay
from specs.errors import InputError
from specs.model_spec import ModelSpec
from tests.strategies import random_workload, small_spec
from traces.types import Request, Routing, Workload


def hand_request(
    spec: ModelSpec,
    ids: list,
    *,
    rid: str = "r0",
    prompt_len: int = 1,
    arrival_s: float = 0.0,
    lookahead: np.ndarray | None = None,
) -> Request:
    """A request whose routing is ``ids`` [T][L][K]; output_len follows from T and prompt_len."""
    arr = np.asarray(ids, dtype=np.int16).reshape(-1, spec.num_moe_layers, spec.top_k)
    T = arr.shape[0]
    w = np.full(arr.shape, 1.0 / spec.top_k, dtype=np.float32)
    return Request(
        request_id=rid,
        arrival_s=arrival_s,
        prompt_len=prompt_len,
        output_len=T - prompt_len + 1,
        routing=Routing(topk_ids=arr, topk_weights=w, lookahead=lookahead),
    )


def hand_workload(spec: ModelSpec, *requests: Request) -> Workload:
    return Workload(spec, list(requests), {"source": "hand-made test trace"})


class Recorder(Policy):
    """Records every hook call; orders what the test scripts in ``script``."""

    name = "recorder"

    def __init__(self, script: dict[tuple[str, int], list[tuple[int, int]]] | None = None) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.script = script or {}

    def on_request_arrival(self, ev: RequestArrival) -> None:
        self.calls.append(("arrival", ev.request_id))

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.calls.append(
            (
                "start",
                ev.iteration,
                ev.request_ids,
                tuple(ev.positions.tolist()),
                bool(ev.prefill.all()),
            )
        )
        for key in self.script.get(("start", ev.iteration), []):
            self.prefetch(*key, 1.0)

    def on_gate(self, ev: GateOutput) -> None:
        self.calls.append(("gate", ev.iteration, ev.layer, ev.topk_ids.shape[0]))
        for key in self.script.get(("gate", ev.layer), []):
            self.prefetch(*key, 1.0)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self.calls.append(("used", key, tokens))

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self.calls.append(("loaded", key, by_prefetch))

    def on_iteration_end(self, ev: IterationEnd) -> None:
        self.calls.append(("end", ev.iteration, ev.request_ids, ev.finished))


def test_observe_order_and_batching() -> None:
    """Static batches in arrival order: arrivals, a prefill of all prompt rows, then decodes."""
    spec = small_spec(layers=2, experts=4, top_k=1)
    a = hand_request(
        spec, [[0, 1], [2, 3], [0, 1]], rid="a", prompt_len=2, arrival_s=1.0
    )  # 2 iterations
    b = hand_request(spec, [[1, 2]], rid="b", prompt_len=1, arrival_s=0.0)  # 1 iteration
    pol = Recorder()
    res = replay(hand_workload(spec, a, b), pol, capacity_experts=8, batch_size=2)
    kinds = [c[0] for c in pol.calls]
    assert kinds[:3] == ["arrival", "arrival", "start"]
    assert pol.calls[0] == ("arrival", "b") and pol.calls[1] == ("arrival", "a")  # arrival order
    # prefill: b's prompt row and a's two prompt rows
    assert pol.calls[2] == ("start", 0, ("b", "a", "a"), (0, 0, 1), True)
    gates = [c for c in pol.calls if c[0] == "gate"]
    assert [(g[1], g[2], g[3]) for g in gates] == [(0, 0, 3), (0, 1, 3), (1, 0, 1), (1, 1, 1)]
    ends = [c for c in pol.calls if c[0] == "end"]
    assert ends == [("end", 0, ("b", "a"), ("b",)), ("end", 1, ("a",), ("a",))]
    # every gate is followed by its layer's uses before the next gate
    first_gate1 = pol.calls.index(gates[1])
    used_layer0 = [c for c in pol.calls[:first_gate1] if c[0] == "used"]
    assert {c[1] for c in used_layer0} == {(0, 0), (0, 1), (0, 2)}
    assert res.iterations == 2 and res.layer_steps == 4


def test_counts_and_hits_on_a_known_sequence() -> None:
    """LRU with room for everything: only first uses miss."""
    spec = small_spec(layers=1, experts=4, top_k=1)
    req = hand_request(spec, [[0], [1], [0], [1], [2]])
    res = replay(hand_workload(spec, req), LRU(), capacity_experts=4)
    assert res.counters["demands"] == 5
    assert res.counters["hits"] == 2 and res.counters["misses"] == 3
    assert res.counters["bytes_loaded"] == 3 * spec.expert_bytes
    assert res.hit_rate == pytest.approx(2 / 5)
    assert res.prefetch_accuracy == 0.0
    assert res.per_request["r0"].demands == 5 and res.per_request["r0"].hits == 2


def test_waves_when_a_layer_needs_more_than_capacity() -> None:
    """A prefill needing 4 distinct experts with 2 slots runs in 2 waves, never overfilling."""
    spec = small_spec(layers=1, experts=4, top_k=2)
    req = hand_request(spec, [[0, 1], [2, 3], [0, 2]], prompt_len=3)
    pol = Recorder()
    res = replay(hand_workload(spec, req), pol, capacity_experts=2)
    assert res.extra_waves == 1
    assert res.counters["demands"] == 4 and res.counters["misses"] == 4
    used = [c[1] for c in pol.calls if c[0] == "used"]
    assert used == [(0, 0), (0, 1), (0, 2), (0, 3)]  # ascending id, wave by wave
    tokens = {c[1]: c[2] for c in pol.calls if c[0] == "used"}
    assert tokens == {(0, 0): 2, (0, 1): 1, (0, 2): 2, (0, 3): 1}


def test_prefetch_lands_before_the_gate_and_counts_as_used() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    req = hand_request(spec, [[0, 3]])
    pol = Recorder(script={("gate", 0): [(1, 3)]})
    res = replay(hand_workload(spec, req), pol, capacity_experts=4)
    assert ("loaded", (1, 3), True) in pol.calls
    assert res.counters["hits"] == 1 and res.counters["prefetches_used"] == 1
    assert res.prefetch_accuracy == 1.0


def test_late_order_cannot_serve_its_own_layer() -> None:
    """After a layer's gate, an order for one of its routed experts waits for the layer to
    compute (the demand load goes first); an order for an unrouted expert lands at once."""
    spec = small_spec(layers=2, experts=4, top_k=1)
    req = hand_request(spec, [[1, 0], [2, 0]], prompt_len=2)  # layer 0 routes experts 1 and 2
    pol = Recorder(script={("gate", 0): [(0, 2), (0, 3)]})
    res = replay(hand_workload(spec, req), pol, capacity_experts=8)
    assert res.prefetches_deferred == 1
    assert res.counters["hits"] == 0  # (0, 2) was still a miss
    assert res.counters["prefetches_issued"] == 1  # (0, 3); (0, 2) was cached by then
    first_use = next(i for i, c in enumerate(pol.calls) if c[0] == "used")
    assert pol.calls.index(("loaded", (0, 3), True)) < first_use
    assert ("loaded", (0, 2), False) in pol.calls


def test_prefetch_dropped_when_every_slot_is_pinned() -> None:
    """A prefetch issued while the only slot holds a pinned expert is dropped."""
    spec = small_spec(layers=2, experts=4, top_k=1)
    req = hand_request(spec, [[0, 1]])

    class OrderOnLoad(Recorder):
        def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
            super().on_load_finished(key, by_prefetch, now)
            if key == (0, 0):
                self.prefetch(1, 1, 1.0)

    res = replay(hand_workload(spec, req), OrderOnLoad(), capacity_experts=1)
    assert res.prefetches_dropped == 1
    assert res.counters["misses"] == 2


def test_per_request_hits_add_up_with_batch_size_one() -> None:
    spec = small_spec(layers=3, experts=6, top_k=2)
    wl = random_workload(spec, num_requests=4, seed=3)
    res = replay(wl, LRU(), capacity_experts=7)
    assert sum(h.demands for h in res.per_request.values()) == res.counters["demands"]
    assert sum(h.hits for h in res.per_request.values()) == res.counters["hits"]
    d = res.as_dict()
    assert d["per_request"]["r0"]["demands"] == res.per_request["r0"].demands
    assert "decisions" not in d and d["layer_steps_per_s"] > 0


def test_cache_bytes_and_devices_split_the_budget() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    wl = random_workload(spec, num_requests=2, seed=1)
    res = replay(wl, LRU(), cache_bytes=5 * spec.expert_bytes + 7, num_devices=2)
    assert sum(res.capacities) == 5 and len(res.capacities) == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capacity_experts": 1}, "below top-K"),
        ({"capacity_experts": 3, "cache_bytes": 100}, "not both"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_devices": 0}, "num_devices"),
        ({"prefetch_distance": 0}, "prefetch_distance"),
        ({"capacity_experts": 2, "num_devices": 3}, "no slot"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    spec = small_spec(layers=2, experts=4, top_k=2)
    with pytest.raises(InputError, match=match):
        replay(random_workload(spec, num_requests=1), LRU(), **kwargs)


def test_order_for_a_non_existent_expert_is_an_input_error() -> None:
    spec = small_spec(layers=2, experts=4, top_k=1)
    pol = Recorder(script={("gate", 0): [(1, 9)]})
    with pytest.raises(InputError, match=r"non-existent expert \(layer 1, expert 9\)"):
        replay(hand_workload(spec, hand_request(spec, [[0, 1]])), pol, capacity_experts=4)
