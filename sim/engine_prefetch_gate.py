"""A policy's compiled gate (:mod:`policies.compiled_gate`) as the prefetching kernel
takes it (:func:`sim.fastkernel_prefetch.iteration_gate`): a first-class function of the
contract's signature, so the engine's kernel is compiled once (numba's disk cache) for
every policy's gate, and the arguments it is called with."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types

from policies import compiled_gate as cg_mod
from policies.compiled_gate import CompiledGate


class _GateAddress(types.WrapperAddressProtocol):
    """The gate's compiled entry as a numba first-class function value (its address and
    signature; the dispatcher is kept alive with it)."""

    def __init__(self, kernel: Any, sig: Any) -> None:
        # numba's own conversion of a dispatcher to a first-class function value (it
        # compiles the dispatcher for ``sig``, from its disk cache when there)
        from numba.experimental.function_type import _get_wrapper_address

        self.kernel, self.sig = kernel, sig
        self.addr = _get_wrapper_address(kernel, sig)

    def __wrapper_address__(self) -> int:
        return self.addr

    def signature(self) -> Any:
        return self.sig


def gate_args(cg: CompiledGate, fk: Any) -> tuple:
    """(gate, pi, pf, gout): what :func:`iteration_gate` takes after the plain kernel's
    arguments, for the policy's compiled gate ``cg``."""
    assert (cg_mod.K_STATE, cg_mod.K_DEV, cg_mod.KF_LAST, cg_mod.KF_LOADED) == (
        fk.K_STATE, fk.K_DEV, fk.KF_LAST, fk.KF_LOADED
    )  # fmt: skip
    assert (cg_mod.G_COUNT, cg_mod.G_CAP, cg_mod.ABSENT, cg_mod.LOADING, cg_mod.RESIDENT) == (
        fk.G_COUNT, fk.G_CAP, fk.ABSENT, fk.LOADING, fk.RESIDENT
    )  # fmt: skip
    return _GateAddress(cg.kernel, cg_mod.gate_sig()), cg.pi, cg.pf, np.zeros(4, np.int64)
