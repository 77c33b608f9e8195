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

import copy
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

    def __init__(
        self, store: ExpertStore, policy: Policy, expert_bytes: int, allow_lossy: bool = False
    ) -> None:
        self.store, self.policy = store, policy
        self.active = _overrides_miss_action(policy)
        self.allow_lossy = allow_lossy
        self.expert_bytes = expert_bytes
        self.host_s = 0.0
        self.tasks = 0
        self.counts = {a.value: 0 for a in MissAction if a is not MissAction.FETCH}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._ewma_s: float | None = None  # one task's host time, measured
        self._lowbit: dict[ExpertKey, torch.Tensor] = {}  # fake-quantized rows, made once
        # per experts module, a shallow copy of its library shell for the worker thread
        self._shells: dict[int, torch.nn.Module] = {}

    def choose(self, key: ExpertKey, tokens: int, now: float) -> MissAction:
        """The policy's action for ``key`` (absent on its device); a lossy one only with
        ``allow_lossy`` (else one InputError line)."""
        act = self.policy.miss_action(key, tokens, now)
        if act is MissAction.FETCH:
            return act
        if act.lossy and not self.allow_lossy:
            raise InputError(
                f"policy {self.policy.name!r} chose the lossy miss action {act.value!r}; "
                "pass --allow-lossy (allow_lossy=True) to opt in"
            )
        self.counts[act.value] += 1
        return act

    def lowbit_row(self, mod: OffloadedExperts, layer: int, expert: int) -> torch.Tensor:
        """The expert's row with every weight matrix fake-quantized to int4 (symmetric,
        groups of 32 along the input dimension, dequantized to its dtype): what a Q4-class
        low-bit copy computes with. Emulated: the low-bit bytes are not copied anywhere."""
        key = (layer, expert)
        row = self._lowbit.get(key)
        if row is None:
            src = self.store.host_row(layer, expert)
            row = (src if src is not None else self.store.read_row(layer, expert)).clone()
            for v in mod.layout.views(row.view(1, -1)).values():
                if v.dim() < 3 or not v.is_floating_point():
                    continue  # biases and scalars stay exact
                w = v[0].float()
                cols = w.shape[-1]
                pad = (-cols) % 32
                g = torch.nn.functional.pad(w, (0, pad)).reshape(*w.shape[:-1], -1, 32)
                scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 7.0
                q = (g / scale).round().clamp(-8, 7) * scale
                v[0].copy_(q.reshape(*w.shape[:-1], -1)[..., :cols].to(v.dtype))
            self._lowbit[key] = row
        return row

    def submit(
        self,
        mod: OffloadedExperts,
        layer: int,
        expert: int,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        lowbit: bool = False,
    ) -> Future[torch.Tensor]:
        """Start expert ``expert``'s contribution on the CPU (from its low-bit copy when
        ``lowbit``); the future holds it on ``hidden``'s device."""
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
        row = self.lowbit_row(mod, layer, expert) if lowbit else None
        return self._pool.submit(
            self._run, mod, layer, expert, h, idx, w, hidden.device, threads, row
        )

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
        row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # intra-op threads are set per OS thread (OpenMP): match the compute thread's, or
        # a matmul may split its sums differently and lose bit-equality
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        if row is None:
            row = self.store.host_row(layer, expert)
        if row is None:
            row = self.store.read_row(layer, expert)
        views = mod.layout.views(row.view(1, -1))
        one = torch.where(idx == expert, 0, 1)
        shell = self._shells.get(id(mod))
        if shell is None:  # its own shell: the compute thread sets the module's meanwhile
            shell = self._shells[id(mod)] = copy.copy(mod.shell)
        for name, v in views.items():
            shell.__dict__[name] = v
        shell.num_experts = 1
        with torch.no_grad():
            out = shell(h, one, w)
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
) -> tuple[list[int], dict[int, Any], torch.Tensor]:
    """Ask the policy about each absent expert; start the CPU (and low-bit) ones; drop the
    skipped ones and renormalise each row's other weights to the original sum. Their
    demands count as misses; the cache is not touched. Returns the experts left to the
    GPU, the host experts' futures by id, and the weights every expert of the layer uses."""
    now = self.now()
    chosen: dict[int, MissAction] = {}
    for e in needed:
        key = (layer, e)
        d = self.res.dev(key)
        with self.res.lock:
            cached = key in d.cache.entries
        if cached:
            continue
        act = self.host.choose(key, int(counts[e]), now)
        if act is not MissAction.FETCH:
            chosen[e] = act
            with self.res.lock:
                d.cache.demand(key)  # a miss, served without the cache
    skipped = [e for e, a in chosen.items() if a is MissAction.SKIP]
    if skipped:
        top_k_weights = renormalised(top_k_index, top_k_weights, skipped)
    on_cpu: dict[int, Any] = {}
    for e, act in chosen.items():
        if act is MissAction.SKIP:
            continue
        fut = self.host.submit(
            mod, layer, e, hidden, top_k_index, top_k_weights, lowbit=act is MissAction.LOWBIT
        )
        on_cpu[e] = (fut, (layer, e), int(counts[e]))
    return [e for e in needed if e not in chosen], on_cpu, top_k_weights


def renormalised(index: torch.Tensor, weights: torch.Tensor, skipped: list[int]) -> torch.Tensor:
    """``weights`` with the skipped experts' entries zeroed and each row's others scaled to
    the row's original sum (a row that loses every expert keeps zeros)."""
    drop = torch.isin(index, torch.tensor(skipped, device=index.device))
    kept = weights.masked_fill(drop, 0)
    total, left = weights.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    return torch.where(left > 0, kept * (total / left.clamp_min(1e-30)), kept)


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
