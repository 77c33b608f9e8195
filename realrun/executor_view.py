"""The real executor's :class:`~policies.base.ExecutorView`: its copy engines' queues and
the layer time it measures, for deadline-aware prefetch (the simulator's counterpart is
``sim.executor_view``). Estimates from live state, read under each engine's lock."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from policies.base import CpuState, LinkState
from realrun.residency import Residency

RECENT_GATES = 64  # gate intervals the layer time is the mean of (about two iterations)


class RealExecutorView:
    """Copy engines and measured layer steps of one session.

    ``note_gate(now)`` is called by the session at every gate (wall seconds); the layer
    time is the mean interval between consecutive gates of one iteration over the last
    :data:`RECENT_GATES` (stalls included: the executor's real pace), 0.0 before any."""

    def __init__(self, res: Residency, expert_bytes: int):
        self.res = res
        self.expert_bytes = expert_bytes
        self._lock = threading.Lock()
        self._last: tuple[int, float] | None = None  # (iteration, time) of the last gate
        self._gaps: deque[float] = deque(maxlen=RECENT_GATES)

    def note_gate(self, iteration: int, now: float) -> None:
        """A gate ran at ``now`` in ``iteration``."""
        with self._lock:
            last = self._last
            if last is not None and last[0] == iteration and now >= last[1]:
                self._gaps.append(now - last[1])
            self._last = (iteration, now)

    def _bandwidth(self, device: int) -> float:
        engine = self.res.devs[device].engine
        if engine.link is not None:
            return engine.link.bytes_per_s
        st = engine.stats
        if st.busy_s > 0 and st.bytes_copied > 0:
            return st.bytes_copied / st.busy_s
        return float("inf")  # nothing measured yet: no estimate of the link's speed

    def link_state(self, device: int) -> LinkState:
        """Bytes left of the running copy and the queued demand loads on ``device``'s copy
        engine, at its bandwidth (the emulated link's, else the measured one)."""
        engine = self.res.devs[device].engine
        bw = self._bandwidth(device)
        with engine._cond:
            left = sum(
                max(job.nbytes - job.done_bytes, 0)
                for job in engine._jobs.values()
                if job.demand or job.dst is not None
            )
        lat = engine.link.latency_us * 1e-6 if engine.link is not None else 0.0
        return LinkState(left / bw, bw, lat + self.expert_bytes / bw)

    def layer_time_s(self, tokens: int) -> float:
        """Mean measured gate interval (see the class doc); ``tokens`` is not modelled."""
        with self._lock:
            return sum(self._gaps) / len(self._gaps) if self._gaps else 0.0

    host: Any = None  # realrun.host_experts.HostExperts, set by the session

    def cpu_state(self) -> CpuState | None:
        """The host CPU's measured expert task time (no queue estimate); None before the
        session attaches its host-expert runner."""
        return None if self.host is None else self.host.cpu_state()
