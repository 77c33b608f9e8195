"""Miss-ratio curves (traces.mrc, traces.cachesim stacks) against separate simulations.

Each curve's point at a size is checked against the project's ExpertCache run at that
size alone (LRU with its own recency scorer, LFU with run-wide counts) or against MIN at
that size (min_run, itself checked against a brute force in test_bounds), at every size
that holds a whole layer step (smaller sizes run steps in waves, see traces.cachesim).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.cache import ExpertCache, ExpertState, lru_scores
from tests.hostile import Outcome, run_cli
from tests.strategies import random_workload, small_spec
from traces.cachesim import hits_by_capacity, min_run
from traces.demand import DemandSequence, demand_sequence
from traces.io import save_workload
from traces.mrc import global_curves, miss_ratio_curves, per_layer_curves


def expert_cache_hits(seq: DemandSequence, capacity: int, policy: str) -> int:
    """Hits of an ExpertCache of ``capacity`` slots loading on demand, as the simulator
    drives it per layer step: demand and pin the step's keys, load the misses, use."""
    cache = ExpertCache(capacity, 1)
    uses: dict[tuple[int, int], int] = defaultdict(int)

    def lfu_scores(entries):  # run-wide uses, then recency (the lfu policy, scope=run)
        return [uses[e.key] * 1e9 + e.last_used for e in entries]

    scores = lru_scores if policy == "lru" else lfu_scores
    hits = 0
    for s, step in enumerate(seq.steps()):
        keys = [(0, k) for k in step]
        missing = []
        for key in keys:
            if cache.demand_and_pin(key) is ExpertState.RESIDENT:
                hits += 1
            else:
                missing.append(key)
        for key in missing:
            cache.begin_load(key, float(s), prefetch=False, scores=scores, pin=True)
            cache.finish_load(key, float(s))
        for key in keys:
            cache.use(key, float(s), unpin=True)
            uses[key] += 1
    return hits


@st.composite
def workloads(draw: st.DrawFn):
    spec = small_spec(
        layers=draw(st.integers(1, 3)), experts=draw(st.integers(2, 6)), top_k=1
    ).model_copy()
    k = draw(st.integers(1, spec.num_experts))
    spec = spec.model_copy(update={"top_k": k, "name": f"{spec.name}-k{k}"})
    return random_workload(
        spec,
        num_requests=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        max_prompt=draw(st.integers(1, 3)),
        max_output=8,
        with_probs=False,
        with_embeddings=False,
    )


def _whole_step_sizes(seq: DemandSequence, sizes: np.ndarray) -> np.ndarray:
    biggest = int(seq.step_sizes().max())
    return sizes[sizes >= biggest]


@settings(max_examples=25, deadline=None)
@given(workloads())
def test_global_curves_match_separate_simulations(w) -> None:
    seq = demand_sequence(w)
    curves = {c.policy: c for c in global_curves(seq, w.spec.top_k)}
    sizes = curves["lru"].cache_experts
    assert sizes[0] == w.spec.top_k and sizes[-1] == w.spec.total_experts
    for size in _whole_step_sizes(seq, sizes):
        i = int(np.flatnonzero(sizes == size)[0])
        assert curves["lru"].hits[i] == expert_cache_hits(seq, int(size), "lru")
        assert curves["lfu"].hits[i] == expert_cache_hits(seq, int(size), "lfu")
        assert curves["min"].hits[i] == min_run(seq, int(size))[0]
        assert curves["min"].hits[i] >= max(curves["lru"].hits[i], curves["lfu"].hits[i])
    # every expert fits: only first uses miss
    assert (
        curves["min"].hits[-1]
        == curves["lru"].hits[-1]
        == seq.num_demands - len(set(seq.keys.tolist()))
    )


@settings(max_examples=20, deadline=None)
@given(workloads())
def test_per_layer_curves_sum_separate_per_layer_simulations(w) -> None:
    spec = w.spec
    L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
    seq = demand_sequence(w)
    curves = {c.policy: c for c in per_layer_curves(seq, L, K)}
    assert list(curves["lru"].cache_experts) == [L * k for k in range(K, J + 1)]
    subs = [seq.for_layer(layer, J) for layer in range(L)]
    for i, k in enumerate(range(K, J + 1)):
        if any(int(s.step_sizes().max()) > k for s in subs):
            continue
        for p in ("lru", "lfu"):
            assert curves[p].hits[i] == sum(expert_cache_hits(s, k, p) for s in subs)
        assert curves["min"].hits[i] == sum(min_run(s, k)[0] for s in subs)


@settings(max_examples=25, deadline=None)
@given(workloads(), st.integers(1, 40))
def test_out_of_core_curves_equal_the_in_memory_ones(w, chunk: int) -> None:
    """miss_ratio_curves spills the demands and reads them back in chunks of about
    ``chunk`` demands; every point equals the one-pass curves of the sequence in memory."""
    seq = demand_sequence(w)
    L, K = w.spec.num_moe_layers, w.spec.top_k
    want = global_curves(seq, K) + per_layer_curves(seq, L, K)
    got = miss_ratio_curves(w, chunk_demands=chunk)
    assert [(c.scope, c.policy) for c in got] == [(c.scope, c.policy) for c in want]
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(a.cache_experts, b.cache_experts)
        assert np.array_equal(a.hits, b.hits) and a.demands == b.demands


def test_lru_stack_is_a_recency_stack() -> None:
    """A cyclic pattern over c + 1 keys: LRU misses every time at size c, MIN does not."""
    steps = [[k] for k in [0, 1, 2] * 6]
    keys = np.array([s[0] for s in steps], np.int32)
    seq = DemandSequence(keys, np.arange(len(steps) + 1, dtype=np.int64), 3)
    lru, opt = hits_by_capacity(seq, "lru"), hits_by_capacity(seq, "min")
    assert lru[2] == 0 and lru[3] == 15
    # Belady with 2 slots: 3 cold misses, then hit and miss alternate over the other 15
    assert opt[2] == 8
    assert opt[2] == min_run(seq, 2)[0]


def test_curves_cover_both_scopes_and_policies() -> None:
    w = random_workload(small_spec(layers=2, experts=4), num_requests=3, seed=4)
    curves = miss_ratio_curves(w)
    assert {(c.scope, c.policy) for c in curves} == {
        (s, p) for s in ("global", "per-layer") for p in ("lru", "lfu", "min")
    }
    for c in curves:
        assert np.all(np.diff(c.hits) >= 0)  # more slots never lose hits (stack algorithms)


def _fmoe(*args: str) -> Outcome:
    """`fmoe ARGS` in this process (a subprocess per call cost seconds of imports)."""
    return run_cli(list(args), timeout_s=300)


def test_cli_writes_csv_and_png(tmp_path: Path) -> None:
    w = random_workload(small_spec(layers=2, experts=4), num_requests=3, seed=2)
    trace = tmp_path / "t.trace"
    save_workload(w, trace)
    r = _fmoe("trace", "mrc", str(trace), "--out", str(tmp_path / "out"), "--json")
    assert r.code == 0, r.stderr
    info = json.loads(r.stdout)
    rows = list(csv.DictReader(open(info["csv"])))
    assert {row["scope"] for row in rows} == {"global", "per-layer"}
    g = [row for row in rows if row["scope"] == "global" and row["policy"] == "min"]
    assert [int(row["cache_experts"]) for row in g] == list(range(2, 9))
    assert Path(info["png"]).read_bytes()[:4] == b"\x89PNG"


def test_cli_names_a_missing_trace(tmp_path: Path) -> None:
    r = _fmoe("trace", "mrc", str(tmp_path / "none.trace"), "--out", str(tmp_path))
    assert r.code == 2
    assert "none.trace" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("scope", ["global", "per-layer"])
def test_cli_scope_flag(tmp_path: Path, scope: str) -> None:
    w = random_workload(small_spec(layers=2, experts=4), num_requests=2, seed=1)
    trace = tmp_path / "t.trace"
    save_workload(w, trace)
    r = _fmoe("trace", "mrc", str(trace), "--out", str(tmp_path), "--scope", scope, "--json")
    assert r.code == 0, r.stderr
    assert {s["scope"] for s in json.loads(r.stdout)["summary"]} == {scope}
