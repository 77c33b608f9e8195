"""Shared helpers of the whole-run equivalence tests: one comparable string per run, and
running under an engine setting while counting the compiled paths a run builds.

A compiled path (``sim.engine_fast.FastPath``, ``sim.engine_prefetch.PrefetchPath``) is
held equal to the Python engine by comparing :func:`outcome` of both runs; :func:`engine`
says whether the compiled path actually ran, so an equality cannot pass by both runs
having taken the Python engine.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

from sim import engine_fast
from sim.metrics import WALL_CLOCK_KEYS
from sim.run import SimResult


def outcome(res: SimResult) -> str:
    """Everything a run reports except wall-clock figures, as one comparable string."""
    m = {k: v for k, v in res.metrics.items() if k not in WALL_CLOCK_KEYS}
    frame = res.requests.to_dict(orient="list")
    return json.dumps({"metrics": m, "requests": frame}, sort_keys=True, default=str)


@contextlib.contextmanager
def engine(name: str, path: type = engine_fast.FastPath) -> Iterator[list[Any]]:
    """Run under FMOE_SIM_ENGINE=name; yields the ``path`` objects (a compiled path's
    class: FastPath by default, or PrefetchPath) the runs inside built."""
    built: list[Any] = []
    init = path.__init__

    def spy(self: Any, eng: Any) -> None:
        init(self, eng)
        built.append(self)

    old = os.environ.get(engine_fast.ENGINE_ENV)
    os.environ[engine_fast.ENGINE_ENV] = name
    path.__init__ = spy  # type: ignore[method-assign]
    try:
        yield built
    finally:
        path.__init__ = init  # type: ignore[method-assign]
        if old is None:
            del os.environ[engine_fast.ENGINE_ENV]
        else:
            os.environ[engine_fast.ENGINE_ENV] = old


def both(workload: Any, cfg: Any, path: type = engine_fast.FastPath) -> tuple[str, str, list]:
    """(the Python engine's outcome, the compiled setting's outcome, the ``path`` objects
    the compiled run built): the Python run must build none."""
    from sim.run import simulate

    with engine("python", path) as none:
        ref = outcome(simulate(workload, cfg))
    assert not none
    with engine("compiled", path) as built:
        fast = outcome(simulate(workload, cfg))
    return ref, fast, built


def both_with(
    workload: Any, cfg: Any, path: type, make_policy: Callable[[], Any]
) -> tuple[list[str], list[Any]]:
    """([Python outcome, compiled outcome], [their policies]): each run under its engine
    setting with a fresh policy from ``make_policy`` (e.g. one that records what its
    hooks read); the Python run builds no ``path`` object, the compiled run exactly one."""
    from sim.run import simulate

    outs, policies = [], []
    for name in ("python", "compiled"):
        with engine(name, path) as built:
            pol = make_policy()
            outs.append(outcome(simulate(workload, cfg, policy=pol)))
            policies.append(pol)
        assert len(built) == (name == "compiled")
    return outs, policies
