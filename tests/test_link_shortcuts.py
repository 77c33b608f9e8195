"""The one-copy link's shortcuts (sim.link: ``Link.ch0``) against the general channel code.

A link that carries one copy at a time skips ``_kick``'s channel loop and ``_preempt``
where they have nothing to do (an order on a busy link, a channel freed at a segment's
end). Forcing every link onto the general path (``ch0 = None``) must change nothing: the
same metrics and per-request records, bit for bit, for policies that prefetch, cancel,
preempt and leave stale orders.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim import link as link_mod
from sim.config import SimConfig
from sim.run import simulate
from tests.sim_compare import outcome
from tests.strategies import random_workload, specs
from tests.test_sim_kit import exact_profile

PREFETCHING = ["fmoe", "mixtral-offloading", "promoe", "moe-infinity", "oracle"]


def general_path(monkeypatch: pytest.MonkeyPatch) -> list[link_mod.Link]:
    """Make every Link built from now on use the general channel code; returns them."""
    built: list[link_mod.Link] = []
    init = link_mod.Link.__init__

    def no_shortcut(self: link_mod.Link, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self.ch0 = None
        built.append(self)

    monkeypatch.setattr(link_mod.Link, "__init__", no_shortcut)
    return built


@st.composite
def runs(draw: st.DrawFn) -> tuple[Any, SimConfig]:
    """Small random runs with one-copy links, small chunks (preemption mid-copy), slow to
    fast links, caches from top-K experts to all of them."""
    spec = draw(specs())
    w = random_workload(
        spec,
        num_requests=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=draw(st.integers(1, 5)),
        arrival_gap_s=draw(st.sampled_from([0.0, 1e-4, 3e-3])),
    )
    f = st.floats(1e-5, 1e-3)
    hw = exact_profile(
        expert_s=draw(f),
        dense_s=draw(f),
        head_s=draw(f),
        bandwidth_Bps=draw(st.floats(2e4, 1e8)),
        latency_s=draw(st.sampled_from([0.0, 1e-5, 1e-4])),
        num_gpus=min(draw(st.integers(1, 3)), spec.total_experts),
        search_s=draw(st.sampled_from([0.0, 1e-4])),
    )
    low = max(spec.top_k, hw.num_gpus)
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        policy=draw(st.sampled_from(PREFETCHING)),
        cache_experts=draw(st.integers(low, max(low, spec.total_experts))),
        batch_size=draw(st.integers(1, 3)),
        chunk_bytes=draw(st.sampled_from([64, 1024, 1 << 20])),
        seed=draw(st.integers(0, 3)),
    )
    return w, cfg


@settings(max_examples=25, deadline=None)
@given(runs())
def test_one_copy_shortcuts_change_nothing(run: tuple[Any, SimConfig]) -> None:
    workload, cfg = run
    fast = outcome(simulate(workload, cfg))
    with pytest.MonkeyPatch.context() as mp:
        built = general_path(mp)
        ref = outcome(simulate(workload, cfg))
    assert built and all(link.ch0 is None for link in built)
    assert fast == ref


@pytest.mark.parametrize("policy", ["fmoe", "mixtral-offloading", "promoe"])
def test_one_copy_shortcuts_on_a_preset_run(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixtral-8x7B on the 6-GPU preset at 24 GiB (the speed benchmark's setup): the
    general path preempts and drops stale orders, and both paths agree."""
    from specs.presets import load_hardware, load_model
    from traces.synth import SynthConfig, generate

    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=4))
    cfg = SimConfig(model=spec, hardware=hw, policy=policy, cache_gb=24, chunk_bytes=1 << 20)
    fast = outcome(simulate(w, cfg))
    built = general_path(monkeypatch)
    ref = outcome(simulate(w, cfg))
    stats = [link.stats for link in built]
    assert sum(s["orders"] for s in stats) > 0
    assert sum(s["preemptions"] + s["stale"] for s in stats) > 0
    assert fast == ref
