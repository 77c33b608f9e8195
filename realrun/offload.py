"""Offloaded experts: swap each MoE block's fused ``experts`` for a slot-backed stand-in.

:func:`offload_model` moves every layer's experts into an :class:`ExpertStore` (dropping
the fused parameters layer by layer) and puts an :class:`OffloadedExperts` in the block's
``experts`` attribute. That module keeps the library's own experts module as a *shell*
(no weights) and, per call, points the shell's fused tensors at views of a device slot
pool and calls the library forward on them: no expert math is rewritten.

Exactness. The eager library forward adds expert outputs into zeros in ascending expert
order. Called on a slot view, it adds in ascending *slot* order. :func:`run_on_slots`
therefore uses one call over the whole pool only when that cannot change a sum: when
every token has at most two experts (a + b == b + a exactly) or the slots of the
experts used ascend with their ids; otherwise it calls the library once per expert on a
one-slot view, in ascending expert order, and adds the results in that same order, which
is the library's own summation. Logits then match the unmodified model bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from realrun.layout import ExpertLayout
from realrun.models import LoadedModel
from realrun.store import ExpertStore, build_store
from specs.errors import InputError


class LayerRunner(Protocol):
    """What an OffloadedExperts delegates to (the session attached to the model)."""

    def run_layer(
        self,
        mod: OffloadedExperts,
        hidden: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor: ...


class OffloadedExperts(nn.Module):
    """Stands in for a fused experts module; forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, moe_layer: int, shell: nn.Module, layout: ExpertLayout) -> None:
        super().__init__()
        self.moe_layer = moe_layer
        self.shell = shell
        self.layout = layout
        self.num_experts = layout.num_experts
        self.runner: LayerRunner | None = None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.runner is None:
            raise RuntimeError(
                "offloaded experts have no session attached; use realrun.session.RunSession"
            )
        return self.runner.run_layer(self, hidden_states, top_k_index, top_k_weights)

    def call_on_view(
        self,
        views: dict[str, torch.Tensor],
        num_slots: int,
        hidden: torch.Tensor,
        index: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """The library's experts forward with its fused tensors set to ``views`` ([num_slots, ...])."""
        shell = self.shell
        for name, v in views.items():
            shell.__dict__[name] = v  # plain attributes: the Parameters were removed
        shell.num_experts = num_slots
        return shell(hidden, index, weights)


@dataclass
class SlotView:
    """The slots one device offers a layer: its fused views and the slot of each expert used."""

    views: dict[str, torch.Tensor]
    num_slots: int
    device: torch.device
    slot_of: dict[int, int]  # expert -> slot, for this device's experts in this call
    device_index: int = 0


def single_call_is_exact(top_k: int, views: Sequence[SlotView]) -> bool:
    """True when one library call per device sums every token's experts like the original.

    With at most two experts per token every sum has at most two terms (exact in any
    order); otherwise one device must hold all experts, in slots ascending with their ids.
    """
    if top_k <= 2:
        return True
    if len(views) != 1:
        return False
    slots = [views[0].slot_of[e] for e in sorted(views[0].slot_of)]
    return all(a < b for a, b in zip(slots, slots[1:], strict=False))


def run_on_slots(
    mod: OffloadedExperts,
    views: Sequence[SlotView],
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """One library call per device over its whole pool, expert ids remapped to slots."""
    out: torch.Tensor | None = None
    E = mod.num_experts
    for v in views:
        lut = torch.full((E + 1,), v.num_slots, dtype=top_k_index.dtype)
        lut[list(v.slot_of)] = torch.tensor(list(v.slot_of.values()), dtype=top_k_index.dtype)
        idx = lut.to(top_k_index.device)[top_k_index.clamp(0, E)]
        part = _on_device(mod, v.views, v.num_slots, v.device, hidden, idx, top_k_weights)
        out = part if out is None else out + part
    assert out is not None
    return out


def run_one_expert(
    mod: OffloadedExperts,
    view: SlotView,
    expert: int,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Expert ``expert``'s contribution alone: the library forward on a one-slot view."""
    slot = view.slot_of[expert]
    one = {k: t[slot : slot + 1] for k, t in view.views.items()}
    idx = torch.where(top_k_index == expert, 0, 1)
    return _on_device(mod, one, 1, view.device, hidden, idx, top_k_weights)


def _on_device(
    mod: OffloadedExperts,
    views: dict[str, torch.Tensor],
    num_slots: int,
    device: torch.device,
    hidden: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    if hidden.device == device:
        return mod.call_on_view(views, num_slots, hidden, idx, weights)
    out = mod.call_on_view(views, num_slots, hidden.to(device), idx.to(device), weights.to(device))
    return out.to(hidden.device)


@dataclass
class OffloadedModel:
    """A loaded model whose experts live in ``store``; attach a RunSession to run it."""

    loaded: LoadedModel
    store: ExpertStore
    modules: list[OffloadedExperts]
    dense_device: torch.device

    def close(self) -> None:
        self.store.close()


MIN_TRANSFORMERS = (5, 18)
"""The first transformers whose eager experts forward skips index ``num_experts`` (its
``one_hot`` has ``num_experts + 1`` classes): the executor marks "no expert in this call"
with that index (pad rows, experts of another device or wave). 5.17's forward raises
"Class values must be smaller than num_classes" on it."""


def check_transformers(version: str | None = None) -> None:
    """InputError unless transformers (``version``, default the installed one) is at
    least :data:`MIN_TRANSFORMERS`."""
    if version is None:
        import transformers

        version = transformers.__version__
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise InputError(
            f"transformers {version}: offloaded experts need >= {need} (its experts "
            "forward must skip index num_experts)"
        )


def offload_model(
    loaded: LoadedModel,
    store: str = "auto",
    store_dir: str | Path | None = None,
    dense_device: torch.device | str = "cpu",
) -> OffloadedModel:
    """Replace every MoE block's experts with OffloadedExperts over a new store.
    InputError on a transformers older than :data:`MIN_TRANSFORMERS`.

    ``store='auto'`` picks a pinned RAM store for CUDA and the safetensors file store on the
    CPU (where a RAM store would hold every expert twice next to the slots). The model's
    remaining (dense) weights move to ``dense_device``.
    """
    check_transformers()
    dense_device = torch.device(dense_device)
    kind = store if store != "auto" else ("ram" if dense_device.type == "cuda" else "file")
    experts = [b.experts for b in loaded.blocks]
    st = build_store(kind, experts, pin=dense_device.type == "cuda", directory=store_dir)
    modules = []
    for b, lay in zip(loaded.blocks, st.layouts, strict=True):
        mod = OffloadedExperts(b.moe_layer, b.experts, lay)
        b.block.experts = mod
        b.experts = mod
        modules.append(mod)
    loaded.model.to(dense_device)
    return OffloadedModel(loaded, st, modules, dense_device)
