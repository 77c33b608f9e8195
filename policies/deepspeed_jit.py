"""``deepspeed``'s gate as compiled code (:mod:`policies.compiled_gate`'s contract): the
orders :meth:`policies.deepspeed.DeepSpeed.on_gate` makes through
:func:`policies.baseline_common.select_orders`, computed in numba so the simulator's
prefetching kernel calls it in place of a return to Python at every layer step.

What it reproduces, step for step: the layer's experts not routed by any row of the
iteration (ascending), all at priority 1.0; per device (``(layer * J + e) % devices``,
as ``select_orders`` computes it) the first ``capacity - routed experts of the layer on
that device`` of them (at least 0) are kept, and an order goes out for each kept one
that is not among that device's cache entries, in ascending expert order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from policies import compiled_gate, gate_select_jit
from policies.gate_select_jit import keep_to_order, mark_routed
from specs.jitcache import stamp_dependencies

# pi: [0] experts per layer J, [1] devices D, then scratch: J marks, D routed counts, D ranks
P_J, P_D, P_SCRATCH = 0, 1, 2


def state(num_experts: int, num_devices: int) -> np.ndarray:
    """The gate's int state (``pi``): its sizes and its scratch."""
    pi = np.zeros(P_SCRATCH + num_experts + 2 * num_devices, np.int64)
    pi[P_J], pi[P_D] = num_experts, num_devices
    return pi


@njit(cache=True, _nrt=False)
def whole_layer_gate(pi, pf, layer, now, ids, look, ki, kf, gi, ordk, ordp, nout):
    """The whole-layer fetch's orders at ``layer``'s gate (the module's docstring)."""
    J, D = pi[P_J], pi[P_D]
    mark = P_SCRATCH  # pi[mark + e]: 1 when a row routes expert e at this layer
    routed = mark + J  # per device: distinct routed experts (layer_reserve)
    rank = routed + D  # per device: candidates kept so far
    mark_routed(pi, ids, layer, J, D, mark, routed, rank)
    n = 0
    for e in range(J):
        if pi[mark + e]:
            continue
        k = layer * J + e
        if not keep_to_order(pi, ki, gi, k, D, routed, rank):
            continue
        ordk[n] = k
        ordp[n] = 1.0
        n += 1
    nout[2] = 0  # on_gate's orders: the second batch (none of on_gate_now's)
    nout[3] = n
    return 0


# the kernel compiles in policies.compiled_gate's column numbers and calls
# gate_select_jit's kernel: those files' contents join its disk-cache stamp
# (specs/jitcache.py), so a change there recompiles it
stamp_dependencies(globals().values(), (compiled_gate, gate_select_jit))
