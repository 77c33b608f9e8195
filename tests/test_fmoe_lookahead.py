"""fMoE's ``lookahead="auto"``: lookahead rows are used only as far as they are measured right."""

from __future__ import annotations

import dataclasses

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.base import GateOutput, IterationEnd, IterationStart, PolicyContext
from policies.cache import ExpertCache
from policies.fmoe import FmoePolicy
from policies.fmoe_lookahead import ALPHA, mixture_boundary
from policies.placement import Placement
from tests.strategies import small_spec
from traces.types import Workload


def _bound(spec, **opts) -> FmoePolicy:
    pol = FmoePolicy(prefetch_distance=2, store_capacity=4, **opts)
    cache = ExpertCache(capacity=64, expert_bytes=1)
    pol.bind(PolicyContext(spec, Placement(spec.num_moe_layers, spec.num_experts), [cache]))
    return pol


def _orders(pol: FmoePolicy) -> list[tuple[int, int, float]]:
    return [(o.layer, o.expert, o.priority) for o in pol.decide_prefetch().enqueue]


def _iteration(pols, it: int, choices: np.ndarray, looks: np.ndarray, J: int) -> list:
    """One one-row iteration: gate l chooses ``choices[l]`` (K ids) with lookahead row
    ``looks[l]``; returns each policy's orders after every hook."""
    out = [[] for _ in pols]
    for i, pol in enumerate(pols):
        pol.on_iteration_start(IterationStart(it, ("r",), np.zeros(1, int), np.zeros(1, bool)))
        out[i].append(_orders(pol))
        for layer, ids in enumerate(choices):
            probs = np.full((1, J), 0.1 / J, np.float32)
            probs[0, ids] += 0.9 / len(ids)
            ev = GateOutput(
                it, layer, np.array([ids]), np.ones((1, len(ids)), np.float32), probs,
                looks[layer][None, :],
            )  # fmt: skip
            pol.on_gate(ev)
            out[i].append(_orders(pol))
        pol.on_iteration_end(IterationEnd(it, (), now=float(it)))
    return out


@settings(max_examples=20, deadline=None)
@given(
    layers=st.integers(3, 5),
    experts=st.integers(4, 8),  # at least 2K: a top-K that misses all K chosen
    top_k=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_a_lookahead_never_right_orders_what_false_orders(layers, experts, top_k, seed):
    """Rows that put no mass on the next layer's choice score no hits: ``auto`` then
    orders exactly what ``lookahead=false`` orders, hook by hook (``true`` does not)."""
    spec = small_spec(layers=layers, experts=experts, top_k=top_k, hidden=3)
    rng = np.random.default_rng(seed)
    pols = [_bound(spec, lookahead=m) for m in (False, "auto", True)]
    differs_true = False
    for it in range(12):
        choices = np.stack([rng.permutation(experts)[:top_k] for _ in range(layers)])
        looks = rng.random((layers, experts)).astype(np.float32) + 0.1
        looks[:-1][np.arange(layers - 1)[:, None], choices[1:]] = 0.0  # never the next choice
        off, auto, always = _iteration(pols, it, choices, looks, experts)
        assert auto == off
        differs_true |= always != off
    md = pols[1].metadata()
    assert md["lookahead_precision"] == 0.0 and md["lookahead_orders"] == 0
    assert md["lookahead_picks_scored"] == 12 * (layers - 1) * min(top_k, experts)
    assert differs_true  # the rows were there to be used


def test_a_lookahead_always_right_is_ordered_at_its_measured_precision():
    """Rows that name the next layer's choice: after the cell's excess hits pass the
    boundary (not at the first picks) ``auto`` orders layer g+1's pick at gate g with
    priority (hits + K/J) / (picks + 1), all hits here (no map forecast of layer 2: the
    semantic search predicts layers 0-1 only, so the cell's pooled precision is used)."""
    L, J, K = 4, 6, 1
    spec = small_spec(layers=L, experts=J, top_k=K, hidden=3)
    rng = np.random.default_rng(0)
    auto = _bound(spec, lookahead="auto", prediction="sem+delta")
    off = _bound(spec, lookahead=False, prediction="sem+delta")
    first_on = None
    for it in range(60):
        choices = rng.integers(0, J, size=(L, 1))
        looks = np.full((L, J), 0.01, np.float32)
        looks[np.arange(L - 1), choices[1:, 0]] = 0.9
        a, o = _iteration([auto, off], it, choices, looks, J)
        # hook 1 + g is gate g; picks for layer 1 are scored once per earlier iteration
        extra = sorted(set(a[2]) - set(o[2]))  # gate 1's orders beyond false's
        look_orders = [x for x in extra if x[0] == 2]
        if look_orders:
            first_on = first_on if first_on is not None else it
            n = it  # picks of layer 2 scored before this iteration's gate 1, all hits
            assert (2, int(choices[2, 0])) in {(x[0], x[1]) for x in look_orders}
            (p,) = {x[2] for x in look_orders if x[1] == choices[2, 0]}
            assert abs(p - (n + K / J) / (n + 1)) < 1e-12
        elif first_on is not None:
            # on, yet not ordered: only where the map already ordered it in this iteration
            ordered = {(x[0], x[1]) for hook in o[:3] for x in hook}
            assert (2, int(choices[2, 0])) in ordered, f"iteration {it}: the cell went off"
    assert first_on is not None and first_on > 1  # not after the first hit
    md = auto.metadata()
    assert md["lookahead_precision"] == 1.0 and md["lookahead_orders"] > 0


def test_mixture_boundary_holds_chance_cells_and_passes_a_real_excess():
    """Cells of independent picks (hit chance 0.25, checked after every pick) cross the
    boundary in at most about ALPHA of runs; a cell right 3 times in 4 crosses early."""
    rng = np.random.default_rng(1)
    runs, picks, q = 4000, 2000, 0.25
    excess = np.cumsum((rng.random((runs, picks)) < q) - q, axis=1)
    bound = mixture_boundary(np.arange(1, picks + 1), 2.0 * np.log(ALPHA))
    crossed = float(np.mean((excess > bound).any(axis=1)))
    assert crossed <= ALPHA * 1.5  # the bound is conservative; 1.5 x leaves sampling room
    good = np.cumsum((rng.random(picks) < 0.75) - q)
    assert int(np.argmax(good > bound)) < 100
    assert np.all(np.diff(bound) > 0) and np.all(np.diff(bound / np.arange(1, picks + 1)) < 0)


def _sim(workload: Workload, mode: str):
    from sim.config import SimConfig
    from sim.run import simulate
    from specs.presets import load_hardware

    cfg = SimConfig(
        model=workload.spec,
        hardware=load_hardware("paper-6x3090"),
        policy="fmoe",
        policy_options={"lookahead": mode},
        cache_experts=workload.spec.num_moe_layers * workload.spec.num_experts // 4,
        train_fraction=0.5,
    )
    return simulate(workload, cfg).metrics


def test_simulated_noise_rows_leave_auto_as_false_and_right_rows_do_not():
    """Qwen1.5-MoE on the six-GPU testbed: lookahead rows drawn at random (independent of
    the route) give ``auto`` the same run as ``false``, bit for bit; the generator's
    noiseless rows (the next layer's own gate) make ``auto`` order from them."""
    from specs.presets import load_model
    from traces.synth import SynthConfig, generate

    spec = load_model("qwen1.5-moe-a2.7b")
    cfg = SynthConfig(num_requests=4, seed=3, prompt_len_mean=8, output_len_mean=12)
    right = generate(spec, cfg.model_copy(update={"lookahead_noise": 0.0}))
    rng = np.random.default_rng(7)
    noisy = Workload(
        spec,
        [
            dataclasses.replace(
                r,
                routing=dataclasses.replace(
                    r.routing,
                    lookahead=rng.dirichlet(
                        np.ones(spec.num_experts), r.routing.lookahead.shape[:2]
                    ).astype(np.float32),
                ),
            )
            for r in right.requests
        ],
        dict(right.provenance),
    )
    keep = ("tpot_mean_s", "ttft_mean_s", "hit_rate", "prefetches_issued", "stall_s")
    off, auto = _sim(noisy, "false"), _sim(noisy, "auto")
    assert {k: off[k] for k in keep} == {k: auto[k] for k in keep}
    md = auto["policy_metadata"]
    assert md["lookahead_cells_on"].startswith("0/") and md["lookahead_picks_scored"] > 0
    on = _sim(right, "auto")["policy_metadata"]
    assert on["lookahead_orders"] > 0 and on["lookahead_precision"] > 0.9


def test_wants_lookahead_follows_the_option():
    """The real executor computes lookahead rows for ``auto`` (the default) and ``true``."""
    assert FmoePolicy.wants_lookahead and FmoePolicy().wants_lookahead
    assert FmoePolicy(lookahead="true").wants_lookahead
    assert not FmoePolicy(lookahead="false").wants_lookahead
    assert FmoePolicy().options.lookahead == "auto"


def test_a_pick_the_map_also_names_gets_its_parts_measured_precision():
    """With a map forecast of the next layer, a pick's p is the measured precision of
    its part (named by the map's top-K or not), one pseudo-observation at the cell's."""
    L, J, K = 3, 6, 2
    spec = small_spec(layers=L, experts=J, top_k=K, hidden=3)
    pol = _bound(spec, lookahead="auto", admission="all")
    pol.on_iteration_start(IterationStart(0, ("r",), np.zeros(1, int), np.zeros(1, bool)))
    pol.decide_prefetch()
    pol._la_on[2] = [True, True]
    pol._la_p[2] = [0.5, 0.4]
    pol._la_cat_n[:, 2] = [[10, 10], [30, 4]]  # [differs, agrees] x rank
    pol._la_cat_h[:, 2] = [[2, 3], [27, 3]]
    pol._pred[2] = [0.0, 0.6, 0.3, 0.1, 0.0, 0.0]  # the map's top-2: experts 1, 2
    pol._fc_it[2] = pol._cur_it
    pol._lookahead_measured_orders(pol._it, 2, np.array([[1, 4]]))  # 1 agrees, 4 differs
    got = {(o.layer, o.expert): o.priority for o in pol.decide_prefetch().enqueue}
    assert got == {(2, 1): (27 + 0.5) / 31, (2, 4): (3 + 0.4) / 11}
    pol._fc_it[2] = -1  # no forecast of layer 2 this iteration: the cells' precisions
    pol._it.issued[:] = False
    pol._lookahead_measured_orders(pol._it, 2, np.array([[1, 4]]))
    got = {(o.layer, o.expert): o.priority for o in pol.decide_prefetch().enqueue}
    assert got == {(2, 1): 0.5, (2, 4): 0.4}
