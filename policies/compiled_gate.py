"""A policy's gate as compiled code, called from inside a simulator kernel
(:class:`CompiledGate`, offered by :meth:`policies.base.Policy.compiled_gate`).

On the simulator's prefetching compiled path (``sim/engine_prefetch.py``) the kernel
returns to Python at every layer's gate so the policy's ``on_gate_now`` and ``on_gate``
run, and takes their orders back as arrays. A policy that offers a compiled gate is
called from inside the kernel instead: no return, no Python per layer step, and a
policy with no other per-step hook runs an iteration's layers in one kernel call.

The contract (docs/simulator.md, "A policy's gate inside the kernel"):

- ``kernel``: a numba ``@njit`` function (``cache=True``; it is compiled for
  :data:`GATE_SIG` and called through a function pointer, so the engine's own kernel
  stays in numba's disk cache whatever the policy):

  ``kernel(pi, pf, layer, now, ids, look, ki, kf, gi, ordk, ordp, nout) -> int64``

  ``pi`` / ``pf``: the policy's own state (int64 / float64, 1-D, C order), which the
  kernel passes through and the gate may read and write (its state between gates; the
  policy's Python sees the same arrays). ``layer``: the MoE layer whose gate ran;
  ``now``: the gate's time (``GateOutput.now``); ``ids``: the iteration's top-K expert
  ids ``[rows, layers, K]`` (int64; ``ids[:, layer]`` is ``GateOutput.topk_ids``).
  Read only: ``ki`` ([layers x experts, ...] int64, row ``layer * J + expert``: columns
  :data:`K_STATE`, 0 absent / 1 loading / 2 resident, and :data:`K_DEV`, the key's GPU),
  ``kf`` (its float columns, :data:`KF_LAST` the last use, :data:`KF_LOADED`) and ``gi``
  (per GPU: :data:`G_COUNT` entries, :data:`G_CAP` slots). The gate writes its orders
  (flat keys ``layer * J + expert``; priorities in ``ordp`` at the same positions) as
  two batches, one after the other from ``ordk[0]``: ``on_gate_now``'s, ``nout[0]``
  cancels then ``nout[1]`` prefetches, and ``on_gate``'s, ``nout[2]`` cancels then
  ``nout[3]`` prefetches; at most ``ordk.shape[0]`` (at least twice the experts of a
  layer) in all. It returns 0, or a negative number for a state it cannot handle (the
  run stops with an error).
- The batches are the orders the policy's ``on_gate_now`` and ``on_gate`` (each then
  ``decide_prefetch``) would make at that gate, with the same priorities, and the kernel
  treats them as the reference engine treats those hooks' orders: stamped with the gate,
  ``on_gate_now``'s applied after the layer's demand loads, ``on_gate``'s right after
  them, or, for an ``async_search`` policy, as a timed call after the gate's search
  latency. The Python engine never calls the compiled gate (it stays the reference:
  tests run both).
- Only the class that defines ``compiled_gate`` is trusted: a subclass that overrides
  ``on_gate`` or ``on_gate_now`` below it runs its Python hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# the columns of the engine's arrays a gate may read (sim.fastkernel_prefetch's; the
# path checks they agree)
K_STATE, K_DEV = 0, 5
KF_LAST, KF_LOADED = 0, 1
G_COUNT, G_CAP = 2, 3
ABSENT, LOADING, RESIDENT = 0, 1, 2


def gate_sig() -> Any:
    """The numba signature every compiled gate is compiled for (imports numba)."""
    from numba import types

    i1 = types.Array(types.int64, 1, "C")
    f1 = types.Array(types.float64, 1, "C")
    i2 = types.Array(types.int64, 2, "C")
    f2 = types.Array(types.float64, 2, "C")
    i3 = types.Array(types.int64, 3, "C")
    f3 = types.Array(types.float64, 3, "C")
    return types.int64(i1, f1, types.int64, types.float64, i3, f3, i2, f2, i2, i1, f1, i1)


@dataclass
class CompiledGate:
    """A policy's compiled gate: ``kernel`` (see the module's contract) and the state
    arrays ``pi`` (int64) and ``pf`` (float64) it is called with."""

    kernel: Any
    pi: np.ndarray
    pf: np.ndarray

    def __post_init__(self) -> None:
        # the kernel reads and writes these very arrays (no copy): they must already be
        # the signature's types
        for a, dt in ((self.pi, np.int64), (self.pf, np.float64)):
            if a.dtype != dt or a.ndim != 1 or not a.flags.c_contiguous:
                raise ValueError(f"a compiled gate's state array must be 1-D C-order {dt}")
