"""Residency follows the simulator's prefetch semantics: a slot only when the copy starts,
stale orders dropped, preempted copies cancelled when a demand needs their slot, a
policy's cancel stopping a copy in flight; pool slots always match cache entries."""

from __future__ import annotations

import time

import torch

from policies.placement import Placement
from realrun.copy_engine import LinkEmulation
from realrun.residency import Residency
from realrun.store import RamStore
from tests.test_realrun_copy_engine import FakeExperts, GatedStore


def _residency(capacity: int, gated: bool = True, link=None, layers: int = 2, big: bool = False):
    size = {"inter": 256, "hidden": 256} if big else {}  # big: ~0.8 MB rows, 78 ms at 0.01 GB/s
    store = RamStore([FakeExperts(num_experts=4, seed=i, **size) for i in range(layers)])
    src = GatedStore(store) if gated else store
    res = Residency(
        src, store.row_bytes, Placement(layers, 4, 1), [torch.device("cpu")], [capacity], link, 4096
    )
    return res, src, store


def _consistent(res: Residency) -> None:
    d = res.devs[0]
    assert set(d.pool.slot_of) == set(d.cache.entries)
    assert d.cache.used <= d.cache.capacity


def test_an_order_takes_a_slot_only_when_its_copy_starts():
    res, gated, store = _residency(2)
    try:
        res.demand([(0, 0)])  # occupies the copy thread (reads are gated)
        assert gated.started.wait(5)
        res.order((1, 2), priority=1.0)
        assert (1, 2) not in res.devs[0].cache.entries and res.stats.orders == 1
        res.order((0, 0), priority=1.0)  # already cached (loading): skipped
        assert res.stats.skipped_cached == 1
        gated.gate.set()
        res.wait((0, 0))
        res.release([(0, 0)])
        t0 = time.perf_counter()
        while not res.devs[0].cache.is_resident((1, 2)) and time.perf_counter() - t0 < 5:
            res.take_landed()
            time.sleep(0.001)
        assert res.devs[0].cache.entries[(1, 2)].by_prefetch
        row = res.devs[0].pool.rows[res.slot((1, 2)), : store.row_bytes]
        assert torch.equal(row, store.read_row(1, 2))
        _consistent(res)
    finally:
        gated.gate.set()
        res.close()


def test_orders_go_stale_once_their_layer_has_run():
    res, gated, _ = _residency(3)
    try:
        res.demand([(0, 0)])
        assert gated.started.wait(5)
        res.order((1, 1), priority=1.0)
        res.gate(1)  # layer 1's gate runs before the order could start
        gated.gate.set()
        res.wait((0, 0))
        time.sleep(0.05)
        res.take_landed()
        assert res.stats.stale == 1 and (1, 1) not in res.devs[0].cache.entries
        c = res.devs[0].cache.counters
        assert c.prefetches_issued == 0 and c.loads == 1
        _consistent(res)
    finally:
        gated.gate.set()
        res.close()


def test_a_demand_cancels_preempted_prefetches_when_no_slot_is_free():
    res, _, store = _residency(2, gated=False, link=LinkEmulation(gbps=0.01), big=True)
    try:
        res.order((1, 0), priority=1.0)
        res.order((1, 1), priority=0.5)
        t0 = time.perf_counter()
        while res.devs[0].cache.used < 1 and time.perf_counter() - t0 < 5:
            time.sleep(0.0005)
        res.demand([(0, 0)])  # preempts the running prefetch at a chunk boundary
        eng = res.devs[0].engine
        while eng.stats.preemptions < 1 and time.perf_counter() - t0 < 5:
            time.sleep(0.0005)
        res.demand([(0, 1)])  # no free slot: the preempted copy gives its slot back
        res.wait((0, 0))
        res.wait((0, 1))
        d = res.devs[0]
        assert {(0, 0), (0, 1)} <= set(d.cache.entries) and d.cache.used == 2
        assert d.cache.counters.prefetches_cancelled >= 1
        for key in [(0, 0), (0, 1)]:
            assert torch.equal(d.pool.rows[res.slot(key), : store.row_bytes], store.read_row(*key))
        _consistent(res)
    finally:
        res.close()


def test_a_policy_cancel_stops_a_copy_in_flight_and_frees_its_slot():
    res, _, _ = _residency(2, gated=False, link=LinkEmulation(gbps=0.01), big=True)
    try:
        res.order((1, 3), priority=1.0)
        d = res.devs[0]
        t0 = time.perf_counter()
        while (1, 3) not in d.cache.entries and time.perf_counter() - t0 < 5:
            time.sleep(0.0005)
        res.cancel((1, 3))
        t0 = time.perf_counter()
        while (1, 3) in d.cache.entries and time.perf_counter() - t0 < 5:
            res.take_landed()
            time.sleep(0.001)
        assert (1, 3) not in d.cache.entries and not d.pool.slot_of
        assert d.cache.counters.prefetches_cancelled == 1 and d.engine.stats.jobs_done == 0
    finally:
        res.close()


def test_a_copy_preempted_after_its_layers_gate_does_not_resume():
    """A prefetch of layer 1 is in flight when layer 1's gate runs (nothing to cancel yet);
    layer 1's demand of another expert then preempts it. When the demand load has landed,
    the preempted copy would resume for a layer that has run: it is stopped as stale and
    its slot freed (the simulator's links drop it when it would resume, too)."""
    res, _, _ = _residency(3, gated=False, link=LinkEmulation(gbps=0.01), big=True)
    try:
        d = res.devs[0]
        res.order((1, 0), priority=1.0)
        t0 = time.perf_counter()
        while (1, 0) not in d.cache.entries and time.perf_counter() - t0 < 5:
            time.sleep(0.0005)
        res.gate(1)
        res.demand([(1, 1)])  # preempts (1, 0) at its next chunk boundary
        res.wait((1, 1))
        t0 = time.perf_counter()
        while (1, 0) in d.cache.entries and time.perf_counter() - t0 < 5:
            res.take_landed()
            time.sleep(0.001)
        assert d.engine.stats.preemptions == 1
        assert (1, 0) not in d.cache.entries and (1, 0) not in d.pool.slot_of
        assert d.cache.counters.prefetches_cancelled == 1 and res.stats.stale == 1
        assert d.engine.stats.jobs_done == 1  # the demand load only
        _consistent(res)
    finally:
        res.close()
