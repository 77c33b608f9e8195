"""The workload data model: requests and their per-token routing.

Rows of a request's routing are the tokens the model processed, in order: the
``prompt_len`` prompt tokens (the prefill iteration), then one row per decode iteration.
A request that generates ``output_len`` tokens runs ``output_len`` iterations (one
prefill, ``output_len - 1`` decodes), so it has ``prompt_len + output_len - 1`` rows.
Layers are MoE layers only (0 .. L-1), as in :class:`calibration.ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec


@dataclass
class Routing:
    """Per-token routing of one request.

    ``topk_ids`` int [T, L, K] and ``topk_weights`` float32 [T, L, K] are required.
    Optional: ``gate_probs`` [T, L, J], the full gate probability rows; ``embeddings``
    [T, H], the embedding layer's output per token; ``lookahead`` [T, L, J], where row
    l is layer l+1's gate applied to the hidden state entering layer l (the last
    layer's row is unused and zero).
    """

    topk_ids: np.ndarray
    topk_weights: np.ndarray
    gate_probs: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    lookahead: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])


@dataclass
class Request:
    """One request: arrival, lengths, optional prompt, and its routing."""

    request_id: str
    arrival_s: float
    prompt_len: int
    output_len: int
    routing: Routing
    prompt_text: str | None = None
    prompt_embedding: np.ndarray | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    @property
    def num_iterations(self) -> int:
        """Forward passes: one prefill plus ``output_len - 1`` decodes."""
        return self.output_len

    def iteration_rows(self, iteration: int) -> slice:
        """Routing rows processed by ``iteration`` (0 = prefill)."""
        if iteration == 0:
            return slice(0, self.prompt_len)
        row = self.prompt_len + iteration - 1
        return slice(row, row + 1)

    def validate(self, spec: ModelSpec, where: str = "") -> None:
        """Raise InputError naming the request, field and row when the routing is malformed."""
        tag = f"{where}request {self.request_id!r}"
        r = self.routing
        L, J, K = spec.num_moe_layers, spec.num_experts, spec.top_k
        if self.prompt_len < 1 or self.output_len < 1:
            raise InputError(f"{tag}: prompt_len and output_len must be >= 1")
        if not np.isfinite(self.arrival_s) or self.arrival_s < 0:
            raise InputError(f"{tag}: arrival_s must be a finite time >= 0")
        T = self.prompt_len + self.output_len - 1
        ids = r.topk_ids
        if ids.ndim != 3 or ids.shape != (T, L, K):
            raise InputError(
                f"{tag}: topk_ids has shape {tuple(ids.shape)}, expected (tokens={T}, layers={L}, top_k={K})"
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{tag}: topk_ids must be integers, got {ids.dtype}")
        bad = np.argwhere((ids < 0) | (ids >= J))
        if len(bad):
            t, layer, k = (int(x) for x in bad[0])
            raise InputError(
                f"{tag}: topk_ids row {t} layer {layer} holds expert {int(ids[t, layer, k])}, not in [0, {J})"
            )
        if K > 1:
            s = np.sort(ids, axis=-1)
            dup = np.argwhere((s[..., 1:] == s[..., :-1]).any(axis=-1))
            if len(dup):
                t, layer = (int(x) for x in dup[0])
                raise InputError(f"{tag}: topk_ids row {t} layer {layer} repeats an expert")
        if r.topk_weights.shape != ids.shape:
            raise InputError(
                f"{tag}: topk_weights shape {tuple(r.topk_weights.shape)} differs from topk_ids {tuple(ids.shape)}"
            )
        if not np.isfinite(r.topk_weights).all():
            raise InputError(f"{tag}: topk_weights holds a non-finite value")
        for name in ("gate_probs", "lookahead"):
            arr = getattr(r, name)
            if arr is not None:
                if arr.shape != (T, L, J):
                    raise InputError(
                        f"{tag}: {name} has shape {tuple(arr.shape)}, expected ({T}, {L}, {J})"
                    )
                if not np.isfinite(arr).all():
                    raise InputError(f"{tag}: {name} holds a non-finite value")
        if r.embeddings is not None and (r.embeddings.ndim != 2 or r.embeddings.shape[0] != T):
            raise InputError(
                f"{tag}: embeddings has shape {tuple(r.embeddings.shape)}, expected ({T}, dim)"
            )
        if self.prompt_embedding is not None and self.prompt_embedding.ndim != 1:
            raise InputError(f"{tag}: prompt_embedding must be a vector")


@dataclass
class Workload:
    """A list of requests for one model, with provenance (source, model, software versions)."""

    spec: ModelSpec
    requests: list[Request]
    provenance: dict[str, Any] = field(default_factory=dict)

    def validate(self, where: str = "") -> None:
        """Check every request against the spec; InputError names the first problem."""
        seen: set[str] = set()
        widths: set[int] = set()
        for req in self.requests:
            if req.request_id in seen:
                raise InputError(f"{where}request id {req.request_id!r} appears twice")
            seen.add(req.request_id)
            req.validate(self.spec, where)
            if req.routing.embeddings is not None:
                widths.add(req.routing.embeddings.shape[1])
        if len(widths) > 1:
            raise InputError(
                f"{where}embeddings have different widths across requests: {sorted(widths)}"
            )

    # -- what the workload carries --------------------------------------------------
    def _all(self, attr: str) -> bool:
        return bool(self.requests) and all(
            getattr(r.routing, attr) is not None for r in self.requests
        )

    @property
    def has_gate_probs(self) -> bool:
        return self._all("gate_probs")

    @property
    def has_embeddings(self) -> bool:
        return self._all("embeddings")

    @property
    def has_lookahead(self) -> bool:
        return self._all("lookahead")

    @property
    def has_prompt_embeddings(self) -> bool:
        return bool(self.requests) and all(r.prompt_embedding is not None for r in self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(r.routing.num_tokens for r in self.requests)

    @property
    def num_iterations(self) -> int:
        return sum(r.num_iterations for r in self.requests)

    def info(self) -> dict[str, Any]:
        """Summary for `fmoe trace info --json`."""
        return {
            "model": self.spec.name,
            "requests": len(self.requests),
            "iterations": self.num_iterations,
            "tokens": self.num_tokens,
            "layers": self.spec.num_moe_layers,
            "experts": self.spec.num_experts,
            "top_k": self.spec.top_k,
            "has_gate_probs": self.has_gate_probs,
            "has_embeddings": self.has_embeddings,
            "has_lookahead": self.has_lookahead,
            "has_prompt_embeddings": self.has_prompt_embeddings,
            "has_prompt_text": bool(self.requests)
            and all(r.prompt_text is not None for r in self.requests),
            "provenance": self.provenance,
        }

    def split(self, train_fraction: float = 0.7, seed: int = 0) -> tuple[Workload, Workload]:
        """Deterministic random split into (train, test), as the paper's 70/30 offline setup."""
        if not 0.0 <= train_fraction <= 1.0:
            raise InputError(f"train_fraction must be in [0, 1], got {train_fraction}")
        order = np.random.default_rng(seed).permutation(len(self.requests))
        n_train = int(round(train_fraction * len(self.requests)))
        train_idx, test_idx = sorted(order[:n_train]), sorted(order[n_train:])
        prov = dict(self.provenance)
        return (
            Workload(
                self.spec,
                [self.requests[i] for i in train_idx],
                {**prov, "split": f"train {train_fraction}"},
            ),
            Workload(
                self.spec,
                [self.requests[i] for i in test_idx],
                {**prov, "split": f"test {1 - train_fraction:.2f}"},
            ),
        )
