"""fMoE on the prefetching compiled path (sim.engine_prefetch, sim.fastkernel_prefetch)
against the Python engine (the reference): the same metrics and per-request records, bit
for bit. The kernel applies on_gate_now's orders at once (after the layer's demand loads)
and on_gate's after the search, and picks fMoE's victims itself (KernelVictims): the
eviction table's scores on caches of fewer than VICTIM_INDEX_MIN unprotected candidates,
victim_index's below-table scores from there on; these tests check that each of them ran.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from policies.cache import VICTIM_INDEX_MIN
from policies.fmoe import FmoePolicy
from sim import engine_prefetch
from sim import fastkernel_prefetch as fk
from sim.config import SimConfig
from specs.presets import load_hardware, load_model
from tests.sim_compare import both, both_with
from tests.strategies import random_workload, small_spec
from tests.test_sim_kit import exact_profile
from traces.synth import SynthConfig, generate

PATH = engine_prefetch.PrefetchPath


def _cfg(hardware: str, cache_gb: float, batch: int, **options: Any) -> SimConfig:
    spec, hw = load_model("mixtral-8x7b"), load_hardware(hardware)
    return SimConfig(
        model=spec, hardware=hw, policy="fmoe", cache_gb=cache_gb, batch_size=batch,
        train_fraction=0.34, policy_options=options,
    )  # fmt: skip


def _workload(seed: int = 2, n: int = 3) -> Any:
    return generate(
        load_model("mixtral-8x7b"), SynthConfig(num_requests=n, arrival_rate=2.91, seed=seed)
    )


@pytest.mark.parametrize(
    ("hardware", "cache_gb", "batch", "scores"),
    [
        ("paper-6x3090", 24.0, 1, "table"),  # six GPUs of ~11 slots: the eviction table
        ("paper-6x3090", 12.0, 3, "table"),  # batches: prompts of several requests
        ("a100-80gb-pcie4", 24.0, 1, "index"),  # one GPU, ~70 slots: victim_index's
    ],
)
def test_fmoe_compiled_equals_python(
    hardware: str, cache_gb: float, batch: int, scores: str
) -> None:
    """Mixtral-8x7B, Poisson arrivals, fMoE's defaults (deadline admission, lookahead,
    residence pricing): the compiled path runs, picks its victims in the kernel with the
    score the cache's size calls for, and gives the Python engine's results."""
    ref, fast, built = both(_workload(), _cfg(hardware, cache_gb, batch), PATH)
    assert len(built) == 1, "the compiled path did not run"
    assert fast == ref
    vi = built[0].vi
    big, small = int(vi[fk.V_NBIG]), int(vi[fk.V_NSMALL])
    if scores == "table":
        assert small > 0 and big == 0, (big, small)
    else:
        assert big > 0, (big, small)


def test_fmoe_options_with_more_table_rows() -> None:
    """The per-layer chance table and the later visits' own rows (a 5-row state) reach the
    kernel's victim choice unchanged: the same results as the Python engine."""
    cfg = _cfg("a100-80gb-pcie4", 24.0, 1, layer_table=True, transitions_later="plain")
    ref, fast, built = both(_workload(seed=4), cfg, PATH)
    assert len(built) == 1
    assert built[0].vs[2].shape[0] == 5  # ist with the later visits' rows
    assert built[0].vi[fk.V_NBIG] > 0
    assert fast == ref


def test_fmoe_without_kernel_victims_on_a_large_cache_falls_back() -> None:
    """An eviction order the kernel does not reproduce (``uses``: its victim_index is
    Python's) on a cache of VICTIM_INDEX_MIN slots or more stays on the Python engine."""
    cfg = _cfg("a100-80gb-pcie4", 24.0, 1, eviction_order="uses")
    ref, fast, built = both(_workload(n=2), cfg, PATH)
    assert not built
    assert fast == ref


class Watcher(FmoePolicy):
    """fMoE that, at every gate, records what it sees of the caches: each entry's fields,
    whether an entry object seen at the last gate is still its key's entry (a reload is a
    new object; a dropped one keeps its fields as they were), and the candidate arrays."""

    name = "fmoe-watcher"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: list[Any] = []
        self.held: dict[Any, Any] = {}

    def on_gate(self, ev: Any) -> None:
        caches = self.ctx.caches
        held = [
            (key, e.entries.get(key) is obj, obj.state.value, obj.uses, obj.last_used)
            for key, (obj, e) in sorted(self.held.items())
        ]
        self.held = {key: (obj, c) for c in caches for key, obj in c.entries.items()}
        ents = [
            [(k, e.state.value, e.loaded_at, e.last_used, e.uses, e.pins, e.protected,
              e.by_prefetch, e.prefetch_used) for k, e in c.entries.items()]
            for c in caches
        ]  # fmt: skip
        arrs = []
        for c in caches:
            a = c.candidate_arrays()
            arrs.append(
                sorted(
                    (int(a.layers[i]), int(a.experts[i]), float(a.last_used[i]), a.entries[i].key)
                    for i in range(a.n)
                )
            )
        self.seen.append((ev.layer, ev.now, held, ents, arrs, [len(c._cands) for c in caches]))
        super().on_gate(ev)


def test_fmoe_hooks_see_what_the_python_engine_shows() -> None:
    """What fMoE reads of the caches at every gate (entries in the dict's order, entry
    objects kept from an earlier gate, candidate arrays) is the Python engine's."""
    cfg = _cfg("a100-80gb-pcie4", 16.0, 2)
    w = _workload(seed=5, n=2)
    outs, pols = both_with(w, cfg, PATH, Watcher)
    logs = [p.seen for p in pols]
    assert outs[0] == outs[1]
    assert logs[0] == logs[1]
    # it saw evictions: entries held from an earlier gate that had left, with their uses
    assert any(not same for g in logs[0] for _, same, *_ in g[2])
    assert any(n >= VICTIM_INDEX_MIN for g in logs[0] for n in g[5])


def test_the_kernels_cache_stamp_includes_their_callees_sources() -> None:
    """numba keys a cached kernel on its own file only; the prefetching kernels compile in
    helpers of sim.fastkernel and policies.fmoe_jit (fMoE's score), so those files'
    contents are part of every kernel's stamp: editing them recompiles the kernels."""
    import hashlib

    import policies.fmoe_jit
    import sim.fastkernel

    h = hashlib.sha256()
    for mod in (sim.fastkernel, policies.fmoe_jit):
        with open(mod.__file__, "rb") as f:  # type: ignore[arg-type]
            h.update(f.read())
    for fn in (fk.iteration, fk.advance, fk.apply_orders, fk.run_calls, fk._kernel_victim):
        stamp = fn._cache._cache_file._source_stamp
        assert stamp[1] == h.hexdigest()


@st.composite
def fmoe_runs(draw: st.DrawFn) -> tuple[Any, SimConfig]:
    """Small random fMoE runs: made-up models of 8-24 experts (caches from a layer's
    experts per GPU up to every key, so both victim scores), fitted costs, one-copy links
    with chunked preemption, a search latency of 0 (on_gate's orders then go at once,
    after on_gate_now's) or not, batches, a training split."""
    spec = small_spec(
        layers=draw(st.integers(2, 6)),
        experts=draw(st.integers(8, 24)),
        top_k=draw(st.integers(1, 3)),
    )
    w = random_workload(
        spec,
        num_requests=draw(st.integers(2, 4)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=draw(st.integers(1, 6)),
        with_lookahead=draw(st.booleans()),
        arrival_gap_s=draw(st.sampled_from([0.0, 1e-4, 3e-3])),
    )
    f = st.floats(1e-5, 1e-3)
    G = draw(st.integers(1, 2))
    hw = exact_profile(
        expert_s=draw(f), dense_s=draw(f), head_s=draw(f),
        bandwidth_Bps=draw(st.floats(2e4, 1e8)),
        latency_s=draw(st.sampled_from([0.0, 1e-5])),
        num_gpus=G, search_s=draw(st.sampled_from([0.0, 1e-4])),
    )  # fmt: skip
    J, top = spec.num_experts, spec.total_experts
    above = min(top, G * (J // G + 2))
    cfg = SimConfig(
        model=spec, hardware=hw, policy="fmoe",
        cache_experts=draw(st.integers(above, top)),
        batch_size=draw(st.integers(1, 2)),
        train_fraction=0.5, chunk_bytes=draw(st.sampled_from([512, 1 << 30])),
    )  # fmt: skip
    return w, cfg


@settings(max_examples=15, deadline=None)
@given(fmoe_runs())
def test_fmoe_compiled_equals_python_on_random_runs(run: tuple[Any, SimConfig]) -> None:
    """Same results from both engine settings on random small fMoE runs (the compiled
    path where the run qualifies; most of these do, some with caches large enough for
    victim_index's score)."""
    workload, cfg = run
    ref, fast, built = both(workload, cfg, PATH)
    assert fast == ref
    if built:
        event(f"victims by victim_index's score: {bool(built[0].vi[fk.V_NBIG])}")
