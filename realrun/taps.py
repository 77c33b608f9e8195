"""Hooks that read routing out of a running transformers model, without changing it.

- Router tap: a forward hook on each MoE block's router keeps its last logits, turned into
  a probability row by the architecture's adapter.
- Embedding tap: a forward hook on the input embeddings reports each forward's token
  embeddings (the fMoE "semantic embedding") as the iteration starts.
- Experts tap (unmodified models only): a forward pre-hook on ``experts`` sees the exact
  (hidden, top_k_index, top_k_weights) the experts receive, so sigmoid/group-limited
  routers (DeepSeek-V3) are recorded as chosen, not re-derived from logits. Offloaded
  models get the same call from their offloaded experts module instead.
- Lookahead: layer l+1's router applied to the hidden state entering layer l's experts.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from realrun.models import LoadedModel

GateCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""(moe_layer, hidden [T, H], top_k_index [T, K], top_k_weights [T, K])."""


class ModelTaps:
    """Install with :meth:`install`; remove with :meth:`remove`."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._logits: list[torch.Tensor | None] = [None] * len(loaded.blocks)
        self._handles: list[RemovableHandle] = []
        self._suppress = False
        self.on_embeddings: Callable[[torch.Tensor], None] | None = None
        self.on_gate: GateCallback | None = None

    def install(self, experts_prehook: bool = False) -> ModelTaps:
        for b in self.loaded.blocks:
            self._handles.append(b.router.register_forward_hook(self._router_hook(b.moe_layer)))
            if experts_prehook:
                hook = self._experts_hook(b.moe_layer)
                self._handles.append(b.experts.register_forward_pre_hook(hook, with_kwargs=True))
        emb = self.loaded.model.get_input_embeddings()
        self._handles.append(emb.register_forward_hook(self._embedding_hook))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ------------------------------------------------------------------------------
    def _router_hook(self, layer: int):
        def hook(_mod, _args, out):
            if not self._suppress:
                self._logits[layer] = out[0] if isinstance(out, tuple) else out

        return hook

    def _experts_hook(self, layer: int):
        def hook(_mod, args, kwargs):
            if self.on_gate is not None:
                names = ("hidden_states", "top_k_index", "top_k_weights")
                vals = list(args[:3]) + [kwargs[n] for n in names[len(args[:3]) :]]
                self.on_gate(layer, *vals)

        return hook

    def _embedding_hook(self, _mod, _args, out) -> None:
        if self.on_embeddings is not None:
            self.on_embeddings(out)

    # -- reads ------------------------------------------------------------------------------
    def probs(self, layer: int) -> np.ndarray | None:
        """Layer ``layer``'s last probability rows [T, J] (float32), None if its router did not run."""
        logits = self._logits[layer]
        if logits is None:
            return None
        self._logits[layer] = None
        return (
            self.loaded.adapter.probs(logits.detach().reshape(-1, logits.shape[-1])).cpu().numpy()
        )

    def lookahead(self, layer: int, hidden: torch.Tensor) -> np.ndarray:
        """Layer ``layer + 1``'s router on ``hidden`` as probability rows [T, J]; zeros for the last layer."""
        blocks = self.loaded.blocks
        if layer + 1 >= len(blocks):
            return np.zeros((hidden.shape[0], self.loaded.spec.num_experts), dtype=np.float32)
        with self.suppressed(), torch.no_grad():
            out = blocks[layer + 1].router(hidden)
        logits = out[0] if isinstance(out, tuple) else out
        return self.loaded.adapter.probs(logits.reshape(-1, logits.shape[-1])).cpu().numpy()

    @contextmanager
    def suppressed(self):
        """Router calls inside do not overwrite the stashed logits (lookahead calls)."""
        prev, self._suppress = self._suppress, True
        try:
            yield
        finally:
            self._suppress = prev
