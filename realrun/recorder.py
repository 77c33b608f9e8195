"""RoutingRecorder: collects what a run routed into traces.types Requests.

Rows follow the trace contract: one per token the model processed (the prompt tokens,
then one per decode iteration), so a request with ``output_len`` generated tokens has
``prompt_len + output_len - 1`` rows. Per row and MoE layer: the experts actually
chosen and their weights, the full probability row, the lookahead row (layer l+1's
router on layer l's input; zeros for the last layer), and the token's embedding.
In a batch a request's rows are its own real tokens only (no pad rows), in order, so a
trace recorded at any batch size has the same structure as one recorded one at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from specs.model_spec import ModelSpec
from traces.types import Request, Routing


class RoutingRecorder:
    """Feed a batch at a time: start_request per request, then per iteration
    start_iteration (which request each real row belongs to), embeddings and gate (real
    rows only, in that order), then finish_request per request. Rows of a request are
    contiguous within an iteration (batch row order)."""

    def __init__(self, spec: ModelSpec, lookahead: bool = True) -> None:
        self.spec = spec
        self.lookahead = lookahead
        self.requests: list[Request] = []
        self._open: dict[str, dict] = {}
        self._slices: list[tuple[str, slice]] = []  # the current iteration's rows per request

    def start_request(
        self, request_id: str, prompt_len: int, prompt_text: str | None = None
    ) -> None:
        if request_id in self._open:
            raise RuntimeError(f"request {request_id} is already being recorded")
        self._open[request_id] = {
            "id": request_id,
            "prompt_len": prompt_len,
            "text": prompt_text,
            "iters": [],
        }

    def start_iteration(self, row_requests: Sequence[str]) -> None:
        """A forward starts; ``row_requests[r]`` is real row r's request."""
        L = self.spec.num_moe_layers
        self._slices = []
        start = 0
        for rid, grp in itertools.groupby(row_requests):
            n = len(list(grp))
            if rid not in self._open:
                raise RuntimeError(f"request {rid}: start_request first")
            self._slices.append((rid, slice(start, start + n)))
            self._open[rid]["iters"].append(
                {"emb": None, "ids": [None] * L, "w": [None] * L, "p": [None] * L, "la": [None] * L}
            )
            start += n

    def _split(self, rows: np.ndarray | None):
        for rid, sl in self._slices:
            yield self._open[rid]["iters"][-1], (rows[sl] if rows is not None else None)

    def embeddings(self, rows: np.ndarray) -> None:
        for it, part in self._split(rows):
            it["emb"] = part

    def gate(
        self,
        layer: int,
        ids: np.ndarray,
        weights: np.ndarray,
        probs: np.ndarray | None,
        lookahead: np.ndarray | None,
    ) -> None:
        for field, rows in (("ids", ids), ("w", weights), ("p", probs), ("la", lookahead)):
            for it, part in self._split(rows):
                it[field][layer] = part

    def drop_request(self, request_id: str) -> None:
        """Forget request ``request_id`` without keeping it."""
        self._open.pop(request_id, None)

    def finish_request(
        self, request_id: str, output_len: int, arrival_s: float = 0.0, trim: bool = False
    ) -> Request:
        """Assemble request ``request_id`` (``output_len`` tokens generated) and keep it.
        With ``trim``, forwards after its last token (a finished row the batch still
        ran) are left out."""
        cur = self._open.pop(request_id)
        iters = cur["iters"]
        if trim:
            iters = iters[:output_len]
        if len(iters) != output_len:
            raise RuntimeError(
                f"request {cur['id']}: {len(iters)} forward passes for {output_len} tokens"
            )
        L = self.spec.num_moe_layers

        def stack(field: str, dtype) -> np.ndarray | None:
            per_iter = []
            for it in iters:
                rows = it[field]
                if any(r is None for r in rows):
                    return None
                per_iter.append(np.stack(rows, axis=1))  # [B, L, ...]
            return np.concatenate(per_iter, axis=0).astype(dtype)

        ids = stack("ids", np.int16 if self.spec.num_experts < 2**15 else np.int32)
        if ids is None:
            raise RuntimeError(f"request {cur['id']}: some MoE layer reported no routing")
        emb = [it["emb"] for it in iters]
        embeddings = (
            np.concatenate(emb, axis=0).astype(np.float32)
            if all(e is not None for e in emb)
            else None
        )
        routing = Routing(
            topk_ids=ids,
            topk_weights=stack("w", np.float32),
            gate_probs=stack("p", np.float32),
            embeddings=embeddings,
            lookahead=stack("la", np.float32) if self.lookahead else None,
        )
        assert routing.topk_ids.shape[1] == L
        req = Request(
            request_id=cur["id"],
            arrival_s=arrival_s,
            prompt_len=cur["prompt_len"],
            output_len=output_len,
            routing=routing,
            prompt_text=cur["text"],
            prompt_embedding=embeddings[: cur["prompt_len"]].mean(axis=0)
            if embeddings is not None
            else None,
        )
        self.requests.append(req)
        return req
