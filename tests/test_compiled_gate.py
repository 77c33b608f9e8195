"""A policy's compiled gate (policies.compiled_gate) inside the prefetching kernel: the
kernel calls it in place of returning to the policy's gate hooks, with the same results
as those hooks on both engines (deepspeed's twin, policies.deepspeed_jit; promoe's,
policies.promoe_jit); it is taken
only where it describes the hooks that would run, and a malformed gate stops the run."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from numba import njit

from policies.compiled_gate import CompiledGate
from policies.deepspeed import DeepSpeed
from policies.mixtral_offloading import MixtralOffloading
from policies.promoe import ProMoE
from sim import engine_prefetch
from sim.config import SimConfig
from sim.engine_prefetch_rules import GATE_ENV
from sim.run import simulate
from specs.presets import load_hardware, load_model
from tests.sim_compare import engine, outcome
from tests.test_engine_prefetch import runs
from traces.synth import SynthConfig, generate

PATH = engine_prefetch.PrefetchPath


def _counting(cls: type) -> type:
    """``cls`` counting its Python gate calls (an instance attribute wraps on_gate, so the
    class still offers its compiled gate: no hook is overridden below it)."""

    class Counted(cls):  # type: ignore[misc, valid-type]
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.gates = 0
            hook = super().on_gate

            def counted(ev: Any) -> None:
                self.gates += 1
                hook(ev)

            self.on_gate = counted  # type: ignore[method-assign]

    Counted.__name__ = f"Counted{cls.__name__}"
    return Counted


CountedGates = _counting(DeepSpeed)
CountedProMoE = _counting(ProMoE)
CountedMixtral = _counting(MixtralOffloading)


def _gate_setting(value: str | None) -> Any:
    old = os.environ.get(GATE_ENV)

    class _Ctx:
        def __enter__(self) -> None:
            if value is None:
                os.environ.pop(GATE_ENV, None)
            else:
                os.environ[GATE_ENV] = value

        def __exit__(self, *exc: object) -> None:
            if old is None:
                os.environ.pop(GATE_ENV, None)
            else:
                os.environ[GATE_ENV] = old

    return _Ctx()


def _three_ways(
    w: Any, cfg: SimConfig, make: Any = CountedGates, must_run: bool = True
) -> tuple[list[str], list]:
    """Outcomes and policies of: the Python engine; the compiled path with the policy's
    Python gate hooks (FMOE_SIM_GATE=python); the compiled path with its compiled gate
    (``must_run``: the path ran; else a run it cannot take falls back)."""
    outs, pols = [], []
    for eng_name, gate in (("python", None), ("compiled", "python"), ("compiled", None)):
        with engine(eng_name, PATH) as built, _gate_setting(gate):
            pol = make()
            outs.append(outcome(simulate(w, cfg, policy=pol)))
            pols.append(pol)
        if must_run or eng_name == "python":
            assert len(built) == (eng_name == "compiled"), "the compiled path did not run"
        if built:
            assert (built[0].gate is not None) == (gate is None)
            pol.delayed = built[0]._eng.delayed_orders  # the engine's count (no metric)
            if not must_run:  # a hypothesis example: which runs took the path
                event(f"compiled path, gate {'compiled' if gate is None else 'python'}")
    return outs, pols


@pytest.mark.parametrize(
    ("hardware", "cache_gb", "batch"),
    [("paper-6x3090", 24.0, 1), ("paper-6x3090", 12.0, 3), ("a100-80gb-pcie4", 8.0, 1)],
)
def test_deepspeeds_compiled_gate_gives_its_hooks_results(
    hardware: str, cache_gb: float, batch: int
) -> None:
    """Mixtral-8x7B (six GPUs at batch 1 and 3, one GPU): the compiled gate's run equals
    the Python hooks' on both engines, and no gate returns to Python."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware(hardware)
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=5))
    cfg = SimConfig(
        model=spec, hardware=hw, policy="deepspeed", cache_gb=cache_gb, batch_size=batch
    )
    outs, pols = _three_ways(w, cfg)
    assert outs[0] == outs[1] == outs[2]
    assert pols[0].gates > 0 and pols[1].gates == pols[0].gates
    assert pols[2].gates == 0  # every gate ran in the kernel
    assert '"prefetch_orders": 0' not in outs[2]


@settings(max_examples=15, deadline=None)
@given(runs())
def test_compiled_gate_on_random_runs(run: tuple[Any, SimConfig]) -> None:
    """Random small runs of deepspeed (made-up models, 1-3 GPUs, chunked preemption,
    batches): the three settings agree."""
    w, cfg = run
    cfg = cfg.model_copy(update={"policy": "deepspeed", "train_fraction": None})
    outs, _ = _three_ways(w, cfg, DeepSpeed, must_run=False)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize(
    ("hardware", "cache_gb", "batch", "train"),
    [
        ("paper-6x3090", 24.0, 1, None),
        ("paper-6x3090", 12.0, 3, 0.5),
        ("a100-80gb-pcie4", 8.0, 1, 0.5),
        ("a100-80gb-pcie4", 16.0, 2, None),
    ],
)
def test_promoes_compiled_gate_gives_its_hooks_results(
    hardware: str, cache_gb: float, batch: int, train: float | None
) -> None:
    """Mixtral-8x7B (six GPUs, one GPU; batches; trained on a split or learning online
    only): promoe's compiled gate gives the Python hooks' results on both engines, no
    gate returns to Python, and its online learning still sees every iteration."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware(hardware)
    w = generate(spec, SynthConfig(num_requests=4, arrival_rate=2.91, seed=5))
    cfg = SimConfig(
        model=spec, hardware=hw, policy="promoe", cache_gb=cache_gb, batch_size=batch,
        train_fraction=train,
    )  # fmt: skip
    outs, pols = _three_ways(w, cfg, CountedProMoE)
    assert outs[0] == outs[1] == outs[2]
    assert pols[0].gates > 0 and pols[1].gates == pols[0].gates
    assert pols[2].gates == 0  # every gate ran in the kernel
    assert pols[2]._online_tokens == pols[0]._online_tokens > 0
    assert '"prefetch_orders": 0' not in outs[2]


@settings(max_examples=15, deadline=None)
@given(
    runs(),
    st.sampled_from([None, 1, 2]),
    st.sampled_from([None, 1, 3]),
    st.booleans(),
    st.sampled_from([0.0, 0.1, 2.0]),
)
def test_promoes_compiled_gate_on_random_runs(
    run: tuple[Any, SimConfig],
    stride: int | None,
    top_n: int | None,
    online: bool,
    smoothing: float,
) -> None:
    """Random small runs of promoe (made-up models, 1-3 GPUs, chunked preemption,
    batches, strides, top-n, smoothing 0 or not, online or not): the three settings
    agree."""
    w, cfg = run
    cfg = cfg.model_copy(update={"policy": "promoe"})

    def make() -> ProMoE:
        return ProMoE(stride=stride, top_n=top_n, online=online, smoothing=smoothing)

    outs, _ = _three_ways(w, cfg, make, must_run=False)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize(
    ("hardware", "cache_gb", "batch", "look"),
    [
        ("paper-6x3090", 24.0, 1, True),
        ("paper-6x3090", 12.0, 3, True),
        ("a100-80gb-pcie4", 8.0, 1, True),
        ("paper-6x3090", 24.0, 2, False),
    ],
)
def test_mixtral_offloadings_compiled_gate_gives_its_hooks_results(
    hardware: str, cache_gb: float, batch: int, look: bool
) -> None:
    """Mixtral-8x7B (six GPUs, one GPU; batches; with lookahead rows and without): the
    compiled gate gives the Python hook's results and metadata (gate and speculation
    counts) on both engines, and no gate returns to Python."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware(hardware)
    w = generate(spec, SynthConfig(num_requests=3, arrival_rate=2.91, seed=5))
    if not look:
        for r in w.requests:
            r.routing.lookahead = None
    assert w.has_lookahead == look
    cfg = SimConfig(
        model=spec, hardware=hw, policy="mixtral-offloading", cache_gb=cache_gb,
        batch_size=batch,
    )  # fmt: skip
    outs, pols = _three_ways(w, cfg, CountedMixtral)
    assert outs[0] == outs[1] == outs[2]
    assert pols[0].gates > 0 and pols[1].gates == pols[0].gates
    assert pols[2].gates == 0  # every gate ran in the kernel
    metas = [p.metadata() for p in pols]
    assert metas[0] == metas[1] == metas[2]
    assert metas[2]["gates"] == pols[0].gates
    assert (metas[2]["gates_with_lookahead"] > 0) == look
    assert ('"prefetch_orders": 0' in outs[2]) == (not look)


@settings(max_examples=15, deadline=None)
@given(runs(), st.sampled_from([None, 1, 3]), st.integers(0, 2**16), st.booleans())
def test_mixtral_offloadings_compiled_gate_on_random_runs(
    run: tuple[Any, SimConfig], top_k: int | None, seed: int, share: bool
) -> None:
    """Random small runs of mixtral-offloading with random lookahead rows (float32 on a
    coarse grid: ties and zeros), top-k 1, 3 or the model's, per-layer share or not:
    the three settings agree."""
    w, cfg = run
    rng = np.random.default_rng(seed)
    for r in w.requests:
        shape = (r.routing.topk_ids.shape[0], cfg.model.num_moe_layers, cfg.model.num_experts)
        r.routing.lookahead = (rng.integers(0, 4, shape) / 4).astype(np.float32)
    cfg = cfg.model_copy(update={"policy": "mixtral-offloading", "train_fraction": None})

    def make() -> MixtralOffloading:
        return MixtralOffloading(prefetch_top_k=top_k, per_layer_share=share)

    outs, pols = _three_ways(w, cfg, make, must_run=False)
    assert outs[0] == outs[1] == outs[2]
    assert pols[0].metadata() == pols[2].metadata()


class OverridesOnGate(DeepSpeed):
    def on_gate(self, ev: Any) -> None:  # a subclass's own gate: the offer no longer holds
        super().on_gate(ev)


def test_the_gate_is_taken_only_where_it_describes_the_hooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No compiled gate for a subclass overriding on_gate, without the whole-layer fetch,
    or under FMOE_SIM_GATE=python; the runs still take the path."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=6))
    cfg = SimConfig(model=spec, hardware=hw, policy="deepspeed", cache_gb=24.0)
    cases: list[tuple[Any, bool]] = [
        (DeepSpeed(), True),
        (OverridesOnGate(), False),
        (DeepSpeed(whole_layer=False), False),
    ]
    for pol, taken in cases:
        with engine("compiled", PATH) as built:
            simulate(w, cfg, policy=pol)
        assert len(built) == 1 and (built[0].gate is not None) == taken, type(pol).__name__
    monkeypatch.setenv(GATE_ENV, "python")
    with engine("compiled", PATH) as built:
        simulate(w, cfg, policy=DeepSpeed())
    assert built[0].gate is None
    monkeypatch.delenv(GATE_ENV)


class SlowCounted(CountedGates):
    """deepspeed whose on_gate orders wait for the profile's search latency (timed
    calls, as fMoE's do); its compiled gate's orders wait in the kernel."""

    async_search = True


@pytest.mark.parametrize("batch", [1, 3])
def test_a_compiled_gates_orders_wait_for_the_search(batch: int) -> None:
    """With a search latency the compiled gate's on_gate orders are timed calls in the
    kernel: the same results and delayed-order count as the Python hooks' on both
    engines (batch 3 with a small cache: timed calls outgrow the buffers)."""
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    assert hw.compute.policy_search_s > 0
    w = generate(spec, SynthConfig(num_requests=2, arrival_rate=2.91, seed=7))
    cfg = SimConfig(
        model=spec, hardware=hw, policy="deepspeed", cache_gb=24.0 if batch == 1 else 12.0,
        batch_size=batch,
    )  # fmt: skip
    outs, pols = _three_ways(w, cfg, SlowCounted)
    assert outs[0] == outs[1] == outs[2]
    assert pols[2].gates == 0 < pols[0].gates
    assert pols[2].delayed == pols[1].delayed > 0


@njit(cache=False)
def _bad_gate(pi, pf, layer, now, ids, look, ki, kf, gi, ordk, ordp, nout):  # noqa: ANN001, ANN202
    ordk[0] = -1  # not a key
    ordp[0] = 1.0
    nout[1] = 1
    return 0


class BadGate(DeepSpeed):
    def compiled_gate(self) -> CompiledGate:
        return CompiledGate(_bad_gate, np.zeros(1, np.int64), np.zeros(1, np.float64))


def test_a_malformed_gate_stops_the_run() -> None:
    spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
    w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=6))
    cfg = SimConfig(model=spec, hardware=hw, policy="deepspeed", cache_gb=24.0)
    with engine("compiled", PATH), pytest.raises(RuntimeError, match="compiled gate"):
        simulate(w, cfg, policy=BadGate())


def test_gate_state_arrays_are_checked() -> None:
    with pytest.raises(ValueError, match="1-D C-order"):
        CompiledGate(_bad_gate, np.zeros(2, np.int32), np.zeros(1, np.float64))
    with pytest.raises(ValueError, match="1-D C-order"):
        CompiledGate(_bad_gate, np.zeros(2, np.int64), np.zeros((2, 2), np.float64)[:, 0])


_PROBE = """
import os
os.environ["FMOE_SIM_ENGINE"] = "compiled"
from sim.config import SimConfig
from sim.run import simulate
from specs.presets import load_hardware, load_model
from traces.synth import SynthConfig, generate
from sim import fastkernel_prefetch as fk
from policies import deepspeed_jit, mixtral_offloading_jit, promoe_jit
spec, hw = load_model("mixtral-8x7b"), load_hardware("paper-6x3090")
w = generate(spec, SynthConfig(num_requests=1, arrival_rate=2.91, seed=8))
for policy in ("deepspeed", "promoe", "mixtral-offloading"):
    simulate(w, SimConfig(model=spec, hardware=hw, policy=policy, cache_gb=24.0))
gates = (deepspeed_jit.whole_layer_gate, promoe_jit.stride_gate,
         mixtral_offloading_jit.lookahead_gate)
for f in (fk.iteration_gate, *gates):
    print(sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()))
"""


def test_the_gate_kernel_stays_in_numbas_disk_cache() -> None:
    """A new process loads the kernel that takes a compiled gate, and the gates
    (deepspeed's, promoe's, mixtral-offloading's), from numba's disk cache (a gate is a function value, not
    compiled into the kernel): the second of two processes compiles none of them."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for _ in range(2):  # the first may compile (a fresh checkout) and write the cache
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env,
            cwd=root, check=True, timeout=600,
        ).stdout.split()  # fmt: skip
    # the kernel (one entry for every policy's gate), deepspeed's gate, promoe's, and
    # mixtral-offloading's
    assert list(map(int, out[-8:])) == [1, 0] * 4
