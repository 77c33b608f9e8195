"""The compiled path of prefetching policies (sim.engine_prefetch, sim.fastkernel_prefetch)
against the Python engine (the reference): same metrics (wall-clock keys aside) and the
same per-request records, bit for bit, on every run it takes; runs it cannot take fall
back to the Python engine with a named reason."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.deepspeed import DeepSpeed
from sim import engine_fast, engine_prefetch
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from tests.sim_compare import both, both_with, engine, outcome
from tests.strategies import random_workload, specs
from tests.test_sim_kit import exact_profile
from traces.synth import SynthConfig, generate

PATH = engine_prefetch.PrefetchPath  # the compiled path these tests hold equal


ON_KERNEL = ["deepspeed", "promoe", "mixtral-offloading", "moe-infinity", "least-stale"]
# oracle overrides on_load_finished (fmoe: tests/test_engine_prefetch_fmoe.py)
PYTHON_ONLY = ["oracle"]


@pytest.mark.parametrize("policy", ON_KERNEL)
@pytest.mark.parametrize(
    ("hardware", "cache_gb", "batch"),
    [("paper-6x3090", 24.0, 1), ("paper-6x3090", 12.0, 3), ("a100-80gb-pcie4", 8.0, 1)],
)
def test_prefetching_compiled_equals_python(
    policy: str, hardware: str, cache_gb: float, batch: int
) -> None:
    """Mixtral-8x7B, Poisson arrivals: six GPUs (batch 1, and batch 3 with a small cache:
    preemptions, stale and dropped orders) and one GPU; the compiled path runs and gives
    the Python engine's results."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware(hardware)
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=2))
    cfg = SimConfig(
        model=spec, hardware=hw, policy=policy, cache_gb=cache_gb, batch_size=batch,
        train_fraction=0.34 if policy != "deepspeed" else None,
    )  # fmt: skip
    ref, fast, built = both(w, cfg, PATH)
    assert len(built) == 1, "the compiled path did not run"
    assert fast == ref
    m = json.loads(ref)["metrics"]
    # the policy did prefetch (least-stale: on demand only, its scorer called back)
    assert (m["prefetch_orders"] > 0) == (policy != "least-stale")


@pytest.mark.parametrize("policy", PYTHON_ONLY)
def test_policies_with_other_hooks_fall_back(policy: str) -> None:
    """Policies with hooks the kernel does not return for (on_load_finished) run on the
    Python engine under any setting, with the same results."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=3))
    cfg = SimConfig(model=spec, hardware=hw, policy=policy, cache_gb=24.0)
    ref, fast, built = both(w, cfg, PATH)
    assert not built
    assert fast == ref


def test_a_cache_smaller_than_a_layer_falls_back() -> None:
    """One GPU whose cache holds fewer experts than a prompt routes per layer: waves are
    possible, so the run stays on the Python engine (same results, reason named)."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie4")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=4))
    cfg = SimConfig(model=spec, hardware=hw, policy="deepspeed", cache_experts=4)
    ref, fast, built = both(w, cfg, PATH)
    assert not built
    assert fast == ref


@st.composite
def runs(draw: st.DrawFn) -> tuple[Any, SimConfig]:
    """Small random runs of deepspeed or promoe: made-up models, fitted costs, one-copy
    links with chunked preemption; caches mostly just above a layer's experts per GPU,
    some down to top-K experts."""
    spec = draw(specs())
    w = random_workload(
        spec,
        num_requests=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=draw(st.integers(1, 6)),
        with_probs=False,
        with_embeddings=False,
        arrival_gap_s=draw(st.sampled_from([0.0, 1e-4, 5e-4, 3e-3])),
    )
    f = st.floats(1e-5, 1e-3)
    hw = exact_profile(
        expert_s=draw(f),
        expert_per_token_s=draw(st.sampled_from([0.0, 1e-5])),
        dense_s=draw(f),
        dense_per_token_s=0.0,
        dense_per_token_context_s=0.0,
        head_s=draw(f),
        bandwidth_Bps=draw(st.floats(2e4, 1e8)),
        latency_s=draw(st.sampled_from([0.0, 1e-5, 1e-4])),
        num_gpus=min(draw(st.integers(1, 3)), spec.total_experts),
    )
    low = max(spec.top_k, hw.num_gpus)
    top = max(low, spec.total_experts)
    # mostly just above a layer's experts per GPU (the compiled path; misses and
    # evictions), sometimes down to top-K (waves possible: the Python engine)
    G, J = hw.num_gpus, spec.num_experts
    above = min(top, max(low, G * (-(-J // G) + 1)))
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        policy=draw(st.sampled_from(ON_KERNEL)),
        cache_experts=draw(st.integers(above, min(top, above + 2 * G)) | st.integers(low, top)),
        batch_size=draw(st.integers(1, 3)),
        batching=draw(st.sampled_from(["static", "continuous"])),
        train_fraction=0.5 if len(w.requests) > 1 else None,
        warm_start=draw(st.booleans()),
        chunk_bytes=draw(st.sampled_from([64, 512, 1 << 30])),
    )
    return w, cfg


@settings(max_examples=20, deadline=None)
@given(runs())
def test_prefetching_compiled_equals_python_on_random_runs(run: tuple[Any, SimConfig]) -> None:
    """Same results from both engine settings on random small runs (the compiled path where
    the run qualifies, the Python engine where waves are possible)."""
    workload, cfg = run
    ref, fast, _ = both(workload, cfg, PATH)
    assert fast == ref


class Watcher(DeepSpeed):
    """deepspeed that, at every gate, records what the executor shows it (every cache
    entry's fields, the counters, each link's state) and lets the link state shape its
    orders' priorities: the compiled path must show exactly what the Python engine does."""

    name = "watcher"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.seen: list[Any] = []

    def on_gate(self, ev: Any) -> None:
        view = self.ctx.executor
        links = [tuple(view.link_state(d)) for d in range(len(self.ctx.caches))]
        caches = [
            (
                sorted(
                    (k, e.state.value, e.loaded_at, e.last_used, e.uses, e.pins, e.protected,
                     e.by_prefetch, e.prefetch_used)
                    for k, e in c.entries.items()
                ),
                c.counters.as_dict(),
                len(c.entries),
            )
            for c in self.ctx.caches
        ]  # fmt: skip
        self.seen.append((ev.layer, ev.now, links, caches))
        super().on_gate(ev)
        wait = sum(s[0] for s in links)
        self._enqueue[:] = [o._replace(priority=o.priority + wait) for o in self._enqueue]


def test_hooks_see_what_the_python_engine_shows() -> None:
    """Cache entries, counters and link states read in a hook are the Python engine's,
    at every gate (six GPUs, batch 2, a cache small enough for evictions)."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=5))
    cfg = SimConfig(model=spec, hardware=hw, policy="deepspeed", cache_gb=12.0, batch_size=2)
    outs, pols = both_with(w, cfg, PATH, Watcher)
    logs = [p.seen for p in pols]
    assert outs[0] == outs[1]
    assert logs[0] == logs[1]
    assert any(c[1]["evictions"] for g in logs[0] for c in g[3])  # it saw evictions


class SlowSearch(DeepSpeed):
    """deepspeed whose orders wait for the profile's search latency (as fMoE's do): they
    are timed calls, applied in time order with the copies."""

    name = "slow-search"
    async_search = True


def test_small_call_buffers_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delayed orders through call and order buffers that start at one entry (so they
    grow during the run): the same results as the Python engine."""
    from sim import fastkernel_prefetch as fk

    new_state = fk.new_state

    def small(*args: Any) -> tuple:
        st = list(new_state(*args))
        st[11], st[12] = np.zeros(1, np.float64), np.zeros((1, 5), np.int64)
        st[13], st[14] = np.zeros(1, np.int64), np.zeros(1, np.float64)
        return tuple(st)

    monkeypatch.setattr(fk, "new_state", small)
    grown: list[int] = []
    grow = engine_prefetch.PrefetchPath._grow_calls

    def spy(self: engine_prefetch.PrefetchPath, need: int) -> None:
        grown.append(need)
        grow(self, need)

    monkeypatch.setattr(engine_prefetch.PrefetchPath, "_grow_calls", spy)
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=7))
    cfg = SimConfig(model=spec, hardware=hw, policy="deepspeed", cache_gb=12.0, batch_size=2)
    outs, _ = both_with(w, cfg, PATH, SlowSearch)
    assert outs[0] == outs[1]
    assert grown  # the delayed orders outgrew the buffers


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.5, 1.0, 2.0, 3.0])), max_size=60),
    st.data(),
)
def test_prefetch_heap_pops_like_heapq(ops: list[tuple[int, float]], data: st.DataObject) -> None:
    """A link's prefetch heap (lazily deleted entries, compacted when full) pops the live
    orders in heapq's order of (-priority, seq): re-prioritised keys supersede their old
    entries, and a heap of 16 entries compacts instead of overflowing."""
    from sim import fastkernel_prefetch as fk

    keys = 6
    ki = np.zeros((keys, fk.N_KI), np.int64)
    gi = np.zeros((1, fk.N_GI), np.int64)
    hf, hi = np.zeros((1, 16), np.float64), np.zeros((1, 16, 2), np.int64)
    live: dict[int, tuple[float, int]] = {}
    seq = 0
    for k, pri in ops:
        seq += 1
        ki[k, fk.K_JOB], ki[k, fk.K_JSEQ] = fk.JOB_QUEUED, seq
        live[k] = (-pri, seq)
        fk._hpush(ki, gi, hf, hi, 0, -pri, seq, k)
        assert gi[0, fk.G_HN] <= 16
        if data.draw(st.booleans()):  # pop one live order, as _next_job does
            while gi[0, fk.G_HN]:
                s, key = fk._hpop(gi, hf, hi, 0)
                if ki[key, fk.K_JOB] == fk.JOB_QUEUED and ki[key, fk.K_JSEQ] == s:
                    assert (live[key][0], s) == min(live.values())
                    ki[key, fk.K_JOB] = fk.JOB_NONE
                    del live[key]
                    break
    popped = []
    while gi[0, fk.G_HN]:
        s, key = fk._hpop(gi, hf, hi, 0)
        if ki[key, fk.K_JOB] == fk.JOB_QUEUED and ki[key, fk.K_JSEQ] == s:
            ki[key, fk.K_JOB] = fk.JOB_NONE
            popped.append(key)
    assert popped == [k for k, _ in sorted(live.items(), key=lambda kv: kv[1])]


@pytest.mark.parametrize(
    ("policy", "taken"), [("deepspeed", True), ("mixtral-offloading", False), ("fmoe", True)]
)
def test_auto_takes_the_path_only_with_kernel_victims(
    policy: str, taken: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FMOE_SIM_ENGINE=auto (on a run large enough for it) takes the prefetching path only
    where the kernel picks victims itself (a recency scorer, fMoE's KernelVictims); a
    policy whose scorer is called back stays on the Python engine (measured faster
    there). Same results."""
    monkeypatch.setattr(engine_fast, "AUTO_MIN_STEPS", 1)
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=8))
    cfg = SimConfig(model=spec, hardware=hw, policy=policy, cache_gb=24.0)
    with engine("python", PATH):
        ref = outcome(simulate(w, cfg))
    with engine("auto", PATH) as built:
        auto = outcome(simulate(w, cfg))
    assert len(built) == int(taken)
    assert auto == ref


def test_the_kernels_share_the_recency_list_columns() -> None:
    # sim.fastkernel_prefetch calls sim.fastkernel's list helpers with its own arrays
    from sim import fastkernel as fk
    from sim import fastkernel_prefetch as fp

    for name in ("K_DEV", "K_PREV", "K_NEXT", "G_HEAD", "G_TAIL", "G_INORDER", "GF_LATEST"):
        assert getattr(fk, name) == getattr(fp, name), name
