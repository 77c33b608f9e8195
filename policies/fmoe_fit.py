"""fMoE's offline preparation (FMOE_ALGORITHM.md step 6 on a training workload) and the
store's file, as a mixin of :class:`policies.fmoe.FmoePolicy`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from policies.fmoe_select import topk_rows
from specs.errors import InputError

FIT_CHUNK_ROWS = 256


class FmoeFit:
    """Fill the expert map store from a training workload; save it."""

    def fit(self, training: Any) -> None:
        """Offline mode: offer every token of every training request to the store, in order.

        Each token's row is (its embedding, else its request's prompt embedding; its gate
        probabilities [L, J], else rows from its top-K ids and weights).
        """
        from traces.types import Workload

        if not isinstance(training, Workload):
            raise InputError(f"policy 'fmoe': fit needs a Workload, got {type(training).__name__}")
        if self.spec is None:
            self._setup(training.spec, None)
        assert self.store is not None and self.spec is not None
        L, J = self.spec.num_moe_layers, self.spec.num_experts
        if (training.spec.num_moe_layers, training.spec.num_experts) != (L, J):
            raise InputError(
                f"policy 'fmoe': training workload is for {training.spec.num_moe_layers} layers x "
                f"{training.spec.num_experts} experts, bound model has {L} x {J}"
            )
        maps: list[np.ndarray] = []
        embs: list[np.ndarray | None] = []
        pending = 0
        for req in training.requests:
            r = req.routing
            T = r.num_tokens
            if r.gate_probs is not None:
                m = np.asarray(r.gate_probs, np.float32)
                self._stats["fit_rows_gate_probs"] += T
            else:
                m = topk_rows(
                    r.topk_ids.reshape(T * L, -1), r.topk_weights.reshape(T * L, -1), J
                ).reshape(T, L, J)
                self._stats["fit_rows_topk_weights"] += T
            if r.embeddings is not None:
                e = np.asarray(r.embeddings, np.float32)
                self._stats["fit_rows_emb_token"] += T
            elif req.prompt_embedding is not None:
                e = np.broadcast_to(
                    np.asarray(req.prompt_embedding, np.float32), (T, req.prompt_embedding.shape[0])
                )
                self._stats["fit_rows_emb_prompt"] += T
            else:
                e = None
                self._stats["fit_rows_emb_none"] += T
            if r.lookahead is not None and self._la_mode is not False:
                self._lookahead_fit(
                    r.topk_ids, r.lookahead
                )  # the cells' precision (fmoe_lookahead)
            maps.append(m)
            embs.append(e)
            pending += T
            if pending >= FIT_CHUNK_ROWS:
                self._fit_chunk(maps, embs)
                maps, embs, pending = [], [], 0
        if maps:
            self._fit_chunk(maps, embs)

    def _fit_chunk(self, maps: list[np.ndarray], embs: list[np.ndarray | None]) -> None:
        assert self.store is not None
        width = next((e.shape[1] for e in embs if e is not None), None)
        emb = None
        if width is not None:
            emb = np.concatenate(
                [
                    e if e is not None else np.zeros((len(m), width), np.float32)
                    for m, e in zip(maps, embs, strict=True)
                ]
            )
        self.store.add_batch(np.concatenate(maps), emb)

    def save_store(self, path: str | Path) -> None:
        """Write the expert map store to ``path`` (.npz, atomic)."""
        if self.store is None:
            raise InputError("policy 'fmoe': no store to save (bind or fit first)")
        self.store.save(path)
