"""run_sweep: inline, a spawned process pool and a local Ray give the same rows; plots."""

from __future__ import annotations

import pandas as pd
import pytest

from sim.config import SimConfig
from sim.metrics import WALL_CLOCK_KEYS
from sim.plots import pareto_front, plot_all
from sim.sweep import SweepGrid, expand, run_sweep
from specs.errors import InputError
from specs.presets import load_hardware, load_model
from tests.strategies import random_workload

SPEC = load_model("tiny-mixtral")


def grid(**kw) -> SweepGrid:
    base = SimConfig(model=SPEC, hardware=load_hardware("paper-6x3090"))
    return SweepGrid(base=base, policies=["lru", "lfu"], traces=["w"], cache_experts=[6, 16], **kw)


WORKLOADS = {"w": random_workload(SPEC, num_requests=3, seed=5, max_output=4)}


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in WALL_CLOCK_KEYS if c in df])


def test_expand_orders_jobs_and_checks_names() -> None:
    jobs = expand(grid(), WORKLOADS)
    assert [(j.config.policy, j.config.cache_experts) for j in jobs] == [
        ("lru", 6),
        ("lru", 16),
        ("lfu", 6),
        ("lfu", 16),
    ]
    with pytest.raises(InputError, match="unknown policy"):
        expand(grid().model_copy(update={"policies": ["nope"]}), WORKLOADS)
    with pytest.raises(InputError, match="no such file"):
        expand(grid().model_copy(update={"traces": ["/nonexistent/trace"]}))


def test_process_pool_matches_inline() -> None:
    inline = run_sweep(grid(), workers=1, workloads=WORKLOADS, progress=False)
    pooled = run_sweep(grid(), workers=2, workloads=WORKLOADS, progress=False)
    assert len(inline) == 4
    pd.testing.assert_frame_equal(comparable(inline), comparable(pooled))


def test_ray_local_matches_inline() -> None:
    import ray

    inline = run_sweep(grid(), workers=1, workloads=WORKLOADS, progress=False)
    assert not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_sweep(grid(), ray_address="local", workloads=WORKLOADS, progress=False)
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(comparable(inline), comparable(on_ray))


def test_pareto_front_keeps_undominated_points(tmp_path) -> None:
    pts = pd.DataFrame({"m": [1, 2, 2, 3, 4], "lat": [5.0, 3.0, 4.0, 3.5, 1.0]})
    assert pareto_front(pts, "m", "lat")[["m", "lat"]].values.tolist() == [
        [1, 5.0],
        [2, 3.0],
        [4, 1.0],
    ]
    df = run_sweep(grid(), workloads=WORKLOADS, progress=False)
    paths = plot_all(df, tmp_path)
    assert [p.name for p in paths] == [
        "pareto_latency_memory.png",
        "pareto_tpot_memory.png",
        "hit_rate_vs_cache.png",
        "ttft_tpot_bars.png",
    ]
    assert all(p.stat().st_size > 1000 for p in paths)
