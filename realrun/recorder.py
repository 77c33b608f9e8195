"""RoutingRecorder: collects what a run routed into traces.types Requests.

Rows follow the trace contract: one per token the model processed (the prompt tokens,
then one per decode iteration), so a request with ``output_len`` generated tokens has
``prompt_len + output_len - 1`` rows. Per row and MoE layer: the experts actually
chosen and their weights, the full probability row, the lookahead row (layer l+1's
router on layer l's input; zeros for the last layer), and the token's embedding.
"""

from __future__ import annotations

import numpy as np

from calibration.model_spec import ModelSpec
from traces.types import Request, Routing


class RoutingRecorder:
    """Feed one request at a time: start_request, then per iteration embeddings/gate, finish."""

    def __init__(self, spec: ModelSpec, lookahead: bool = True) -> None:
        self.spec = spec
        self.lookahead = lookahead
        self.requests: list[Request] = []
        self._cur: dict | None = None

    def start_request(
        self, request_id: str, prompt_len: int, prompt_text: str | None = None
    ) -> None:
        self._cur = {"id": request_id, "prompt_len": prompt_len, "text": prompt_text, "iters": []}

    def start_iteration(self) -> None:
        assert self._cur is not None, "start_request first"
        L = self.spec.num_moe_layers
        self._cur["iters"].append(
            {"emb": None, "ids": [None] * L, "w": [None] * L, "p": [None] * L, "la": [None] * L}
        )

    def embeddings(self, rows: np.ndarray) -> None:
        self._cur["iters"][-1]["emb"] = rows

    def gate(
        self,
        layer: int,
        ids: np.ndarray,
        weights: np.ndarray,
        probs: np.ndarray | None,
        lookahead: np.ndarray | None,
    ) -> None:
        it = self._cur["iters"][-1]
        it["ids"][layer], it["w"][layer], it["p"][layer], it["la"][layer] = (
            ids,
            weights,
            probs,
            lookahead,
        )

    def finish_request(self, output_len: int, arrival_s: float = 0.0) -> Request:
        """Assemble the current request (``output_len`` tokens generated) and keep it."""
        cur, self._cur = self._cur, None
        assert cur is not None
        iters = cur["iters"]
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
