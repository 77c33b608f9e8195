"""fMoE's compiled glue between its kernels (issue 21, speed only) against the Python
code it replaces, end to end: a simulated run with every switch below on and one with
every switch off give the same results to the bit.

- policies.fmoe_victim._LIST_KERNEL: a device's victim list for the admission's price
  from one kernel call over the cache's candidate arrays (no [L, J] eviction table).
  Below VICTIM_INDEX_MIN candidates (or another score) the Python list, by a plain sort
  of (score, key, entry) where no score is NaN (else heapq.nsmallest, as before).
- policies.fmoe_orders._FRESH_KERNEL: _order's deadline candidates (the experts neither
  ordered this iteration nor cached) from one kernel call (fmoe_jit.fresh_put);
  policies.fmoe_orders._PROTECT_PUT: with a layer still ahead, its protection in the
  same call (fmoe_orders_jit.protect_put; off, the loop or numpy writes protect them).
- policies.fmoe_deadline._LIVE_FAST: _admit's candidates not started yet, and the stale
  ones it cancels, found in comprehensions.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import policies.fmoe_deadline as deadline_mod
import policies.fmoe_orders as orders_mod
import policies.fmoe_victim as victim_mod
from policies.cache import CacheEntry, ExpertState
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from traces.synth import SynthConfig, generate

WALL = {"wall_s", "run_wall_s", "layer_steps_per_s", "bound_wall_s"}
SWITCHES = (
    (victim_mod, "_LIST_KERNEL"),
    (orders_mod, "_FRESH_KERNEL"),
    (orders_mod, "_PROTECT_PUT"),
    (deadline_mod, "_LIVE_FAST"),
)


def _run(
    model: str, hardware: str, experts: int, batch: int, fast: bool, opts: dict, vmin: int
) -> dict:
    spec = load_model(model)
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=0.0, seed=5))
    cfg = SimConfig(
        model=spec,
        hardware=load_hardware(hardware),
        policy="fmoe",
        cache_experts=experts,
        batch_size=batch,
        policy_options=opts,
    )
    old = [getattr(mod, name) for mod, name in SWITCHES]
    old_min = victim_mod.VICTIM_INDEX_MIN
    for mod, name in SWITCHES:
        setattr(mod, name, fast)
    victim_mod.VICTIM_INDEX_MIN = vmin  # 0: the kernel lists every device's victims
    try:
        m = simulate(w, cfg).metrics
    finally:
        for (mod, name), value in zip(SWITCHES, old, strict=True):
            setattr(mod, name, value)
        victim_mod.VICTIM_INDEX_MIN = old_min
    return {k: v for k, v in m.items() if k not in WALL}


@pytest.mark.parametrize(
    ("model", "hardware", "experts", "batch", "opts", "vmin"),
    [
        ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 400, 1, {}, 0),
        ("qwen1.5-moe-a2.7b", "paper-6x3090", 300, 2, {}, 0),
        # small caches (10 experts a GPU): listed by the sort of (score, key, entry)
        ("mixtral-8x7b", "paper-6x3090", 60, 1, {"rank": "p"}, 1 << 30),
        ("qwen1.5-moe-a2.7b", "a100-80gb-pcie4", 300, 1, {"eviction": "paper"}, 0),
    ],
)
def test_fast_glue_gives_the_python_results(
    model: str, hardware: str, experts: int, batch: int, opts: dict, vmin: int
) -> None:
    fast = _run(model, hardware, experts, batch, True, opts, vmin)
    slow = _run(model, hardware, experts, batch, False, opts, vmin)
    assert fast["evictions"] > 50  # victims were listed and chosen
    meta = fast["policy_metadata"]
    assert (
        meta["orders_issued"] > 0
        and meta["orders_rejected_late"] + meta["orders_rejected_value"] > 0
    )
    assert fast == slow


class _Stub(victim_mod.FmoeVictim):
    """FmoeVictim over one cache whose candidates get the given scores (Python listing)."""

    _scores_fast = False

    def __init__(self, cands: dict, scores: dict) -> None:
        cache = type("C", (), {"free": 0, "_cands": cands})()
        self.ctx = type("X", (), {"caches": [cache]})()
        self._score_of = scores
        self._victims_reset()

    def eviction_scores(self, entries: list) -> list[float]:
        return [self._score_of[e.key] for e in entries]


@settings(max_examples=25, deadline=None)
@given(
    scores=st.lists(
        st.sampled_from([0.0, -0.0, 1.5, -2.0, float("inf"), float("-inf"), float("nan")]),
        min_size=0,
        max_size=45,
    ),
    seed=st.integers(0, 1000),
)
def test_python_listing_is_nsmallests(scores: list[float], seed: int) -> None:
    """The victims listed by the sort equal heapq.nsmallest's by (score, key), ties,
    signed zeros and infinities included; NaN scores take nsmallest itself."""
    flat = np.random.default_rng(seed).permutation(100)[: len(scores)].tolist()
    keys = [(f // 10, f % 10) for f in flat]  # distinct, in a random order
    cands = {k: CacheEntry(k, ExpertState.RESIDENT, 0.0, 0.0) for k in keys}
    of = dict(zip(keys, scores, strict=True))
    got = {}
    for on in (True, False):
        old = victim_mod._LIST_KERNEL
        victim_mod._LIST_KERNEL = on
        try:
            stub = _Stub(cands, of)
            stub._victims_load(0)
        finally:
            victim_mod._LIST_KERNEL = old
        got[on] = [(s, e.key) for s, e in stub._vq[0]]
    assert repr(got[True]) == repr(got[False])
