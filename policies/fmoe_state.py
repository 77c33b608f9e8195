"""fMoE's per-iteration search state: the running search of one batch's rows and the
plan of every layer's search precomputed from gates known in advance (see :mod:`policies.fmoe`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _inv_sqrt(x: np.ndarray) -> np.ndarray:
    """1 / sqrt(x) for x >= 0; a huge finite value at 0, which only ever multiplies zeros."""
    return 1.0 / np.sqrt(np.maximum(x, 1e-30))


# a plan holds three [L, B, size] float32 arrays: past this many elements (e.g. a long
# prompt's prefill) the search runs layer by layer instead
PLAN_MAX_ELEMENTS = 4_000_000


@dataclass
class _SearchPlan:
    """Every layer's trajectory search of one iteration, done at its start from the gates
    the executor knew in advance (``IterationStart.gates``). Each value is bitwise what the
    layer-by-layer search in :meth:`FmoePolicy.on_gate` computes; it is used while the
    gates arrive in layer order and the store is unchanged, else dropped for that path."""

    rows: np.ndarray  # [B, L, J] gate rows
    cum_dots: np.ndarray  # [L, B, n] running dot products after layer l
    cum_norm2: np.ndarray  # [L, B] squared norm of the prefix 0..l
    best: np.ndarray  # [L - d, B] best stored row after layer l (layers predicting one)
    score: np.ndarray  # [L - d, B] its match score (float32)
    n: int  # store size (and version below) the plan is exact for
    version: int
    next_layer: int = 0  # layers consumed in order so far
    # one decode row, per gate g: the map row predicted for layer g + d, the experts
    # selected from it (best first), their priorities p / d (in the same order) and both
    # as arrays (int64, float64) for the orders' kernel
    targets: (
        list[tuple[list[float], list[int], list[float], tuple[np.ndarray, np.ndarray]]] | None
    ) = None
    # and the table rows of each predicted row's experts (eviction statistics) [L - d, J]
    fc_rows: np.ndarray | None = None


@dataclass
class _IterState:
    """Search state of one iteration's B token rows."""

    iteration: int
    rows: int  # B
    query: np.ndarray | None  # [B, E] prepared embeddings (zero rows where unknown)
    observed: np.ndarray  # [B, L, J] gate rows seen so far
    seen: list[bool]  # [L]: a list, read and set per gate (cheaper than numpy scalars)
    sem: np.ndarray  # [B, C] cosine with stored embeddings (valid [:, :size])
    dots: np.ndarray  # [B, C] running trajectory dot products
    norm2: np.ndarray  # [B] squared norm of the observed prefix
    version: int  # store version the vectors are exact for
    # [L, J]: experts ordered (or made candidates) this iteration, and a memoryview of it
    # for one-key reads and writes (numpy's scalar indexing costs more)
    issued: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.bool_))
    issued_mv: memoryview = field(init=False, repr=False)
    plan: _SearchPlan | None = None  # the precomputed searches, when the gates were known

    def __post_init__(self) -> None:
        if self.issued.shape != self.observed.shape[1:]:
            self.issued = np.zeros(self.observed.shape[1:], np.bool_)
        self.issued_mv = memoryview(self.issued)
