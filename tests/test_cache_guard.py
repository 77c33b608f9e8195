"""PolicyContext.cache_guard: the real executor's caches change on its copy threads (and,
for an async policy, while the searcher thread runs the policy), so a policy step that
reads several fields of a cache at once (fMoE's admission reads a cache's candidate
arrays and then its entries) holds the executor's lock for that step. A race there once
raised IndexError in fmoe_victim._victims_listed under load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from policies.base import IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.fmoe_deadline import FmoeDeadline
from policies.placement import Placement
from tests.strategies import small_spec


def test_fmoe_admission_runs_with_the_executors_cache_lock_held(monkeypatch):
    held: list[bool] = []
    lock = threading.Lock()
    real_admit = FmoeDeadline._admit

    def spy(self, g):
        held.append(lock.locked())
        return real_admit(self, g)

    monkeypatch.setattr(FmoeDeadline, "_admit", spy)
    spec = small_spec(layers=3, experts=6, top_k=2)
    pol = FmoePolicy(store_capacity=8)
    caches = [ExpertCache(6, 1)]
    place = Placement(spec.num_moe_layers, spec.num_experts)

    class View:  # just enough of an executor view for deadline admission
        def link_state(self, device):
            from policies.base import LinkState

            return LinkState(0.0, 1e9, 1e-3)

        def layer_time_s(self, tokens):
            return 1e-3

        def cpu_state(self):
            return None

    pol.bind(PolicyContext(spec, place, caches, executor=View(), cache_guard=lock))
    pol.on_iteration_start(IterationStart(0, ("r",), np.arange(1), np.ones(1, bool)))
    assert held and all(held)  # every admission pass ran under the lock
    assert not lock.locked()  # and released it


def test_without_a_guard_fmoe_keeps_its_own_admission():
    """The simulator passes none: the bound method stays the class's (no wrapper cost)."""
    spec = small_spec(layers=3, experts=6, top_k=2)
    pol = FmoePolicy(store_capacity=8)
    pol.bind(
        PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [ExpertCache(6, 1)])
    )
    assert "_admit" not in vars(pol)


@pytest.mark.usefixtures("one_torch_thread")
def test_the_real_executor_hands_its_residency_lock_to_the_policy():
    from realrun.models import load
    from realrun.offload import offload_model
    from realrun.session import RunSession, SessionOptions

    loaded = load("tiny-mixtral")
    om = offload_model(loaded, store="ram")
    pol = FmoePolicy(store_capacity=8)
    with RunSession(om, pol, SessionOptions(12)) as s:
        assert pol.ctx.cache_guard is s.res.lock
        assert "_admit" in vars(pol)  # wrapped at bind
        s.generate("req", loaded.tokenizer.encode("What is MoE?"), 2)
