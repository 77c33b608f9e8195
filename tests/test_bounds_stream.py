"""The bounds out of core (traces/demand_file.py, traces/cachesim_stream.py,
sim/bounds_stream.py) give exactly the in-memory numbers (traces/cachesim.min_run,
sim/bounds.py), and leave nothing on disk."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sim.bounds
from sim.bounds import run_bounds
from sim.config import SimConfig
from sim.metrics import WALL_CLOCK_KEYS
from sim.run import simulate
from tests.strategies import random_workload, small_spec
from tests.test_bounds import seq_of
from tests.test_sim_kit import exact_profile
from tests.test_sim_properties import scenarios
from traces.cachesim import min_run
from traces.cachesim_stream import min_stream
from traces.demand import demand_sequence, next_use
from traces.demand_file import DemandFile, key_dtype


def _spill(steps: list[list[int]], num_keys: int, chunk: int, folder: str) -> DemandFile:
    f = DemandFile(num_keys, folder, chunk_demands=chunk)
    for s in steps:
        f.append(np.array(s, np.int64), np.array([len(s)]))
    f.finish()
    return f


@st.composite
def streamed_cases(draw: st.DrawFn) -> dict:
    """Steps (possibly larger than a cache: waves), 1-3 devices with their capacities, a
    chunk size, a warm start or none, and windows."""
    u = draw(st.integers(2, 12))
    ndev = draw(st.integers(1, 3))
    step = st.sets(st.integers(0, u - 1), min_size=1, max_size=min(u, 6)).map(sorted)
    steps = draw(st.lists(step, min_size=1, max_size=80))
    caps = [draw(st.integers(1, max(1, u // ndev))) for _ in range(ndev)]
    warm = draw(st.booleans())
    initial = [
        np.array(draw(st.lists(st.sampled_from(range(d, u, ndev)), max_size=4)), np.int64)
        if warm and d < u
        else np.zeros(0, np.int64)
        for d in range(ndev)
    ]
    S = len(steps)
    starts = draw(st.lists(st.integers(0, S - 1), max_size=5))
    windows = [(a, draw(st.integers(a + 1, S))) for a in starts]
    chunk = draw(st.integers(1, 40))
    return dict(
        steps=steps, u=u, caps=caps, initial=initial if warm else None, windows=windows, chunk=chunk
    )


@settings(max_examples=40, deadline=None)
@given(case=streamed_cases())
def test_streamed_min_equals_min_run_per_device(case: dict, tmp_path_factory) -> None:
    """The run's MIN per device (cold or warm) and each window's MIN from the best free
    start equal min_run's on the device's own sub-sequence, whatever the chunk size."""
    steps, u, caps = case["steps"], case["u"], case["caps"]
    folder = str(tmp_path_factory.mktemp("spill"))
    ws = np.array([a for a, _ in case["windows"]], np.int64)
    we = np.array([b for _, b in case["windows"]], np.int64)
    with _spill(steps, u, case["chunk"], folder) as f:
        res = min_stream(f, caps, case["initial"], (ws, we))
    seq = seq_of(steps, u)
    for d, cap in enumerate(caps):
        sub = seq.for_device(d, len(caps))
        init = None if case["initial"] is None else case["initial"][d]
        assert (res.hits[d], res.misses[d]) == min_run(sub, cap, initial=init, jit=False)
        for w, (a, b) in enumerate(case["windows"]):
            _, misses = min_run(sub, cap, steps=(a, b), free_start=True, jit=False)
            assert res.window_loads[w, d] == misses


def test_a_long_run_with_few_keys_matches_min_run(tmp_path) -> None:
    """Thousands of steps over a few keys: heaps long past their first fill."""
    rng = np.random.default_rng(7)
    u = 40
    steps = [sorted(set(rng.integers(0, u, rng.integers(1, 9)).tolist())) for _ in range(4000)]
    seq = seq_of(steps, u)
    with _spill(steps, u, 997, str(tmp_path)) as f:
        res = min_stream(f, [5, 3], None, (np.array([100]), np.array([3000])))
    for d, cap in enumerate([5, 3]):
        sub = seq.for_device(d, 2)
        assert (res.hits[d], res.misses[d]) == min_run(sub, cap, jit=True)
        assert (
            res.window_loads[0, d]
            == min_run(sub, cap, steps=(100, 3000), free_start=True, jit=True)[1]
        )


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_the_file_reads_back_the_sequence_and_its_next_uses(data, tmp_path_factory) -> None:
    spec = small_spec(layers=data.draw(st.integers(1, 3)), experts=6, top_k=2)
    w = random_workload(
        spec, num_requests=data.draw(st.integers(1, 5)), seed=data.draw(st.integers(0, 99))
    )
    seq = demand_sequence(w)
    folder = tmp_path_factory.mktemp("spill")
    f = _spill(seq.steps(), seq.num_keys, data.draw(st.integers(1, 50)), str(folder))
    keys, starts, nxts = [], [], []
    for c in f.chunks():
        keys.append(c.keys)
        starts.append(c.step_start[1:] + c.chunk.demand0)
        nxts.append(c.nxt)
    assert np.array_equal(np.concatenate(keys), seq.keys)
    assert np.array_equal(np.concatenate([[0], *starts]), seq.step_start)
    assert np.array_equal(np.concatenate(nxts), next_use(seq))
    # the files are anonymous: no name under the folder even while open, so a killed
    # run leaves nothing behind
    assert not any(folder.iterdir())
    f.close()


def test_keys_take_the_smallest_type() -> None:
    assert key_dtype(256) == np.uint8 and key_dtype(257) == np.uint16
    assert key_dtype(58 * 256) == np.uint16 and key_dtype(2**16 + 1) == np.uint32


@st.composite
def bound_cases(draw: st.DrawFn) -> tuple:
    spec = small_spec(
        layers=draw(st.integers(1, 3)),
        experts=draw(st.integers(2, 8)),
        top_k=draw(st.integers(1, 2)),
    )
    ng = draw(st.integers(1, 3))
    hw = exact_profile(num_gpus=ng, host_cap_Bps=draw(st.sampled_from([None, 1e6])))
    w = random_workload(
        spec,
        num_requests=draw(st.integers(1, 7)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=6,
        max_output=7,
        arrival_gap_s=1e-3,
    )
    arrivals = draw(st.sampled_from(["closed", "trace", "schedule"]))
    if arrivals == "schedule":
        its = sorted(
            draw(st.lists(st.integers(0, 6), min_size=len(w.requests), max_size=len(w.requests)))
        )
        for r, it in zip(w.requests, its, strict=True):
            r.tags["served_iteration"] = it
    LJ = spec.num_moe_layers * spec.num_experts
    caps = [draw(st.integers(1, max(1, LJ // ng))) for _ in range(ng)]
    cfg = SimConfig(
        model=spec,
        hardware=hw,
        cache_experts=sum(caps),
        batch_size=draw(st.integers(1, 3)),
        batching=draw(st.sampled_from(["continuous", "static"])),
        arrivals=arrivals,
    )
    initial = None
    if draw(st.booleans()):
        J = spec.num_experts
        initial = [[(k // J, k % J) for k in range(d, LJ, ng)][: caps[d] + 1] for d in range(ng)]
    return w, cfg, caps, arrivals != "trace", initial


@settings(max_examples=30, deadline=None)
@given(bound_cases())
def test_spilled_bounds_equal_the_in_memory_bounds(case: tuple) -> None:
    """Every bound, bit for bit, over batch sizes, batchers, arrivals (a served trace's
    schedule too), GPUs, warm starts and host caps."""
    w, cfg, caps, closed, initial = case
    a = run_bounds(w, cfg, caps, closed, initial, spill=False)
    b = run_bounds(w, cfg, caps, closed, initial, spill=True)
    for k in ("bound_wall_s",):
        a.pop(k), b.pop(k)
    assert a == b


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_simulation_through_the_file_gives_the_same_json(data) -> None:
    sc = data.draw(scenarios(policy="lru"))
    cfg = sc["config"].model_copy(update={"record_events": False})
    mem = simulate(sc["workload"], cfg).metrics
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sim.bounds, "SPILL_MIN_DEMANDS", 0)
        spilled = simulate(sc["workload"], cfg).metrics
    for k in WALL_CLOCK_KEYS:
        mem.pop(k, None), spilled.pop(k, None)
    assert mem == spilled


def test_no_room_for_the_file_gives_no_bounds_and_says_why(monkeypatch) -> None:
    import specs.limits

    class Usage:
        free = 10

    monkeypatch.setattr(specs.limits.shutil, "disk_usage", lambda _: Usage())
    monkeypatch.setattr(sim.bounds, "SPILL_MIN_DEMANDS", 0)
    spec = small_spec()
    w = random_workload(spec, num_requests=2, seed=0)
    cfg = SimConfig(model=spec, hardware=exact_profile(), cache_experts=6)
    m = simulate(w, cfg).metrics
    assert m["bound_hit_belady"] is None and m["bound_tpot_s"] is None
    assert "disk" in m["bound_note"] and m["hit_rate"] is not None


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_window_past_the_end_is_refused(chunk: int, tmp_path) -> None:
    with _spill([[0], [1]], 2, chunk, str(tmp_path)) as f, pytest.raises(ValueError):
        min_stream(f, [1], None, (np.array([1]), np.array([3])))


def test_an_unwritable_temp_folder_gives_no_bounds_and_says_why(monkeypatch) -> None:
    import tempfile

    def refuse(*_a, **_k):
        raise PermissionError(13, "Permission denied", "/tmp/fmoe-demands-x")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    monkeypatch.setattr(sim.bounds, "SPILL_MIN_DEMANDS", 0)
    spec = small_spec()
    w = random_workload(spec, num_requests=2, seed=0)
    m = simulate(w, SimConfig(model=spec, hardware=exact_profile(), cache_experts=6)).metrics
    assert m["bound_loads_min"] is None and "Permission denied" in m["bound_note"]
