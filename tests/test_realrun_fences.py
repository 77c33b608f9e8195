"""Slot fences (realrun.fences): a reused slot's copy waits for the compute thread's
stream, also when the slot is reused on a copy thread whose own current stream differs
(PyTorch's current CUDA stream is per thread). Checked on the CPU with stand-in streams
that are thread-local like CUDA's; the CUDA event itself is exercised by tests/test_cuda.py."""

from __future__ import annotations

import threading
import time

import torch

from policies.placement import Placement
from realrun.fences import NoFence, StreamFence, fence_for
from realrun.residency import Residency
from realrun.store import RamStore
from tests.test_realrun_copy_engine import FakeExperts


class ThreadStreams:
    """Thread-local 'current streams' (default: 'default'), and a log of fences taken."""

    def __init__(self) -> None:
        self._local = threading.local()
        self.taken: list[tuple[str, str]] = []  # (stream recorded on, thread that took it)
        self._lock = threading.Lock()

    def current(self) -> str:
        return getattr(self._local, "stream", "default")

    def use(self, name: str) -> None:
        self._local.stream = name

    def record(self, stream: str) -> tuple[str, str]:
        marker = (stream, threading.current_thread().name)
        with self._lock:
            self.taken.append(marker)
        return marker


def test_a_fence_taken_on_another_thread_records_on_the_observed_compute_stream():
    streams = ThreadStreams()
    fence = StreamFence(streams.current, streams.record)
    streams.use("model-stream")
    fence.observe()
    got: list = []
    t = threading.Thread(target=lambda: got.append(fence.take()), name="copy")
    t.start()
    t.join()
    assert got == [("model-stream", "copy")]  # not the copy thread's own 'default'
    streams.use("other")  # the compute thread moves on: the next observe follows it
    fence.observe()
    assert fence.take()[0] == "other" and fence.stream == "other"


def test_before_any_observe_a_fence_uses_the_taking_threads_stream():
    streams = ThreadStreams()
    fence = StreamFence(streams.current, streams.record)
    assert fence.stream is None and fence.take() == ("default", "MainThread")


def test_cpu_devices_have_no_fence():
    f = fence_for(torch.device("cpu"))
    assert isinstance(f, NoFence) and f.take() is None


def test_prefetches_started_on_the_copy_thread_wait_on_the_compute_threads_stream():
    """Residency wiring: the compute thread runs under 'model-stream'; a demand load (its
    slot reused on the compute thread) and a prefetch (its slot reused on the copy thread,
    whose current stream is 'default') both fence on 'model-stream'."""
    streams = ThreadStreams()
    store = RamStore([FakeExperts(num_experts=4, seed=i) for i in range(2)])
    streams.use("model-stream")
    res = Residency(
        store,
        store.row_bytes,
        Placement(2, 4, 1),
        [torch.device("cpu")],
        [2],
        fences=lambda _dev: StreamFence(streams.current, streams.record),
    )
    try:
        res.gate(0)
        res.demand([(0, 0)])
        res.wait((0, 0))
        res.release([(0, 0)])
        res.order((1, 3), priority=1.0)  # starts on the copy thread
        t0 = time.perf_counter()
        while not res.devs[0].cache.is_resident((1, 3)) and time.perf_counter() - t0 < 5:
            res.take_landed()
            time.sleep(0.001)
        assert res.devs[0].cache.is_resident((1, 3))
        threads = {t for _, t in streams.taken}
        assert "MainThread" in threads and any(t.startswith("fmoe-copy") for t in threads)
        assert {s for s, _ in streams.taken} == {"model-stream"}
    finally:
        res.close()
