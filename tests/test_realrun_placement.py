"""Placement logic of the real executor, on the CPU: devices, budgets, waves, and the
round-robin layout of experts over several slot pools during a real run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from policies.base import Policy
from realrun.models import load
from realrun.offload import offload_model
from realrun.placement import (
    auto_budget_experts,
    budget_experts,
    plan_waves,
    resolve_devices,
    split_over_devices,
)
from realrun.session import RunSession, SessionOptions
from specs.errors import InputError
from specs.presets import load_model


@given(
    experts=st.lists(st.integers(0, 63), unique=True, max_size=40).map(sorted),
    caps=st.lists(st.integers(1, 6), min_size=1, max_size=4),
)
def test_waves_keep_order_and_fit_every_device(experts, caps):
    n = len(caps)
    device_of = lambda e: (7 * e) % n  # noqa: E731 - any deterministic map
    waves = plan_waves(experts, device_of, caps)
    assert [e for w in waves for e in w] == experts
    for i, w in enumerate(waves):
        assert w
        per_dev = [sum(1 for e in w if device_of(e) == d) for d in range(n)]
        assert all(c <= cap for c, cap in zip(per_dev, caps, strict=True))
        if i + 1 < len(waves):  # a wave ends only because the next expert's device is full
            nxt = waves[i + 1][0]
            assert per_dev[device_of(nxt)] == caps[device_of(nxt)]


def test_budgets_in_experts_and_gigabytes():
    spec = load_model("tiny-mixtral-wide")
    assert budget_experts(spec) == spec.total_experts
    assert budget_experts(spec, cache_experts=5) == 5
    assert budget_experts(spec, cache_experts=10_000) == spec.total_experts
    assert budget_experts(spec, cache_gb=0.2) == int(0.2 * 2**30 // spec.expert_bytes)
    with pytest.raises(InputError, match="below what one layer needs"):
        budget_experts(spec, cache_experts=spec.top_k - 1)
    with pytest.raises(InputError, match="below what one layer needs"):
        budget_experts(spec, cache_gb=0.05)
    with pytest.raises(InputError, match="not both"):
        budget_experts(spec, cache_experts=4, cache_gb=1.0)


def test_devices():
    assert resolve_devices("cpu") == [torch.device("cpu")]
    assert len(resolve_devices("cpu", 3)) == 3
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_devices("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_devices("tpu")


def test_budget_split_is_round_robin_and_total():
    spec = load_model("tiny-olmoe")  # 4 layers x 16 experts
    placement, caps = split_over_devices(spec, 10, 3)
    assert sum(caps) == 10 and all(c >= 1 for c in caps)
    held = [
        sum(1 for lyr in range(4) for e in range(16) if placement.device_of((lyr, e)) == d)
        for d in range(3)
    ]
    assert held == [placement.experts_on(d) for d in range(3)]
    assert [placement.device_of((0, e)) for e in range(4)] == [0, 1, 2, 0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Plain(Policy):
    name = "test-plain"


@pytest.mark.parametrize("num_devices,cache", [(2, 4), (3, 5)])
def test_a_multi_device_run_keeps_each_expert_on_its_round_robin_device(num_devices, cache):
    om = offload_model(load("tiny-qwen3-moe"), store="ram")
    prompt = list(range(3, 15))
    with RunSession(om, _Plain(), SessionOptions(cache, [torch.device("cpu")] * num_devices)) as s:
        s.generate("r", prompt, 3)
        for d in s.res.devs:
            keys = set(d.pool.slot_of)
            assert keys == set(d.cache.entries)  # a slot per cached key, nothing else
            assert all(s.placement.device_of(k) == d.index for k in keys)
            assert len(keys) <= d.cache.capacity == d.pool.capacity
        assert sum(s.res.capacities) == cache
        c = s.counters()
        assert c.hits + c.misses == c.demands > 0
        assert c.bytes_loaded == c.loads * om.loaded.spec.expert_bytes


@given(
    st.lists(st.integers(0, 40), min_size=1, max_size=3),
    st.integers(0, 3),
)
def test_an_auto_budget_is_the_largest_whose_split_fits_every_devices_free_memory(
    free_experts, reserve_experts
):
    """cache_gb='auto': free memory (in experts) less the reserve bounds each device's
    share; the budget is the largest total whose split fits, or one InputError line."""
    spec = load_model("tiny-mixtral")  # 4 layers x 8 experts, top-2
    eb = spec.expert_bytes
    devices = [torch.device("cuda", i) for i in range(len(free_experts))]
    free = {
        d: (n + reserve_experts) * eb + eb // 2 for d, n in zip(devices, free_experts, strict=True)
    }
    try:
        total = auto_budget_experts(spec, devices, reserve_experts * eb, free.__getitem__)
    except InputError as exc:
        assert "cache_gb='auto'" in str(exc) and "\n" not in str(exc)
        least = max(spec.top_k, len(devices))
        fits = [
            t
            for t in range(least, spec.total_experts + 1)
            if all(
                s <= n
                for s, n in zip(
                    split_over_devices(spec, t, len(devices))[1], free_experts, strict=True
                )
            )
        ]
        assert not fits
        return
    _, shares = split_over_devices(spec, total, len(devices))
    assert all(s <= n for s, n in zip(shares, free_experts, strict=True))
    if total < spec.total_experts:  # one more would not fit somewhere
        _, more = split_over_devices(spec, total + 1, len(devices))
        assert any(s > n for s, n in zip(more, free_experts, strict=True))


def test_an_auto_budget_needs_cuda():
    from realrun.api import offload

    with pytest.raises(InputError, match="device='cuda' only"):
        offload("tiny-mixtral", cache_gb="auto")


def test_an_auto_budget_counts_slots_of_the_stores_row_bytes():
    """A slot pool allocates the store's packed row per expert; when that exceeds the
    spec's expert bytes (alignment, biases, another dtype) the budget shrinks with it."""
    spec = load_model("tiny-mixtral")
    eb = spec.expert_bytes
    dev = [torch.device("cuda", 0)]
    free = lambda _d: 10 * eb  # noqa: E731
    assert auto_budget_experts(spec, dev, 0, free) == 10
    assert auto_budget_experts(spec, dev, 0, free, slot_bytes=2 * eb) == 5
    with pytest.raises(InputError, match=f"experts of {10 * eb} bytes"):
        auto_budget_experts(spec, dev, 0, free, slot_bytes=10 * eb)
