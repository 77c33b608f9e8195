"""Copy interference: how much longer compute takes while the host link carries a copy.

On a CPU the emulated link's copies run on a thread that shares the cores and the memory
bandwidth with compute (measured here: a dense decode step 3-39% slower while a 2 GB/s
emulated copy runs); on a GPU a DMA copy shares little with the kernels. The simulator
stretches compute by ``ComputeModel.copy_interference`` while a GPU's link is busy.

Measured on the model's decode steps without experts (dense layers, head and the
executor's per-step work; :func:`calibration.bench_compute.zero_experts`) on device 0:
each round times one greedy generation with the link idle, one while a copy thread keeps
the link busy with prefetch-sized copies through the real copy engine (the run's mover,
link emulation and chunk size), and one idle again. A round's ratio is the busy run's
median step over the mean of the two idle runs' medians; the factor is the median ratio
when it stands out of the rounds' spread (above 1 by more than two standard errors of
the median), else 1: noise must not become a cost the simulator adds to every step.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field

import torch

from calibration.bench_compute import median_standard_error, zero_experts
from calibration.stopwatch import Tick, _no_tick
from realrun.copy_engine import CopyEngine, CopyJob, CpuMover, CudaMover, LinkEmulation
from realrun.generate import greedy_generate
from realrun.offload import OffloadedModel


@dataclass
class Interference:
    """Per round: the idle and busy runs' median decode steps (seconds) and their ratio."""

    idle_s: list[float] = field(default_factory=list)
    busy_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def factor(self) -> float:
        """The median ratio when it stands out of the rounds' noise, else 1 (module doc)."""
        if not self.ratios:
            return 1.0
        med = statistics.median(self.ratios)
        return med if med - 1.0 > 2 * median_standard_error(self.ratios) else 1.0


class _BusyLink:
    """A copy thread keeping one device's link busy: prefetch copies of the store's
    experts, one after another, into a scratch row, until closed."""

    def __init__(
        self,
        om: OffloadedModel,
        device: torch.device,
        link: LinkEmulation | None,
        chunk_bytes: int,
    ) -> None:
        mover = CudaMover(device, chunk_bytes) if device.type == "cuda" else CpuMover()
        self.engine = CopyEngine(om.store, mover, link, chunk_bytes, name="interference")
        self.keys = [
            (lay, e) for lay, lo in enumerate(om.store.layouts) for e in range(lo.num_experts)
        ]
        self.dst = torch.empty(om.store.row_bytes, dtype=torch.uint8, device=device)
        self.copies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fmoe-busy-link", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            key = self.keys[self.copies % len(self.keys)]
            n = self.engine.store.layouts[key[0]].row_bytes
            self.engine.submit(CopyJob(key, self.dst[:n], n, demand=False, priority=1.0))
            self.engine.wait(key)
            self.engine.poll()
            self.copies += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.close()


def measure_interference(
    om: OffloadedModel,
    device: torch.device,
    link: LinkEmulation | None,
    chunk_bytes: int,
    rounds: int = 5,
    prompt_tokens: int = 32,
    new_tokens: int = 12,
    tick: Tick = _no_tick,
) -> Interference:
    """``rounds`` of (idle, busy, idle) decode-step timings; see the module docstring."""
    ids = list(range(1, prompt_tokens + 1))

    def step_s() -> float:
        with zero_experts(om):
            g = greedy_generate(om.loaded.model, "interference", ids, new_tokens)
        return statistics.median(g.decode_s)

    out = Interference()
    step_s()  # warm-up
    for _ in range(rounds):
        before = step_s()
        busy = _BusyLink(om, device, link, chunk_bytes)
        try:
            during = step_s()
        finally:
            busy.close()
        after = step_s()
        idle = (before + after) / 2
        out.idle_s.append(idle)
        out.busy_s.append(during)
        out.ratios.append(during / idle)
        tick(1)
    return out
