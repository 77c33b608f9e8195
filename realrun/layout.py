"""ExpertLayout: how one expert's tensors are packed into one flat byte row.

A transformers experts module keeps every expert of a layer in fused 3D parameters
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], sometimes biases). Every parameter
whose first dimension is E is per-expert; the layout packs expert e's slices of all of
them into one byte row (each slice aligned to :data:`ALIGN` bytes), so moving an expert
is one copy and a pool of such rows can be viewed back as fused tensors [S, ...].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specs.errors import InputError

ALIGN = 64  # bytes; keeps every slice as aligned as the library's own fused tensors


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class ParamSlice:
    """One per-expert parameter inside the packed row."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # one expert's shape (without the E dimension)
    offset: int  # bytes from the row start
    nbytes: int


@dataclass(frozen=True)
class ExpertLayout:
    """Packed layout of one layer's experts. ``row_bytes`` is a multiple of ALIGN."""

    num_experts: int
    params: tuple[ParamSlice, ...]
    row_bytes: int

    @classmethod
    def of_module(cls, experts: nn.Module) -> ExpertLayout:
        """The layout of an experts module's per-expert parameters.

        Raises InputError when the module has no ``num_experts`` or no 3D per-expert weight.
        """
        n = getattr(experts, "num_experts", None)
        if not isinstance(n, int) or n < 1:
            raise InputError(
                f"{type(experts).__name__} has no num_experts attribute; not a fused experts module"
            )
        params: list[ParamSlice] = []
        offset = 0
        for name, p in experts.named_parameters(recurse=False):
            if p.dim() < 2 or p.shape[0] != n:
                continue
            nbytes = p[0].numel() * p.element_size()
            params.append(ParamSlice(name, p.dtype, tuple(p.shape[1:]), offset, nbytes))
            offset = _align(offset + nbytes)
        if not any(len(s.shape) == 2 for s in params):
            raise InputError(f"{type(experts).__name__} holds no fused per-expert weight matrices")
        return cls(num_experts=n, params=tuple(params), row_bytes=max(offset, ALIGN))

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views [S, *shape] of a uint8 tensor [S, >= row_bytes]; no copy."""
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] < self.row_bytes:
            raise ValueError(
                f"expected uint8 rows [S, >= {self.row_bytes}], got {rows.dtype} {tuple(rows.shape)}"
            )
        out = {}
        for s in self.params:
            flat = rows[:, s.offset : s.offset + s.nbytes].view(s.dtype)
            out[s.name] = flat.view(rows.shape[0], *s.shape)
        return out

    def pack_expert(self, experts: nn.Module, expert: int, row: torch.Tensor) -> None:
        """Copy expert ``expert``'s slices of the module's fused parameters into ``row`` (uint8 [row_bytes])."""
        for s in self.params:
            src = getattr(experts, s.name).data[expert].contiguous().view(torch.uint8).reshape(-1)
            row[s.offset : s.offset + s.nbytes].copy_(src)

    def expert_bytes_of(self, experts: nn.Module, expert: int) -> list[memoryview]:
        """The raw bytes of expert ``expert``'s slices with their padding, in row order (for file writes)."""
        out: list[memoryview] = []
        pos = 0
        for s in self.params:
            if s.offset > pos:
                out.append(memoryview(bytes(s.offset - pos)))
            t = getattr(experts, s.name).data[expert].contiguous().view(torch.uint8).reshape(-1)
            out.append(memoryview(t.numpy()))
            pos = s.offset + s.nbytes
        if self.row_bytes > pos:
            out.append(memoryview(bytes(self.row_bytes - pos)))
        return out
