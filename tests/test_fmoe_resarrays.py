"""fMoE's reads of cache membership from the executor's arrays
(:meth:`policies.base.ExecutorView.residency`): on the prefetching compiled path, at
every moment fMoE reads them, the arrays say what the caches' dicts say (membership, a
copy loading or resident, entries and slots per GPU); the Python engine offers none
(its reads stay the dicts'), and both engines' results stay equal."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import event, given, settings

from policies.cache import ExpertState
from policies.fmoe import FmoePolicy
from sim import engine_prefetch
from sim.config import SimConfig
from tests.sim_compare import both_with
from tests.test_engine_prefetch_fmoe import _cfg, _workload, fmoe_runs

PATH = engine_prefetch.PrefetchPath
CODE = {ExpertState.LOADING: 1, ExpertState.RESIDENT: 2}


class ArrayChecker(FmoePolicy):
    """fMoE that, each time it reads the executor's arrays, checks them against the
    caches' dicts (and counts the reads: none on the Python engine)."""

    name = "fmoe-array-checker"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.reads = 0
        self.none = 0
        self.members = 0

    def _res_rows(self) -> Any:
        rows = super()._res_rows()
        if rows is None:
            self.none += 1
            return None
        self.reads += 1
        st, mv = rows
        want = np.zeros_like(st)
        for c in self.ctx.caches:
            for (lay, j), e in c.entries.items():
                want[lay, j] = CODE[e.state]
        assert np.array_equal(st, want)
        assert np.array_equal(np.asarray(mv), want)  # the memoryview reads the same
        view = self.ctx.executor.residency()
        for g, c in enumerate(self.ctx.caches):
            assert view.counts[g] == len(c.entries)
            assert view.caps[g] == c.capacity
            for lay, j in c.entries:  # each key's row is on its own GPU's cache
                assert self.ctx.placement.device_of((lay, j)) == g
        assert not st.flags.writeable
        self.members += int(np.count_nonzero(want))
        return rows


def test_arrays_equal_the_dicts_on_mixtral() -> None:
    """Mixtral-8x7B on one GPU, fMoE's defaults (deadline admission): the compiled run
    reads the arrays (orders, admission, demand counting) and each read agrees with
    the dicts; the Python run reads none; the results are equal."""
    cfg = _cfg("a100-80gb-pcie4", 16.0, 1)
    outs, pols = both_with(_workload(seed=5, n=2), cfg, PATH, ArrayChecker)
    assert outs[0] == outs[1]
    assert pols[0].reads == 0 and pols[0].none > 0
    assert pols[1].reads > 100 and pols[1].members > 0


@settings(max_examples=12, deadline=None)
@given(fmoe_runs())
def test_arrays_equal_the_dicts_on_random_runs(run: tuple[Any, SimConfig]) -> None:
    """Random small fMoE runs (1-2 GPUs, batches, chunked links): wherever the compiled
    path runs, every read of the arrays agrees with the dicts, and the results equal the
    Python engine's."""
    workload, cfg = run
    outs, pols = both_with(workload, cfg, PATH, ArrayChecker)
    assert outs[0] == outs[1]
    assert pols[0].reads == 0
    event(f"arrays read: {pols[1].reads > 0}")


def test_arrays_or_dicts_give_the_same_compiled_run(monkeypatch: Any) -> None:
    """On the compiled path itself, fMoE reading the arrays or the dicts (the module's
    switch) gives the same results (and the Python engine's): the reads are one rule."""
    from policies import fmoe_orders

    cfg = _cfg("paper-6x3090", 12.0, 2)
    w = _workload(seed=3, n=2)
    outs, pols = both_with(w, cfg, PATH, ArrayChecker)
    monkeypatch.setattr(fmoe_orders, "_ARRAYS", False)
    outs_off, pols_off = both_with(w, cfg, PATH, ArrayChecker)
    assert pols[1].reads > 0 and pols_off[1].reads == 0
    assert outs[1] == outs_off[1] == outs[0]
