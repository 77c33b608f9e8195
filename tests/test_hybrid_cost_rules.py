"""The cost rules of the hybrid policies (issue 22): Fiddler's static placement, and
fmoe-hybrid's eviction order and prefetch admission against Fiddler's rule."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import CpuState, IterationStart, LinkState, PolicyContext
from policies.cache import CacheEntry, ExpertCache, ExpertState
from policies.fiddler import Fiddler
from policies.fmoe_hybrid import FmoeHybrid
from policies.placement import Placement
from specs.model_spec import FORMAT_BITS
from tests.strategies import small_spec

L, J = 6, 4
SPEC = small_spec(layers=L, experts=J, top_k=1, hidden=3)


class CpuView:
    """An ExecutorView with fixed figures and a CPU."""

    def __init__(self, copy_s: float, layer_s: float, cpu: CpuState, queued_s: float = 0.0):
        self.copy_s, self.layer_s, self.cpu, self.queued_s = copy_s, layer_s, cpu, queued_s

    def link_state(self, device: int) -> LinkState:
        return LinkState(self.queued_s, 1e9, self.copy_s)

    def layer_time_s(self, tokens: int) -> float:
        return self.layer_s

    def cpu_state(self) -> CpuState | None:
        return self.cpu


def _entry(key: tuple[int, int], last_used: float) -> CacheEntry:
    return CacheEntry(key, ExpertState.RESIDENT, 0.0, last_used)


def _with_placement(pol, placed: dict[tuple[int, int], int]) -> None:
    """Give ``pol`` (a HotPlacement) a placement with these training counts."""
    counts = np.zeros((L, J), np.int64)
    for k, n in placed.items():
        counts[k] = n
    pol._hot_counts = counts
    pol.placed = set(placed)
    pol._placed_base = {k: 1e12 + float(n) for k, n in placed.items()}


@settings(max_examples=30, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.integers(0, L - 1), st.integers(0, J - 1)),
        st.integers(1, 1000),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=8),
)
def test_fiddler_evicts_fetched_experts_first_then_the_least_used_placed(placed, uses):
    pol = Fiddler()
    _with_placement(pol, placed)
    fetched = [(L - 1 - i % L, J - 1) for i in range(len(uses))]
    fetched = [k for k in dict.fromkeys(fetched) if k not in placed]
    entries = [_entry(k, t) for k, t in zip(fetched, uses, strict=False)]
    entries += [_entry(k, 0.0) for k in placed]
    scores = pol.eviction_scores(entries)
    order = [e.key for _, e in sorted(zip(scores, entries, strict=True), key=lambda se: se[0])]
    n = len([e for e in entries if e.key not in placed])
    assert set(order[:n]) == {e.key for e in entries if e.key not in placed}
    placed_order = order[n:]
    assert [placed[k] for k in placed_order] == sorted(placed[k] for k in placed_order)


def test_fmoe_hybrid_evicts_as_fiddler_without_forecasts_and_keeps_forecasts_last():
    placed = {(0, 0): 5, (1, 1): 9}
    fid, hyb = Fiddler(), FmoeHybrid()
    for pol in (fid, hyb):
        _with_placement(pol, placed)
    hyb._protect = set()
    entries = [_entry((2, 2), 3.0), _entry((3, 3), 1.0), _entry((0, 0), 0.0), _entry((1, 1), 0.0)]
    assert hyb.eviction_scores(entries) == fid.eviction_scores(entries)
    hyb._protect = {(3, 3)}  # fMoE forecasts (3, 3) for a layer still ahead
    scores = hyb.eviction_scores(entries)
    assert max(scores) == scores[1]  # the forecast expert goes last
    assert scores[0] < scores[2] < scores[3]  # the rest in Fiddler's order


def _bound(view: CpuView) -> FmoeHybrid:
    pol = FmoeHybrid(store_capacity=4, prefetch_distance=2)
    cache = ExpertCache(capacity=64, expert_bytes=1)
    pol.bind(PolicyContext(SPEC, Placement(L, J), [cache], executor=view))
    m = np.full((1, L, J), 0.02, np.float32)
    m[0, np.arange(L), np.arange(L) % J] = 0.94
    pol.store.add_batch(m, np.eye(3, dtype=np.float32)[:1])
    emb = np.eye(3, dtype=np.float32)[:1]
    pol.on_iteration_start(IterationStart(0, ("r0",), np.zeros(1, int), np.zeros(1, bool), emb))
    return pol


def test_fmoe_hybrid_prefetches_only_when_the_saving_exceeds_the_cost():
    # a CPU task costs 2 copies: a timely copy onto an idle link saves a copy's time
    cheap = _bound(CpuView(1e-3, 1e-3, CpuState(0.0, 0.0, 2e-3, copy_slowdown=0.0)))
    assert {o.key for o in cheap.decide_prefetch().enqueue} == {(0, 0), (1, 1)}
    # the copy's host memory reads cost the (always busy) CPU 90% of a copy: more than
    # the uninformed chance of use (K/J) times the copy it saves
    dear = _bound(CpuView(1e-3, 1e-3, CpuState(0.0, 0.0, 2e-3, copy_slowdown=0.9)))
    assert dear.decide_prefetch().enqueue == []
    assert dear.metadata()["hybrid_prefetch"]["value"] == 2


def test_fmoe_hybrid_never_queues_a_prefetch_behind_other_copies():
    busy = _bound(CpuView(1e-4, 1e-3, CpuState(0.0, 0.0, 2e-3), queued_s=1e-4))
    assert busy.decide_prefetch().enqueue == []
    assert busy.metadata()["hybrid_prefetch"]["busy_link"] == 2


def test_fmoe_hybrid_miss_rule_is_fiddlers():
    for cpu_s, want in ((2e-3, "fetch"), (5e-4, "cpu")):
        view = CpuView(1e-3, 1e-3, CpuState(0.0, 0.0, cpu_s))
        hyb, fid = _bound(view), Fiddler()
        fid.bind(PolicyContext(SPEC, Placement(L, J), [ExpertCache(8, 1)], executor=view))
        assert hyb.miss_action((3, 1), 1, 0.0).value == want
        assert fid.miss_action((3, 1), 1, 0.0).value == want


def test_q4_k_m_is_llama_cpps_mix_between_q4_k_and_q6_k():
    assert FORMAT_BITS["int4"] < FORMAT_BITS["q4_k_m"] < 210 * 8 / 256
    # gate and up Q4_K, down half Q6_K: 4.84375 bits per weight
    assert abs(FORMAT_BITS["q4_k_m"] - 4.84375) < 1e-9
    spec = small_spec(layers=2, experts=4, top_k=1, hidden=256)
    assert (
        spec.with_weight_format("q4_k_m").expert_bytes
        > spec.with_weight_format("int4").expert_bytes
    )


def test_fmoe_hybrid_reads_forecasts_kept_as_an_array_too():
    hyb = FmoeHybrid()
    _with_placement(hyb, {(0, 0): 5})
    entries = [_entry((2, 2), 3.0), _entry((3, 3), 1.0), _entry((0, 0), 0.0)]
    hyb._prot = np.zeros((L, J), np.bool_)  # fMoE keeping its protected experts as an array
    plain = hyb.eviction_scores(entries)
    hyb._prot[3, 3] = True
    scores = hyb.eviction_scores(entries)
    assert max(scores) == scores[1] and plain[1] < plain[2]
