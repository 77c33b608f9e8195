"""Host-side expert stores: where offloaded experts live when they are not in a slot.

Two stores behind one interface (:class:`ExpertStore`):

- :class:`RamStore`: one packed uint8 tensor [E, row_bytes] per MoE layer in host memory,
  pinned when the experts are copied to CUDA devices (so copies can be asynchronous).
- :class:`FileStore`: a safetensors file (one U8 tensor ``layers.<l>.experts.<e>`` per
  expert) written once at start; copies read an expert's bytes with ``os.preadv``
  straight into the slot. On a CPU-only machine the slots and the host store would share
  the same RAM, so this store keeps each expert in memory once (page cache, not process
  memory).

Both are built from the model's fused experts modules one layer at a time, and the fused
parameters are dropped from the module as soon as their layer is stored, so peak memory
stays near the model's own size.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from realrun.layout import ExpertLayout
from specs.errors import InputError


def strip_expert_params(experts: nn.Module, layout: ExpertLayout) -> None:
    """Remove the fused per-expert parameters from ``experts`` so their memory is freed."""
    for s in layout.params:
        experts._parameters.pop(s.name, None)


class ExpertStore(ABC):
    """Packed experts of every MoE layer. ``layouts[l]`` describes layer l's rows."""

    kind: str = ""

    def __init__(self, layouts: Sequence[ExpertLayout]) -> None:
        self.layouts = list(layouts)

    @property
    def row_bytes(self) -> int:
        """The largest packed expert row over layers (slot pools are sized by it)."""
        return max(lay.row_bytes for lay in self.layouts)

    @property
    def total_bytes(self) -> int:
        return sum(lay.row_bytes * lay.num_experts for lay in self.layouts)

    @abstractmethod
    def read_into(self, layer: int, expert: int, lo: int, hi: int, dst: torch.Tensor) -> None:
        """Copy bytes [lo, hi) of (layer, expert)'s row into ``dst`` (CPU uint8, hi - lo bytes)."""

    def host_row(self, layer: int, expert: int) -> torch.Tensor | None:
        """The expert's packed row as a host tensor when the store keeps one, else None."""
        return None

    def read_row(self, layer: int, expert: int) -> torch.Tensor:
        """A new CPU tensor holding the expert's whole packed row."""
        n = self.layouts[layer].row_bytes
        row = torch.zeros(n, dtype=torch.uint8)
        self.read_into(layer, expert, 0, n, row)
        return row

    def close(self) -> None:
        """Release resources (files); idempotent."""


class RamStore(ExpertStore):
    """Experts in host memory.

    Packed (default when ``pin``; pinned for CUDA): each layer is packed into a uint8
    tensor [E, row_bytes], one layer at a time, the fused parameters dropped right after,
    so moving an expert is one (asynchronous, from pinned memory) transfer. Unpacked (the
    CPU default): host memory is where the fused tensors already are, so the store adopts
    them as they are (no copy, no extra memory) and reads a row as its parameter slices.
    """

    kind = "ram"

    def __init__(
        self, experts_modules: Sequence[nn.Module], pin: bool = False, packed: bool | None = None
    ) -> None:
        layouts = [ExpertLayout.of_module(m) for m in experts_modules]
        super().__init__(layouts)
        self.pinned = pin
        self.packed = pin if packed is None else packed
        if pin and not self.packed:
            raise ValueError("a pinned store must be packed")
        self._rows: list[torch.Tensor] = []
        self._fused: list[dict[str, torch.Tensor]] = []
        for mod, lay in zip(experts_modules, layouts, strict=True):
            if self.packed:
                rows = torch.empty(
                    lay.num_experts, lay.row_bytes, dtype=torch.uint8, pin_memory=pin
                )
                for e in range(lay.num_experts):
                    lay.pack_expert(mod, e, rows[e])
                self._rows.append(rows)
            else:
                self._fused.append({s.name: getattr(mod, s.name).data for s in lay.params})
            strip_expert_params(mod, lay)  # the fused Parameters go before the next layer is packed

    def read_into(self, layer: int, expert: int, lo: int, hi: int, dst: torch.Tensor) -> None:
        if self.packed:
            dst.copy_(self._rows[layer][expert, lo:hi])
            return
        for s in self.layouts[layer].params:  # the slices of [lo, hi) that hold a parameter
            a, b = max(lo, s.offset), min(hi, s.offset + s.nbytes)
            if a < b:
                src = self._fused[layer][s.name][expert].view(-1).view(torch.uint8)
                dst[a - lo : b - lo].copy_(src[a - s.offset : b - s.offset])

    def host_row(self, layer: int, expert: int) -> torch.Tensor | None:
        return self._rows[layer][expert] if self.packed else None


class FileStore(ExpertStore):
    """Experts in a safetensors spill file, read with ``os.preadv``.

    The file is created in ``directory`` (default: the system temp dir), unlinked as soon as
    it is open (so nothing is left behind even if the process dies) unless ``keep`` is set.
    """

    kind = "file"

    def __init__(
        self,
        experts_modules: Sequence[nn.Module],
        directory: str | Path | None = None,
        keep: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        layouts = [ExpertLayout.of_module(m) for m in experts_modules]
        super().__init__(layouts)
        directory = Path(directory) if directory else Path(tempfile.gettempdir())
        if not directory.is_dir():
            raise InputError(f"expert store directory {directory} does not exist")
        fd, name = tempfile.mkstemp(prefix="fmoe-experts-", suffix=".safetensors", dir=directory)
        self.path = Path(name)
        self._data_start, self._offsets = _write_safetensors(
            fd, experts_modules, layouts, metadata or {}
        )
        self._fd: int | None = os.open(name, os.O_RDONLY)
        if not keep:
            os.unlink(name)
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def read_into(self, layer: int, expert: int, lo: int, hi: int, dst: torch.Tensor) -> None:
        if self._fd is None:
            raise RuntimeError("expert store is closed")
        view = memoryview(dst.numpy())
        pos = self._data_start + self._offsets[layer][expert] + lo
        want = hi - lo
        while want:  # preadv may return short reads
            n = os.preadv(self._fd, [view[hi - lo - want :]], pos)
            if n <= 0:
                raise OSError(f"short read from expert store {self.path}")
            pos += n
            want -= n

    def close(self) -> None:
        if self._fd is not None:
            self._finalizer()
            self._fd = None


def _write_safetensors(
    fd: int, modules: Sequence[nn.Module], layouts: Sequence[ExpertLayout], metadata: dict[str, str]
) -> tuple[int, list[list[int]]]:
    """Write every expert's packed row as a U8 tensor, layer by layer, stripping each layer.

    The header is known before any data (sizes only), so the file streams out and each
    layer's fused parameters are dropped right after they are written.
    """
    header: dict[str, object] = {"__metadata__": {"format": "fmoe-packed-experts", **metadata}}
    offsets: list[list[int]] = []
    pos = 0
    for layer, lay in enumerate(layouts):
        row = []
        for e in range(lay.num_experts):
            header[f"layers.{layer}.experts.{e}"] = {
                "dtype": "U8",
                "shape": [lay.row_bytes],
                "data_offsets": [pos, pos + lay.row_bytes],
            }
            row.append(pos)
            pos += lay.row_bytes
        offsets.append(row)
    header["__metadata__"]["layouts"] = json.dumps(  # type: ignore[index]
        [
            [(s.name, str(s.dtype), list(s.shape), s.offset, s.nbytes) for s in lay.params]
            for lay in layouts
        ]
    )
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for mod, lay in zip(modules, layouts, strict=True):
            for e in range(lay.num_experts):
                for chunk in lay.expert_bytes_of(mod, e):
                    f.write(chunk)
            strip_expert_params(mod, lay)
    return 8 + len(raw), offsets


STORE_KINDS = ("ram", "file")


def build_store(
    kind: str,
    experts_modules: Sequence[nn.Module],
    *,
    pin: bool = False,
    directory: str | Path | None = None,
) -> ExpertStore:
    """Build a store of ``kind`` ('ram' or 'file') from the fused experts modules (strips them)."""
    if kind == "ram":
        return RamStore(experts_modules, pin=pin)
    if kind == "file":
        return FileStore(experts_modules, directory=directory)
    raise InputError(f"unknown expert store {kind!r} (known: {', '.join(STORE_KINDS)})")
