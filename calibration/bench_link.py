"""Host->device copy microbenchmarks: transfer time vs size, per link and all links at once.

- CPU: the real executor's :class:`realrun.copy_engine.CopyEngine` copies expert bytes
  from the expert store into a slot buffer, through its link emulation when one is set
  (``--link-gbps``); the time is from submit to the waiter waking up, as the executor
  sees it. Pinned and pageable are the same memory on the CPU.
- CUDA (written to CUDA semantics, never run on a GPU here): copies from a pinned and a
  pageable host buffer to each GPU, timed with CUDA events on a side stream (the raw
  H2D figures); then every GPU copies at once (one thread per GPU) and the aggregate
  rate is compared with the sum of the single-link rates to find a shared host-side cap.
  Also, as on the CPU, the executor's own path: expert rows through the copy engine and
  :class:`CudaMover` (``chunk_bytes`` chunks, an event waited on per chunk), submit to
  wake-up (``path='engine'``). The profile's link is fitted to these when present: the
  simulator predicts the executor, whose copies pay the per-chunk waits too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from calibration.stopwatch import Tick, _no_tick, robust_time, spread_of
from realrun.copy_engine import CopyEngine, CopyJob, CpuMover, CudaMover, LinkEmulation
from realrun.store import ExpertStore

# A shared cap is reported when all links at once reach less than this share of the sum
# of their single-link rates (PCIe switches and host memory both leave a few % of noise).
HOST_CAP_THRESHOLD = 0.9


@dataclass(frozen=True)
class CopySample:
    """One copy size and its seconds (lower quartile) (``pinned`` False: from pageable memory)."""

    nbytes: int
    seconds: float
    pinned: bool = True
    device: int = 0
    spread: float | None = None  # (q75 - q25) / median of the repeats
    path: str = "raw"  # 'raw': one copy timed by events; 'engine': through the copy engine


def copy_sizes(row_bytes: int, points: int = 6, smallest: int = 4096) -> list[int]:
    """Sizes from one expert row down by halves (at least ``smallest`` bytes)."""
    sizes = {row_bytes}
    s = row_bytes
    for _ in range(points - 1):
        s //= 2
        if s < smallest:
            break
        sizes.add(s)
    return sorted(sizes)


def link_sizes(given: list[int] | None, row_bytes: int, cuda: bool) -> list[int]:
    """The copy sizes timed: ``given`` (``--link-sizes``) or one expert row down by halves.
    On the CPU a copy moves at most one expert row (the copy engine's unit), so larger
    sizes are cut to the row."""
    if not given:
        return copy_sizes(row_bytes)
    return sorted(set(given) if cuda else {min(n, row_bytes) for n in given})


def median_spread(link: list[dict[str, Any]]) -> float | None:
    """The median over copy sizes of the repeats' spread (None when none was recorded)."""
    vals = [s["spread"] for s in link if s.get("spread") is not None]
    return float(np.median(vals)) if vals else None


def measure_cpu_link(
    store: ExpertStore,
    link: LinkEmulation | None,
    sizes: Sequence[int],
    repeats: int,
    chunk_bytes: int = 1 << 20,
    tick: Tick = _no_tick,
    device: torch.device | None = None,
) -> list[CopySample]:
    """Submit-to-wake time (lower quartile) of a demand copy per size, rotating over the
    store's experts, through the copy engine; into a CUDA ``device`` with the executor's
    :class:`CudaMover` (samples marked ``path='engine'``), else into host memory."""
    cuda = device is not None and device.type == "cuda"
    mover = CudaMover(device, chunk_bytes) if cuda else CpuMover()
    engine = CopyEngine(store, mover, link, chunk_bytes, name="bench")
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=device if cuda else "cpu")
    experts = [(lay, e) for lay, L in enumerate(store.layouts) for e in range(L.num_experts)]
    times: dict[int, list[float]] = {n: [] for n in sizes}
    i = 0
    try:
        for r in range(repeats + 1):  # round 0 warms up
            for n in sizes:
                key = experts[i % len(experts)]
                i += 1
                n_row = min(n, store.layouts[key[0]].row_bytes)
                t0 = time.perf_counter()
                engine.submit(CopyJob(key, dst[:n_row], n_row, demand=True))
                engine.wait(key)
                dt = time.perf_counter() - t0
                engine.poll()
                if r:
                    times[n].append(dt)
                    tick(1)
    finally:
        engine.close()
    path = "engine" if cuda else "raw"
    return [CopySample(n, robust_time(v), spread=spread_of(v), path=path) for n, v in times.items()]


def _cuda_copy_s(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_cuda_links(
    devices: Sequence[torch.device], sizes: Sequence[int], repeats: int, tick: Tick = _no_tick
) -> list[CopySample]:
    """Pinned and pageable H2D copies per GPU and size (CUDA events; never run here)."""
    out: list[CopySample] = []
    big = max(sizes)
    pinned = torch.empty(big, dtype=torch.uint8).pin_memory()
    pageable = torch.empty(big, dtype=torch.uint8)
    for d, dev in enumerate(devices):
        dst = torch.empty(big, dtype=torch.uint8, device=dev)
        stream = torch.cuda.Stream(device=dev)
        for src, is_pinned in ((pinned, True), (pageable, False)):
            for n in sizes:
                _cuda_copy_s(dst[:n], src[:n], stream)  # warm-up
                ts = [_cuda_copy_s(dst[:n], src[:n], stream) for _ in range(repeats)]
                out.append(CopySample(n, robust_time(ts), is_pinned, d, spread_of(ts)))
                tick(repeats)
    return out


def measure_cuda_all_links(
    devices: Sequence[torch.device], nbytes: int, copies: int, tick: Tick = _no_tick
) -> float:
    """Aggregate pinned H2D bytes/s with every GPU copying ``copies`` x ``nbytes`` at once."""
    srcs = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in devices]
    dsts = [torch.empty(nbytes, dtype=torch.uint8, device=d) for d in devices]
    streams = [torch.cuda.Stream(device=d) for d in devices]
    barrier = threading.Barrier(len(devices) + 1)

    def worker(i: int) -> None:
        barrier.wait()
        with torch.cuda.stream(streams[i]):
            for _ in range(copies):
                dsts[i].copy_(srcs[i], non_blocking=True)
        streams[i].synchronize()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tick(len(devices) * copies)
    return len(devices) * copies * nbytes / wall


def host_cap(single_link_Bps: Sequence[float], all_at_once_Bps: float) -> float | None:
    """The shared host-side cap: the all-at-once rate when it falls clearly below the sum
    of the single-link rates, else None (the links do not limit each other)."""
    if len(single_link_Bps) < 2:
        return None
    if all_at_once_Bps < HOST_CAP_THRESHOLD * sum(single_link_Bps):
        return float(all_at_once_Bps)
    return None
