"""Copy engine: demand loads go first, prefetches yield at chunk boundaries, the emulated
link takes latency + bytes / bandwidth, cancelled jobs never land, bytes arrive intact."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from realrun.copy_engine import CopyEngine, CopyJob, JobState, LinkEmulation
from realrun.store import ExpertStore, RamStore
from specs.errors import InputError


class FakeExperts(nn.Module):
    """The shape of a transformers fused experts module, random weights."""

    def __init__(
        self, num_experts: int = 4, inter: int = 64, hidden: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * inter, hidden, generator=g))
        self.down_proj = nn.Parameter(torch.randn(num_experts, hidden, inter, generator=g))


class GatedStore(ExpertStore):
    """A store whose reads block until released, so tests control when the thread is busy."""

    kind = "gated"

    def __init__(self, inner: RamStore) -> None:
        super().__init__(inner.layouts)
        self.inner = inner
        self.gate = threading.Event()
        self.started = threading.Event()

    def read_into(self, layer, expert, lo, hi, dst):
        self.started.set()
        self.gate.wait(5)
        self.inner.read_into(layer, expert, lo, hi, dst)


def _job(store: ExpertStore, key, demand=False, priority=0.0) -> CopyJob:
    n = store.layouts[key[0]].row_bytes
    return CopyJob(key, torch.zeros(n, dtype=torch.uint8), n, demand=demand, priority=priority)


def _store(**kw) -> RamStore:
    return RamStore([FakeExperts(**kw)])


def test_copies_are_byte_exact():
    store = _store()
    eng = CopyEngine(store, chunk_bytes=1000)  # chunks that do not divide the row
    try:
        jobs = [_job(store, (0, e), demand=e % 2 == 0) for e in range(4)]
        for j in jobs:
            eng.submit(j)
        for j in jobs:
            eng.wait(j.key)
        done = eng.poll()
        assert {j.key for j in done} == {(0, e) for e in range(4)}
        for j in jobs:
            assert torch.equal(j.dst, store.read_row(*j.key))
        assert eng.stats.bytes_copied == sum(j.nbytes for j in jobs)
    finally:
        eng.close()


def test_demand_goes_before_queued_prefetches_and_priority_orders_prefetches():
    store = GatedStore(_store())
    eng = CopyEngine(store)
    try:
        eng.submit(_job(store, (0, 0), priority=0.0))  # occupies the thread
        assert store.started.wait(5)
        eng.submit(_job(store, (0, 1), priority=1.0))
        eng.submit(_job(store, (0, 2), priority=5.0))
        eng.submit(_job(store, (0, 3), demand=True))
        store.gate.set()
        for e in range(4):
            eng.wait((0, e))
        order = [j.key[1] for j in eng.poll()]
        assert order == [0, 3, 2, 1]
    finally:
        store.gate.set()
        eng.close()


def test_running_prefetch_yields_to_a_demand_at_a_chunk_boundary_and_resumes():
    store = _store(inter=256, hidden=256)  # ~768 KiB rows
    n = store.layouts[0].row_bytes
    link = LinkEmulation(gbps=0.02)  # ~39 ms per row: the demand surely arrives mid-copy
    eng = CopyEngine(store, link=link, chunk_bytes=n // 16)
    try:
        pre = _job(store, (0, 0))
        eng.submit(pre)
        t0 = time.perf_counter()
        while pre.done_bytes == 0 and time.perf_counter() - t0 < 5:  # the prefetch is running
            time.sleep(0.0005)
        dem = _job(store, (0, 1), demand=True)
        eng.submit(dem)
        eng.wait(dem.key)
        assert pre.state is not JobState.DONE  # the demand overtook the running prefetch
        eng.wait(pre.key)
        assert [j.key for j in eng.poll()] == [dem.key, pre.key]
        assert pre.preemptions >= 1 and eng.stats.preemptions >= 1
        assert torch.equal(pre.dst, store.read_row(0, 0)) and torch.equal(
            dem.dst, store.read_row(0, 1)
        )
    finally:
        eng.close()


def test_emulated_link_takes_latency_plus_bytes_over_bandwidth():
    store = _store(inter=128, hidden=256)
    n = store.layouts[0].row_bytes
    link = LinkEmulation(gbps=0.2, latency_us=3000)
    expect = link.transfer_s(n)
    assert expect == pytest.approx(3e-3 + n / 0.2e9)
    eng = CopyEngine(store, link=link, chunk_bytes=n // 4)
    try:
        job = _job(store, (0, 0), demand=True)
        t0 = time.perf_counter()
        eng.submit(job)
        eng.wait(job.key)
        took = time.perf_counter() - t0
        assert took >= expect
        assert took < expect * 3 + 0.05  # loose: shared CI machines oversleep
        assert eng.stats.busy_s >= expect
    finally:
        eng.close()


def test_cancel_drops_queued_jobs_and_stops_a_running_prefetch_at_a_chunk_boundary():
    store = _store(inter=256, hidden=256)
    n = store.layouts[0].row_bytes
    eng = CopyEngine(store, link=LinkEmulation(gbps=0.02), chunk_bytes=n // 16)
    try:
        running = _job(store, (0, 0))
        eng.submit(running)
        t0 = time.perf_counter()
        while running.done_bytes == 0 and time.perf_counter() - t0 < 5:
            time.sleep(0.0005)
        queued = _job(store, (0, 1), priority=1.0)
        preempted_like = _job(store, (0, 2), priority=-1.0)
        eng.submit(queued)
        eng.submit(preempted_like)
        assert eng.cancel(running.key) is None  # in flight: stops at its next chunk boundary
        assert eng.drop_queued(keep=lambda j: j.key == queued.key) == [preempted_like]
        assert eng.cancel(queued.key) is queued and queued.state is JobState.CANCELLED
        assert not eng.has_job(queued.key)
        eng.wait(running.key)
        (stopped,) = eng.poll()
        assert stopped is running and running.state is JobState.ABORTED
        assert 0 < running.done_bytes < n
        assert eng.stats.jobs_cancelled == 2 and eng.stats.jobs_done == 0
    finally:
        eng.close()


def test_demand_loads_are_never_cancelled_and_promote_resumes_a_stopped_prefetch():
    store = GatedStore(_store())
    eng = CopyEngine(store)
    try:
        dem = _job(store, (0, 0), demand=True)
        eng.submit(dem)
        assert store.started.wait(5)
        assert eng.cancel(dem.key) is None and not dem.abort
        pre = _job(store, (0, 1))
        eng.submit(pre)
        eng.cancel(pre.key)  # queued: dropped
        assert pre.state is JobState.CANCELLED
        store.gate.set()
        eng.wait(dem.key)
        assert [j.key for j in eng.poll()] == [dem.key]
    finally:
        store.gate.set()
        eng.close()


def test_slotless_orders_get_their_slot_from_the_starter_when_the_copy_starts():
    store = _store()
    n = store.layouts[0].row_bytes
    started: list[tuple[int, int]] = []

    def starter(job: CopyJob) -> bool:
        started.append(job.key)
        if job.key[1] == 3:  # e.g. stale, or no slot can be freed: dropped
            return False
        job.dst = torch.zeros(n, dtype=torch.uint8)
        return True

    gated = GatedStore(store)
    eng = CopyEngine(gated, starter=starter)
    try:
        eng.submit(_job(gated, (0, 0), demand=True))
        assert gated.started.wait(5)
        orders = [CopyJob((0, e), None, n, demand=False, priority=float(e)) for e in (1, 2, 3)]
        for o in orders:
            eng.submit(o)
        assert started == []  # no slot while queued
        assert eng.order((0, 1), priority=10.0, stamp=7) and orders[0].stamp == 7
        gated.gate.set()
        for e in range(4):
            eng.wait((0, e))
        assert started == [(0, 1), (0, 3), (0, 2)]
        assert [j.key for j in eng.poll()] == [(0, 0), (0, 1), (0, 2)]
        assert orders[2].state is JobState.CANCELLED and orders[2].dst is None
        assert torch.equal(orders[0].dst, store.read_row(0, 1))
        # a demand load for a key with a queued order supersedes the order
        gated.gate.clear()
        gated.started.clear()
        eng.submit(_job(gated, (0, 0), demand=True))
        assert gated.started.wait(5)
        order = CopyJob((0, 2), None, n, demand=False)
        eng.submit(order)
        demand = _job(gated, (0, 2), demand=True)
        eng.submit(demand)
        assert order.state is JobState.CANCELLED
        gated.gate.set()
        eng.wait((0, 2))
        assert demand.state is JobState.DONE and torch.equal(demand.dst, store.read_row(0, 2))
    finally:
        gated.gate.set()
        eng.close()


def test_promote_turns_a_queued_prefetch_into_a_demand():
    store = GatedStore(_store())
    eng = CopyEngine(store)
    try:
        eng.submit(_job(store, (0, 0)))
        assert store.started.wait(5)
        eng.submit(_job(store, (0, 1), priority=9.0))
        eng.submit(_job(store, (0, 2), priority=0.0))
        eng.promote((0, 2))
        store.gate.set()
        for e in range(3):
            eng.wait((0, e))
        assert [j.key[1] for j in eng.poll()] == [0, 2, 1]
    finally:
        store.gate.set()
        eng.close()


def test_a_failing_copy_is_reported_to_the_caller():
    class Broken(ExpertStore):
        def read_into(self, *a):
            raise OSError("disk gone")

    store = _store()
    eng = CopyEngine(Broken(store.layouts))
    try:
        eng.submit(_job(store, (0, 0), demand=True))
        with pytest.raises(RuntimeError, match="copy thread failed"):
            eng.wait((0, 0))
    finally:
        eng.close()


def test_bad_link_figures_are_input_errors():
    with pytest.raises(InputError, match="link-gbps"):
        LinkEmulation(gbps=0)
    with pytest.raises(InputError, match="latency"):
        LinkEmulation(gbps=1, latency_us=-1)
