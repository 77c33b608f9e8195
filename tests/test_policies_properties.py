"""Properties of every registered policy on random small traces, through the replay.

- every order names a valid (layer, expert) with a finite priority;
- the cache invariants hold after every hook (capacity, counters, pins);
- a policy's batch eviction scores equal its per-entry ones;
- the same seed and inputs give the same decisions;
- the oracle's hit rate is >= every other policy's.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import (
    GateOutput,
    IterationEnd,
    IterationStart,
    Policy,
    PolicyContext,
    PrefetchDecision,
    RequestArrival,
)
from policies.cache import CacheEntry, ExpertKey, ExpertState
from policies.registry import make_policy, policy_class, policy_names
from policies.replay import ReplayResult, replay
from tests.strategies import random_workload, workloads
from traces.types import Workload

NAMES = policy_names()


class Checked(Policy):
    """Wraps a policy: forwards every hook, checks its orders and the caches after each call."""

    name = "checked"

    def __init__(self, inner: Policy) -> None:
        super().__init__()
        self.inner = inner
        self.reads_future = inner.reads_future
        self.preload_all = inner.preload_all
        self.orders = 0

    def check(self) -> None:
        for cache in self.ctx.caches:
            c = cache.counters
            assert cache.used <= cache.capacity
            assert c.hits + c.misses == c.demands
            assert c.bytes_loaded == c.loads * cache.expert_bytes
            assert all(v >= 0 for v in c.as_dict().values())
            for e in cache.entries.values():
                assert e.pins >= 0 and e.state in (ExpertState.LOADING, ExpertState.RESIDENT)

    def bind(self, ctx: PolicyContext) -> None:
        super().bind(ctx)
        self.inner.bind(ctx)

    def fit(self, training: Any) -> None:
        self.inner.fit(training)

    def bind_future(self, workload: Any) -> None:
        self.inner.bind_future(workload)

    def metadata(self) -> dict[str, Any]:
        return self.inner.metadata()

    def _fwd(self, hook: str, *args: Any) -> None:
        getattr(self.inner, hook)(*args)
        self.check()

    def on_request_arrival(self, ev: RequestArrival) -> None:
        self._fwd("on_request_arrival", ev)

    def on_iteration_start(self, ev: IterationStart) -> None:
        self._fwd("on_iteration_start", ev)

    def on_gate(self, ev: GateOutput) -> None:
        self._fwd("on_gate", ev)

    def on_expert_used(self, key: ExpertKey, tokens: int, now: float) -> None:
        self._fwd("on_expert_used", key, tokens, now)

    def on_load_finished(self, key: ExpertKey, by_prefetch: bool, now: float) -> None:
        self._fwd("on_load_finished", key, by_prefetch, now)

    def on_iteration_end(self, ev: IterationEnd) -> None:
        self._fwd("on_iteration_end", ev)

    def decide_prefetch(self) -> PrefetchDecision:
        dec = self.inner.decide_prefetch()
        spec = self.ctx.spec
        for o in dec.enqueue:
            assert 0 <= o.layer < spec.num_moe_layers and 0 <= o.expert < spec.num_experts, o
            assert math.isfinite(o.priority), o
        self.orders += len(dec.enqueue)
        return dec

    def eviction_scores(self, entries: list[CacheEntry]) -> list[float]:
        many = self.inner.eviction_scores(entries)
        assert many == [self.inner.eviction_score(e) for e in entries]  # the batch form agrees
        assert not any(math.isnan(s) for s in many)
        return many


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    wl: Workload = draw(workloads())
    spec = wl.spec
    devices = draw(st.integers(1, 3))
    cap = draw(st.integers(max(spec.top_k, devices), spec.total_experts + 2))
    return {
        "workload": wl,
        "capacity_experts": cap,
        "num_devices": devices,
        "batch_size": draw(st.integers(1, 3)),
        "prefetch_distance": draw(st.sampled_from([None, 1, 2])),
        "seed": draw(st.integers(0, 3)),
        "training": draw(st.sampled_from([None, "train"])),
    }


def run(name: str, setup: dict[str, Any], checked: bool = False, **kw: Any) -> ReplayResult:
    """Replay ``setup`` under a fresh instance of policy ``name`` (wrapped in Checked if asked)."""
    s = dict(setup)
    wl = s.pop("workload")
    if s["training"] == "train":
        s["training"] = random_workload(wl.spec, num_requests=3, seed=99)
    pol = make_policy(name)
    return replay(wl, Checked(pol) if checked else pol, **s, **kw)


def fitted(name: str, setup: dict[str, Any]) -> dict[str, Any]:
    """The setup, with room for every expert when the policy keeps them all resident."""
    if policy_class(name).preload_all:
        total = setup["workload"].spec.total_experts
        return {**setup, "capacity_experts": max(total, setup["num_devices"])}
    return setup


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15)
@given(setup=setups())
def test_orders_valid_and_invariants_hold(name: str, setup: dict[str, Any]) -> None:
    res = run(name, fitted(name, setup), checked=True)
    c = res.counters
    assert c["hits"] + c["misses"] == c["demands"] > 0
    assert 0.0 <= res.hit_rate <= 1.0 and 0.0 <= res.prefetch_accuracy <= 1.0
    assert c["prefetches_used"] <= c["prefetches_issued"]
    assert sum(h.demands for h in res.per_request.values()) >= c["demands"]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8)
@given(setup=setups())
def test_same_seed_same_decisions(name: str, setup: dict[str, Any]) -> None:
    setup = fitted(name, setup)
    a = run(name, setup, record_decisions=True)
    b = run(name, setup, record_decisions=True)
    assert a.decisions == b.decisions
    assert a.counters == b.counters


@settings(max_examples=30)
@given(setup=setups())
def test_oracle_hit_rate_is_an_upper_bound(setup: dict[str, Any]) -> None:
    """Every policy, no-offload included, on the same setup (all with room for every
    expert when no-offload needs it)."""
    full = fitted("no-offload", setup)
    res = run("oracle", setup)
    oracle, oracle_full = res.hit_rate, run("oracle", full).hit_rate
    if res.extra_waves == 0:  # every layer fits: everything prefetched in time, nothing wasted
        assert oracle == 1.0 and res.counters["prefetches_wasted"] == 0
    for name in NAMES:
        if name == "oracle":
            continue
        other = run(name, fitted(name, setup)).hit_rate
        bound = oracle_full if policy_class(name).preload_all else oracle
        assert bound >= other - 1e-12, f"{name} {other} beats oracle {bound}"
