"""fMoE's precomputed searches (``IterationStart.gates``) change nothing it decides.

A trace-replaying executor hands the policy every layer's gates at iteration start so it
can run all trajectory searches at once; the orders, predictions, store and eviction
choices must be exactly those of the layer-by-layer search.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationGates, IterationStart
from policies.fmoe import FmoePolicy
from policies.replay import replay
from sim.metrics import WALL_CLOCK_KEYS
from sim.run import simulate
from tests.strategies import random_workload, small_spec, workloads
from tests.test_fmoe_policy import _bind
from tests.test_sim_properties import scenarios


class LayerByLayer(FmoePolicy):
    """fmoe that never takes the gates in advance."""

    precomputes_from_gates = False


def _strip(m: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in m.items() if k not in WALL_CLOCK_KEYS}, sort_keys=True)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_the_simulator_gives_identical_results_with_and_without_the_gates(data) -> None:
    sc = data.draw(scenarios(policy="fmoe"))
    opts = data.draw(
        st.fixed_dictionaries(
            {
                "prediction": st.sampled_from(["traj", "traj+sem", "traj+sem+delta"]),
                "store_capacity": st.sampled_from([2, 50]),
            }
        )
    )
    a, b = FmoePolicy(**opts), LayerByLayer(**opts)
    ra = simulate(sc["workload"], sc["config"], policy=a)
    rb = simulate(sc["workload"], sc["config"], policy=b)
    assert _strip(ra.metrics) == _strip(rb.metrics)
    assert ra.requests.equals(rb.requests)
    assert ra.events.spans == rb.events.spans  # every transfer and compute span, in order
    assert a._pred == b._pred
    assert np.array_equal(a.store.maps, b.store.maps)


@settings(max_examples=25, deadline=None)
@given(wl=workloads(), data=st.data())
def test_replay_makes_the_same_decisions_with_and_without_the_gates(wl, data) -> None:
    setup = {
        "capacity_experts": data.draw(st.integers(wl.spec.top_k, wl.spec.total_experts)),
        "batch_size": data.draw(st.integers(1, 3)),
        "prefetch_distance": data.draw(st.sampled_from([None, 1, 2])),
    }
    if data.draw(st.booleans()):
        setup["training"] = random_workload(wl.spec, num_requests=3, seed=7)
    ra = replay(wl, FmoePolicy(store_capacity=3), record_decisions=True, **setup)
    rb = replay(wl, LayerByLayer(store_capacity=3), record_decisions=True, **setup)
    assert ra.decisions == rb.decisions
    assert ra.counters == rb.counters


def test_a_store_write_in_mid_iteration_falls_back_to_the_layer_by_layer_search() -> None:
    """Gates 0 and 1 from the plan, then the store changes: layers 2.. must be searched
    against the new store exactly as the layer-by-layer policy does."""
    spec = small_spec(layers=6, experts=5, top_k=1, hidden=3)
    L, J = spec.num_moe_layers, spec.num_experts
    rng = np.random.default_rng(3)
    rows = rng.dirichlet(np.ones(J), size=(1, L)).astype(np.float32)
    ids = rows.argmax(axis=2)[..., None]
    w = np.ones_like(ids, dtype=np.float32)
    stored = rng.dirichlet(np.ones(J), size=(4, L)).astype(np.float32)
    extra = rng.dirichlet(np.ones(J), size=(1, L)).astype(np.float32)
    orders = []
    for cls in (FmoePolicy, LayerByLayer):
        pol = cls(prefetch_distance=1, store_capacity=8)
        _bind(pol, spec)
        pol.store.add_batch(stored)
        gates = IterationGates(ids, w, rows) if cls.precomputes_from_gates else None
        pol.on_iteration_start(
            IterationStart(0, ("r",), np.zeros(1, int), np.zeros(1, bool), None, 0.0, gates)
        )
        assert (pol._it.plan is not None) == (cls is FmoePolicy)
        for g in range(L):
            if g == 2:
                pol.store.add_batch(extra)
            pol.on_gate(GateOutput(0, g, ids[:, g], w[:, g], rows[:, g], None, float(g)))
        assert pol._it.plan is None
        pol.on_iteration_end(IterationEnd(0, ("r",), (), float(L)))
        orders.append((pol.decide_prefetch().enqueue, [list(p) for p in pol._pred]))
    assert orders[0] == orders[1]
