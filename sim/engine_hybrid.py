"""Miss actions of the engine: serving a demanded, non-resident expert other than by a fetch.

For each demanded expert that is ABSENT on its GPU, an engine whose policy overrides
``Policy.miss_action`` asks it how to serve the expert (a LOADING one is already being
fetched: its copy is promoted to a demand load, which counts as the fetch action, unless
the policy sets ``miss_action_on_loading``: then it is asked too, and a copy it does not
wait for goes on as a prefetch):

- ``FETCH``: a demand load, as before hybrid execution;
- ``CPU``: an expert task on the host CPU (:class:`sim.host_cpu.HostCpu`): activations
  down and back over the link, no copy of weights, no cache change; the layer cannot end
  before the output is back;
- ``LOWBIT``: a copy of ``lowbit_format`` bytes lands in a staging buffer (no cache slot,
  :meth:`sim.link.Link.start_transient`), then the GPU computes it;
- ``SKIP``: nothing is moved or computed (the executor renormalises the other weights).

Every demanded expert is served by exactly one of: resident (a hit), fetch, cpu,
lowbit, skip. A lossy action without ``allow_lossy``, or CPU without host figures in the
profile, is refused with one InputError line.
"""

from __future__ import annotations

import math
from typing import Any

import simpy

from policies.base import MissAction, Policy
from policies.cache import ExpertCache, ExpertKey, ExpertState
from sim.executor_view import SimExecutorView
from sim.host_cpu import HostCpu
from sim.link import Transient
from sim.links import Links
from sim.timing import Timing
from specs.errors import InputError

_FETCH, _CPU, _LOWBIT, _SKIP = MissAction.FETCH, MissAction.CPU, MissAction.LOWBIT, MissAction.SKIP
_RESIDENT = ExpertState.RESIDENT
ACTIONS: tuple[MissAction, ...] = (_FETCH, _CPU, _LOWBIT, _SKIP)


class HybridSteps:
    """The engine's miss-action methods (a mixin; state made by :meth:`_init_hybrid`)."""

    env: simpy.Environment
    policy: Policy
    links: Links
    timing: Timing
    caches: list[ExpertCache]

    def _init_hybrid(self, cfg: Any, policy: Policy) -> None:
        from sim.engine_setup import _overrides

        hw, spec = cfg.hardware, cfg.model
        self.spec = spec
        self.h_miss = _overrides(policy, "miss_action")
        # a policy may also serve an expert whose copy is under way another way
        self.ask_loading = bool(getattr(policy, "miss_action_on_loading", False))
        self.allow_lossy = cfg.allow_lossy
        self.cpu = HostCpu(hw, spec, self.links.copies_Bps) if hw.host is not None else None
        self.lowbit_bytes = spec.expert_bytes_as(cfg.lowbit_format) if self.h_miss else 0
        self.action_count = {a: 0 for a in ACTIONS if a is not _FETCH}
        self.side = False  # this layer step has CPU or low-bit work
        self.side_end = 0.0
        self.side_sinks: list[tuple[Transient, float]] = []
        self.hybrid_wait_s = 0.0
        self.now_hint = 0.0  # the engine's clock at the last demand (for the view)
        self.pending_fetches = [0] * cfg.hardware.num_gpus  # decided, not started (view)
        view = None if policy.ctx is None else policy.ctx.executor
        if isinstance(view, SimExecutorView):  # sim.run's view: add the CPU and pending fetches
            view.hybrid = self

    def _serve_aside(
        self, act: MissAction, g: int, key: ExpertKey, tokens: int, ct: float, t: float
    ) -> None:
        """Serve ``key`` (ABSENT on GPU g, demanded for ``tokens`` rows at ``t``) by
        ``act`` (not FETCH)."""
        if act.lossy and not self.allow_lossy:
            raise InputError(
                f"policy {self.policy.name!r} chose the lossy miss action {act.value!r}; "
                "pass --allow-lossy (allow_lossy=True) to opt in"
            )
        if act is _CPU:
            if self.cpu is None:
                raise InputError(
                    f"policy {self.policy.name!r} chose to compute an expert on the CPU but "
                    "the hardware profile has no host figures (HardwareProfile.host)"
                )
            end = self.cpu.submit(tokens, t)
            if end > self.side_end:
                self.side_end = end
            self.side = True
        elif act is _LOWBIT:
            sink = self.links.links[g].start_transient(key, self.lowbit_bytes, t)
            self.side_sinks.append((sink, ct))
            self.side = True
        elif act is not _SKIP:
            raise InputError(f"policy {self.policy.name!r}: unknown miss action {act!r}")
        self.action_count[act] += 1

    def _side_wait(self, t: float, t_layer: float) -> Any:
        """The layer's end (a generator returning it): once its CPU tasks' outputs are
        back and its low-bit copies have landed and run on the GPU, one after another
        after the GPU's other experts (``t_layer``), in the order they land."""
        env, links = self.env, self.links
        for sink, _ in self.side_sinks:
            while sink.state is not _RESIDENT:
                when = links.next_time()
                if when == math.inf:
                    raise RuntimeError("waiting for a low-bit copy that no link carries")
                nxt = env.peek()
                if nxt <= when:
                    yield env.timeout(max(nxt - env.now, 0.0))
                    continue
                links.advance(when)
        gpu = t_layer
        for sink, ct in sorted(self.side_sinks, key=lambda sc: sc[0].loaded_at):
            gpu = max(gpu, sink.loaded_at) + ct
        end = gpu if gpu > self.side_end else self.side_end
        self.hybrid_wait_s += end - t_layer
        self.side, self.side_end = False, 0.0
        self.side_sinks = []
        return end

    def action_metrics(self) -> dict[str, Any]:
        """Counts and shares of the miss actions (shares of the demanded experts that were
        not resident; None when none missed) and ``exact`` (no lossy action ran)."""
        misses = sum(c.counters.misses for c in self.caches)
        counts = dict(self.action_count)
        fetch = misses - sum(counts.values())
        out: dict[str, Any] = {"actions_fetch": fetch}
        out.update({f"actions_{a.value}": n for a, n in counts.items()})
        for a in ACTIONS:
            n = out[f"actions_{a.value}"]
            out[f"action_share_{a.value}"] = n / misses if misses else None
        out["exact"] = counts[_LOWBIT] == 0 and counts[_SKIP] == 0
        out["cpu_busy_s"] = self.cpu.busy_s if self.cpu is not None else 0.0
        out["hybrid_wait_s"] = self.hybrid_wait_s
        out["bytes_lowbit"] = sum(lk.transient_bytes for lk in self.links.links)
        return out
