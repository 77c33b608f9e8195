"""Value checks every trace reader and writer shares (issue 25's corrupt-trace classes).

Each check takes ``fail(field, message)``, which raises the one-line InputError that
names the file and field, and runs on flat numpy arrays (no per-row Python work).
Bounds below are sanity limits, not tuned figures; each says why it is where it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec

Fail = Callable[[str, str], NoReturn]

# Routing weights are gate probabilities, times a model's scaling factor where it has one
# (DeepSeek-V3's routed_scaling_factor is 2.5): a weight above 1000 is no model's output.
MAX_WEIGHT = 1000.0
# Probabilities stored at float16 may round a little above 1 (fp16 spacing at 1 is 1e-3).
PROB_TOL = 1e-2
# Above 2^30 s (34 years) float64 seconds keep less than 0.25 us resolution, finer than
# any layer step; larger arrival times are corruption (1e300 s was one accepted class).
MAX_ARRIVAL_S = float(2**30)
# The widest expert id the format stores (uint16).
MAX_EXPERTS = 65535


def check_spec(fail: Fail, spec: ModelSpec) -> None:
    """A spec a trace can be simulated under: experts fit the id type, expert bytes > 0."""
    if spec.num_experts > MAX_EXPERTS:
        fail("spec.num_experts", f"{spec.num_experts} exceeds {MAX_EXPERTS}, the id range")
    if spec.expert_bytes <= 0:
        fail("spec.expert_bytes", f"must be > 0, got {spec.expert_bytes}")
    if spec.num_moe_layers < 1:
        fail("spec.num_layers", "the model has no MoE layers")


def check_raw_spec(fail: Fail, raw: Any) -> None:
    """A stored spec is complete: writers store the derived expert_bytes, so a stored 0
    (which ModelSpec would read as "derive from dimensions") is a corrupt field."""
    if not isinstance(raw, dict):
        fail("spec", "must be a JSON object")
    eb = raw.get("expert_bytes")
    if isinstance(eb, bool) or not isinstance(eb, int) or eb <= 0:
        fail("spec.expert_bytes", f"must be a positive integer, got {eb!r}")


def check_spec_match(path: Any, file_spec: ModelSpec, spec: ModelSpec | None) -> ModelSpec:
    """``spec`` when it has the file's routing dimensions (else InputError), or the file's."""
    if spec is None:
        return file_spec
    for name, a, b in (
        ("num_moe_layers", file_spec.num_moe_layers, spec.num_moe_layers),
        ("num_experts", file_spec.num_experts, spec.num_experts),
        ("top_k", file_spec.top_k, spec.top_k),
    ):
        if a != b:
            raise InputError(
                f"{path}: the trace's {name} is {a} (model {file_spec.name!r}) but the given "
                f"model {spec.name!r} has {b}"
            )
    return spec


def check_ids(
    fail: Fail, ids: np.ndarray, J: int, where: Callable[[int], str], field: str = "topk_ids"
) -> None:
    """Ids in [0, J) and no expert twice in a row (rows [N, L, K])."""
    bad = (ids < 0) | (ids >= J) if ids.dtype.kind == "i" else ids >= J
    if bad.any():
        n, layer, k = (int(x) for x in np.argwhere(bad)[0])
        fail(
            field, f"{where(n)} layer {layer} holds expert {int(ids[n, layer, k])}, not in [0, {J})"
        )
    K = ids.shape[-1]
    for a in range(K):
        for b in range(a + 1, K):
            same = ids[..., a] == ids[..., b]
            if same.any():
                n, layer = (int(x) for x in np.argwhere(same)[0])
                fail(field, f"{where(n)} layer {layer} repeats expert {int(ids[n, layer, a])}")


def _first_row(mask: np.ndarray) -> int:
    return int(np.argwhere(mask)[0][0])


def check_weights(fail: Fail, w: np.ndarray, where: Callable[[int], str]) -> None:
    """Top-K weights finite, >= 0 and <= MAX_WEIGHT."""
    finite = np.isfinite(w)
    if not finite.all():
        fail("topk_weights", f"{where(_first_row(~finite))} holds a non-finite value")
    if (w < 0).any():
        fail("topk_weights", f"{where(_first_row(w < 0))} holds a negative weight")
    if (w > MAX_WEIGHT).any():
        n = _first_row(w > MAX_WEIGHT)
        fail("topk_weights", f"{where(n)} holds a weight above {MAX_WEIGHT:g} (not a gate output)")


def check_probs(fail: Fail, field: str, p: np.ndarray, where: Callable[[int], str]) -> None:
    """Probabilities finite and in [0, 1] (float16 rounding allowed)."""
    finite = np.isfinite(p)
    if not finite.all():
        fail(field, f"{where(_first_row(~finite))} holds a non-finite value")
    out = (p < 0) | (p > 1 + PROB_TOL)
    if out.any():
        fail(field, f"{where(_first_row(out))} holds a probability outside [0, 1]")


def check_finite(fail: Fail, field: str, a: np.ndarray, where: Callable[[int], str]) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        fail(field, f"{where(_first_row(~finite))} holds a non-finite value")


def check_arrivals(fail: Fail, arrivals: np.ndarray) -> np.ndarray | None:
    """Finite, >= 0 and <= MAX_ARRIVAL_S; returns the sorting order when unsorted, else None."""
    bad = ~np.isfinite(arrivals) | (arrivals < 0) | (arrivals > MAX_ARRIVAL_S)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        fail(
            "arrival_s",
            f"request {i}: {float(arrivals[i])!r} is not a time in [0, {MAX_ARRIVAL_S:g}] s",
        )
    if len(arrivals) > 1 and (np.diff(arrivals) < 0).any():
        return np.argsort(arrivals, kind="stable")
    return None


SORT_NOTE = "arrivals were not in order; requests were sorted by arrival time on load"


def check_texts(fail: Fail, texts: Any, R: int) -> None:
    if texts is None:
        return
    if not isinstance(texts, list) or len(texts) != R:
        fail("prompt_texts", f"must be a list of {R} entries")
    for i, t in enumerate(texts):
        if t is not None and not isinstance(t, str):
            fail("prompt_texts", f"entry {i} is a {type(t).__name__}, not a string")


def check_tags(fail: Fail, tags: Any, R: int) -> None:
    if tags is None:
        return
    if not isinstance(tags, list) or len(tags) != R:
        fail("tags", f"must be a list of {R} entries")
    for i, t in enumerate(tags):
        if t is not None and not isinstance(t, dict):
            fail("tags", f"entry {i} is a {type(t).__name__}, not an object")


def check_lengths(fail: Fail, plen: np.ndarray, olen: np.ndarray) -> None:
    for name, arr in (("prompt_len", plen), ("output_len", olen)):
        bad = np.flatnonzero(arr < 1)
        if len(bad):
            fail(name, f"request {int(bad[0])}: must be >= 1")
