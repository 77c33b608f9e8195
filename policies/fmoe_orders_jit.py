"""numba kernel of :meth:`policies.fmoe_orders.FmoeOrders._order`'s deadline path in one
call (issue 21, speed only): :func:`protect_put` protects the selected experts of a
layer still ahead from eviction (``FmoeEviction._protect``'s two writes per expert) and
makes the ones neither ordered this iteration nor cached deadline candidates
(:func:`policies.fmoe_jit.fresh_put`). Before, the protection was a Python loop (a
decode gate's top-K) or two numpy writes (a weak match's hundred) and the candidates one
more call; the writes are the same, in the same order (protection touches only ``prot``
and ``etnu``, which the candidates' rule does not read). tests/test_fmoe_orders_jit.py
compares it with the step-by-step Python on random inputs.

It calls a kernel of another module: that module's source joins this file's kernels'
disk-cache stamp (:func:`specs.jitcache.stamp_dependencies`), so a changed callee
recompiles it.

Imported when an fMoE policy is bound (with policies.fmoe_jit).
"""

from __future__ import annotations

from numba import njit

from policies import fmoe_jit
from policies.fmoe_jit import fresh_put
from specs.jitcache import stamp_dependencies


@njit(cache=True)
def protect_put(  # noqa: ANN201, PLR0913 - numba
    protect, prot, etnu, issued, layer, experts, cached, vals, ahead, cp, cidx, cnt
):  # noqa: ANN001 - numba
    """Where ``protect``: ``prot[layer, j] = True`` and ``etnu[layer, j] = -0.0`` for
    every ``j`` of ``experts`` (int64 ids of ``layer``); then fresh_put's candidates
    (``issued`` bool [L, J], ``cached[i]`` whether ``experts[i]`` is cached, p =
    ``vals[i] * ahead`` into the set ``cp`` / ``cidx`` of ``cnt``). Returns the set's new
    count."""
    if protect:
        for i in range(experts.shape[0]):
            j = experts[i]
            prot[layer, j] = True
            etnu[layer, j] = -0.0
    return fresh_put(issued, layer, experts, cached, vals, ahead, cp, cidx, cnt)


# protect_put compiles in fmoe_jit.fresh_put: that module joins its disk-cache stamp
stamp_dependencies((protect_put,), (fmoe_jit,))
