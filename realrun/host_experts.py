"""The CPU miss action in the real executor: an expert computed on the host from its host
copy, with the library's own expert math.

For each demanded expert that is neither resident nor loading on its device, a session
whose policy overrides ``Policy.miss_action`` asks it how to serve the expert. ``CPU``:
the expert's packed row is read from the store (the RAM store's pinned row itself, no
copy), viewed as a one-expert fused module (``ExpertLayout.views``) and the library's
experts forward runs on the CPU on the rows' hidden states; the output goes back to the
layer's device. ``FETCH``: as before. Lossy actions are not run by the real executor
yet: one InputError line.

CUDA semantics: hidden states go to a pinned host buffer with one D2H copy (the CPU
task must wait for it); the task runs on a worker thread (torch's CPU kernels release
the GIL) while the compute thread goes on with the GPU's experts; its output is copied
H2D from pinned memory with ``non_blocking=True`` on the current stream. The layer adds
every expert's output in ascending expert order, as the library does, so with eager
fp32 experts on the CPU the logits are bit-equal to the unmodified model's.

``host_s`` sums the host compute time of every task (reported as ``host_compute_s``).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from policies.async_runner import ExpertUsed
from policies.base import CpuState, MissAction, Policy
from policies.cache import ExpertKey
from realrun.offload import OffloadedExperts
from realrun.store import ExpertStore
from specs.errors import InputError


def _overrides_miss_action(policy: Policy) -> bool:
    return type(policy).miss_action is not Policy.miss_action


class HostExperts:
    """Runs CPU miss actions for one session (see the module docstring)."""

    def __init__(self, store: ExpertStore, policy: Policy, expert_bytes: int) -> None:
        self.store, self.policy = store, policy
        self.active = _overrides_miss_action(policy)
        self.expert_bytes = expert_bytes
        self.host_s = 0.0
        self.tasks = 0
        self.counts = {a.value: 0 for a in MissAction if a is not MissAction.FETCH}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ewma_s: float | None = None  # one task's host time, measured

    def choose(self, key: ExpertKey, tokens: int, now: float) -> bool:
        """True when the policy serves ``key`` (absent on its device) on the CPU."""
        act = self.policy.miss_action(key, tokens, now)
        if act is MissAction.FETCH:
            return False
        if act is not MissAction.CPU:
            raise InputError(
                f"policy {self.policy.name!r} chose the {act.value!r} miss action; the real "
                "executor runs only exact actions (fetch, cpu)"
            )
        self.counts[act.value] += 1
        return True

    def submit(
        self,
        mod: OffloadedExperts,
        layer: int,
        expert: int,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> Future[torch.Tensor]:
        """Start expert ``expert``'s contribution on the CPU; the future holds it on
        ``hidden``'s device."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="host-experts")
        on_cuda = hidden.device.type == "cuda"
        # one D2H copy of the layer's inputs, into pinned memory on CUDA
        h = hidden.detach().to("cpu")
        idx = top_k_index.detach().to("cpu")
        w = top_k_weights.detach().to("cpu")
        if on_cuda:
            h, idx, w = h.pin_memory(), idx.pin_memory(), w.pin_memory()
        threads = torch.get_num_threads()  # the worker thread's kernels split work alike
        return self._pool.submit(self._run, mod, layer, expert, h, idx, w, hidden.device, threads)

    def _run(
        self,
        mod: OffloadedExperts,
        layer: int,
        expert: int,
        h: torch.Tensor,
        idx: torch.Tensor,
        w: torch.Tensor,
        device: torch.device,
        threads: int,
    ) -> torch.Tensor:
        # intra-op threads are set per OS thread (OpenMP): match the compute thread's, or
        # a matmul may split its sums differently and lose bit-equality
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        row = self.store.host_row(layer, expert)
        if row is None:
            row = self.store.read_row(layer, expert)
        views = mod.layout.views(row.view(1, -1))
        one = torch.where(idx == expert, 0, 1)
        with torch.no_grad():
            out = mod.call_on_view(views, 1, h, one, w)
        dt = time.perf_counter() - t0
        with self._lock:
            self.host_s += dt
            self.tasks += 1
            self._ewma_s = dt if self._ewma_s is None else 0.8 * self._ewma_s + 0.2 * dt
        if device.type == "cuda":
            return out.pin_memory().to(device, non_blocking=True)
        return out.to(device)

    def cpu_state(self) -> CpuState:
        """The measured host task time (0 before the first task)."""
        return CpuState(0.0, 0.0, self._ewma_s or 0.0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# -- the session's side (functions of a RunSession: its residency, driver and clock) ----
def start_host_tasks(
    self: Any,
    mod: OffloadedExperts,
    layer: int,
    needed: list[int],
    counts: np.ndarray,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> tuple[list[int], dict[int, Any]]:
    """Ask the policy about each absent expert; start the CPU ones (their demands are
    counted as misses, the cache is not touched). Returns the experts left to the
    GPU and the CPU experts' futures by id."""
    now = self.now()
    on_cpu: dict[int, Any] = {}
    for e in needed:
        key = (layer, e)
        d = self.res.dev(key)
        with self.res.lock:
            cached = key in d.cache.entries
        if cached or not self.host.choose(key, int(counts[e]), now):
            continue
        with self.res.lock:
            d.cache.demand(key)  # a miss, served by the CPU
        fut = self.host.submit(mod, layer, e, hidden, top_k_index, top_k_weights)
        on_cpu[e] = (fut, key, int(counts[e]))
    return [e for e in needed if e not in on_cpu], on_cpu


def add_host_outputs(
    self: Any, out: torch.Tensor, on_cpu: dict[int, Any], below: int | None
) -> torch.Tensor:
    """Add the CPU experts' outputs with ids below ``below`` (all when None), ascending:
    the library's summation order."""
    for e in sorted(on_cpu):
        if below is not None and e >= below:
            break
        fut, key, tokens = on_cpu.pop(e)
        out = out + fut.result()
        self.driver.observe(ExpertUsed(key, tokens, self.now()))
    return out
