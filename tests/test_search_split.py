"""Gate orders that need no search go at once; the search's wait for it (policies/base.py
``on_gate_now``), in the simulator and in fMoE's split of its gate (lookahead picks at
the gate, map picks after the search latency). The real executor's side is in
tests/test_realrun_search_split.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.placement import Placement
from sim.run import simulate
from tests.strategies import small_spec
from tests.test_sim_kit import ScriptPolicy, config, exact_profile, routed_workload

H, LAT = 5e-4, 1e-4
X = LAT + 4e-3  # one copy on an idle link (exact_profile's bandwidth)


def approx(v: float) -> object:
    return pytest.approx(v, rel=1e-12, abs=1e-15)


class NowScript(ScriptPolicy):
    """ScriptPolicy whose ``at_gate_now`` orders are made in on_gate_now (no search)."""

    name = "test-script-now"

    def __init__(self, at_gate_now=None, **kw) -> None:  # noqa: ANN001
        super().__init__(**kw)
        self.at_gate_now = at_gate_now or {}

    def on_gate_now(self, ev: GateOutput) -> None:
        if ev.iteration == 1:
            for o in self.at_gate_now.get(ev.layer, []):
                self.prefetch(*o)


@settings(max_examples=20, deadline=None)
@given(S=st.floats(1e-5, 3e-3), d=st.integers(1, 3), dense=st.sampled_from([8e-3, 1.2e-2]))
def test_a_gate_order_without_search_starts_at_the_gate_and_one_with_waits_for_it(S, d, dense):
    """The same order (layer d's expert 1, ordered at layer 0's gate) from an async policy:
    made in on_gate_now it starts at the gate whatever the search latency S; made in
    on_gate it starts S later (a layer step outlasts a copy and the search: both land
    before their layer's gate)."""
    L = 4
    spec = small_spec(layers=L, experts=2, top_k=1)
    routes = [[0] * L]  # never demanded: the copy's landing is the order's own
    hw = exact_profile(dense_s=dense, expert_s=5e-4, search_s=S)
    pre = [(layer, 0) for layer in range(L)]
    landed = {}
    for where in ("now", "search"):
        kw = {"at_gate_now" if where == "now" else "at_gate": {0: [(d, 1, 1.0)]}}
        pol = NowScript(preload=pre, async_search=True, **kw)
        simulate(
            routed_workload(spec, [{"routes": routes}]),
            config(spec, hw, cache_experts=8),
            policy=pol,
        )
        ((key, by_prefetch, t),) = pol.loads
        assert key == (d, 1) and by_prefetch
        landed[where] = t
    gate0 = H + dense
    assert landed["now"] == approx(gate0 + X)
    assert landed["search"] == approx(gate0 + S + X)


def test_the_searchs_order_queues_behind_the_one_made_at_the_gate():
    """Both at layer 0's gate: the gate's own order (priority 1) starts at once; the
    search's (priority 2, better) arrives S later, finds the link busy and goes next."""
    L, S = 4, 3e-4
    spec = small_spec(layers=L, experts=3, top_k=1)
    hw = exact_profile(dense_s=1e-2, expert_s=5e-4, search_s=S)  # copies land in a step
    pol = NowScript(
        preload=[(layer, 0) for layer in range(L)],
        at_gate_now={0: [(1, 1, 1.0)]},
        at_gate={0: [(2, 2, 2.0)]},
        async_search=True,
    )
    simulate(
        routed_workload(spec, [{"routes": [[0] * L]}]),
        config(spec, hw, cache_experts=12),
        policy=pol,
    )
    gate0 = H + 1e-2
    assert [(k, t) for k, _, t in pol.loads] == [
        ((1, 1), approx(gate0 + X)),
        ((2, 2), approx(gate0 + 2 * X)),
    ]


# -- fMoE's split ----------------------------------------------------------------------------
def _bound(spec, **opts) -> FmoePolicy:
    pol = FmoePolicy(prefetch_distance=2, store_capacity=8, lookahead=True, **opts)
    cache = ExpertCache(capacity=spec.num_moe_layers * spec.num_experts, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [cache]))
    return pol


def _keys(pol: FmoePolicy) -> list[tuple[int, int]]:
    return [o.key for o in pol.decide_prefetch().enqueue]


@settings(max_examples=15, deadline=None)
@given(layers=st.integers(4, 6), experts=st.integers(4, 8), seed=st.integers(0, 2**16))
def test_fmoe_orders_lookahead_picks_without_search_and_map_picks_after_it(layers, experts, seed):
    """fMoE (every selection ordered, lookahead on): at gate g, on_gate_now orders only
    layer g+1 (the lookahead rows' picks: data the gate already has), on_gate only layer
    g+2 (the map search's forecast); together they are what on_gate alone orders."""
    spec = small_spec(layers=layers, experts=experts, top_k=2, hidden=3)
    rng = np.random.default_rng(seed)
    split, whole = _bound(spec, admission="all"), _bound(spec, admission="all")
    saw_now = saw_search = False
    for it in range(6):
        ids = np.stack([rng.permutation(experts)[:2] for _ in range(layers)])
        emb = rng.standard_normal((1, 3)).astype(np.float32)
        for pol in (split, whole):
            pol.on_iteration_start(
                IterationStart(it, ("r",), np.zeros(1, int), np.zeros(1, bool), emb)
            )
            pol.decide_prefetch()
        for g in range(layers):
            probs = rng.dirichlet(np.ones(experts), 1).astype(np.float32)
            look = rng.random((1, experts)).astype(np.float32)
            ev = GateOutput(it, g, ids[g][None, :], np.full((1, 2), 0.5, np.float32), probs, look)
            split.on_gate_now(ev)
            now = _keys(split)
            split.on_gate(ev)
            search = _keys(split)
            whole.on_gate(ev)
            assert sorted(now + search) == sorted(_keys(whole))
            assert all(k[0] == g + 1 for k in now)
            assert all(k[0] == g + 2 for k in search)
            saw_now |= bool(now)
            saw_search |= bool(search)
        for pol in (split, whole):
            pol.on_iteration_end(IterationEnd(it, ("r",), ("r",), float(it)))
    assert saw_now and saw_search


class _SpyFmoe(FmoePolicy):
    """fMoE noting which hook made each order (``now`` or ``search``) and its gate's time."""

    def __init__(self, **kw) -> None:  # noqa: ANN003
        super().__init__(**kw)
        self.phase: tuple[str, float] | None = None
        self.made: list[tuple[tuple[int, int], str, float, int]] = []

    def on_iteration_start(self, ev: IterationStart) -> None:
        self.phase = None
        super().on_iteration_start(ev)

    def on_gate_now(self, ev: GateOutput) -> None:
        self.phase = ("now", ev.now, ev.layer)
        super().on_gate_now(ev)

    def on_gate(self, ev: GateOutput) -> None:
        self.phase = ("search", ev.now, ev.layer)
        super().on_gate(ev)
        self.phase = None

    def prefetch(self, layer: int, expert: int, priority: float) -> None:
        if self.phase is not None:
            self.made.append(((layer, expert), *self.phase))
        super().prefetch(layer, expert, priority)


@pytest.mark.parametrize("admission", ["all", "deadline"])
def test_the_simulator_applies_fmoes_lookahead_orders_at_the_gate_and_map_orders_later(
    admission, monkeypatch
):
    """fMoE on a small synthetic Qwen1.5-MoE workload (the generator's lookahead rows
    name the next layer's experts) with a 1 ms search latency: every order made at a
    gate reaches the links at that gate's time when on_gate_now made it (lookahead picks
    among them), and 1 ms later when the search made it."""
    from sim.engine_setup import EngineSetup
    from specs.presets import load_hardware, load_model
    from traces.synth import SynthConfig, generate

    spec = load_model("qwen1.5-moe-a2.7b")
    w = generate(
        spec,
        SynthConfig(
            num_requests=3, seed=2, prompt_len_mean=6, output_len_mean=6, lookahead_noise=0.0
        ),
    )
    hw = load_hardware("paper-6x3090")
    S = 1e-3
    hw = hw.model_copy(update={"compute": hw.compute.model_copy(update={"policy_search_s": S})})
    applied: list[tuple[float, list[tuple[int, int]]]] = []
    orig = EngineSetup._apply

    def spy(self, dec, stamp, now):  # noqa: ANN001, ANN202
        applied.append((now, [o.key for o in dec.enqueue]))
        return orig(self, dec, stamp, now)

    monkeypatch.setattr(EngineSetup, "_apply", spy)
    pol = _SpyFmoe(admission=admission, lookahead=True)
    from sim.config import SimConfig

    cfg = SimConfig(
        model=spec, hardware=hw, cache_experts=spec.total_experts // 4, train_fraction=0.34
    )
    simulate(w, cfg, policy=pol)
    at = {}
    for now, keys in applied:
        for k in keys:
            at.setdefault(k, []).append(now)
    n_now = n_search = n_look = 0
    for key, phase, t_gate, g in pol.made:
        want = t_gate if phase == "now" else t_gate + S
        assert any(abs(t - want) < 1e-12 for t in at[key]), (key, phase, t_gate)
        n_now += phase == "now"
        n_search += phase == "search"
        n_look += phase == "now" and key[0] == g + 1
    assert n_now > 0 and n_search > 0 and n_look > 0
