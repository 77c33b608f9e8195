"""fMoE's MIN labels (policies/fmoe_min_jit.py, policies/fmoe_minlabel.py): the labeller
is Belady's MIN (its friendly labels are MIN's hits), and the option changes nothing
when off."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@settings(max_examples=30, deadline=None)
@given(
    num_keys=st.integers(2, 16),
    steps=st.integers(1, 80),
    step_max=st.integers(1, 3),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_friendly_labels_are_mins_hits(
    num_keys: int, steps: int, step_max: int, extra: int, seed: int
) -> None:
    """Each hit of MIN is the next demand of exactly one earlier demand, which MIN kept:
    the labels' sum is min_run's hits, at every capacity that holds a step."""
    from policies.fmoe_min_jit import min_labels
    from traces.cachesim import min_run
    from traces.demand import DemandSequence

    rng = np.random.default_rng(seed)
    step_max = min(step_max, num_keys)
    sizes = rng.integers(1, step_max + 1, steps)
    keys = np.concatenate([np.sort(rng.choice(num_keys, s, replace=False)) for s in sizes])
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    seq = DemandSequence(keys.astype(np.int32), start, num_keys)
    capacity = step_max + extra
    label = min_labels(keys.astype(np.int64), start, num_keys, capacity)
    hits, _ = min_run(seq, capacity, jit=False)
    assert set(np.unique(label).tolist()) <= {0, 1}
    assert int(label.sum()) == hits


def test_min_labels_off_keeps_the_compiled_victim_choice() -> None:
    from policies.fmoe import FmoePolicy
    from specs.presets import load_model

    spec = load_model("mixtral-8x7b")
    off = FmoePolicy()
    off._setup(spec, None)
    on = FmoePolicy(min_labels="time")
    on._setup(spec, None)
    assert off._scores_fast and not off._ml_on and not hasattr(off, "_mrate")
    assert not on._scores_fast and on._ml_on
