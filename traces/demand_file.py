"""A demand sequence spilled to temporary files, so that a run's bounds (sim/bounds.py)
and miss-ratio curves (traces/mrc.py) take memory independent of its length.

The layer steps of a :class:`traces.demand.DemandSequence` are appended in pieces (one
request or one iteration at a time) and written in chunks of whole steps:

- ``keys.bin``: the keys, as the smallest unsigned integer type that holds ``num_keys - 1``;
- ``steps.bin``: the number of keys of each step, in the same type (a step's keys are
  distinct, so fewer than ``num_keys``);
- ``next.bin``: written by :meth:`DemandFile.finish`, a backward pass over the chunks
  (last to first) with one "first position from here on" per key: each demand's next-use
  position in the whole sequence (:func:`traces.demand.next_use`), as uint32 when every
  position fits below its largest value (which then means "never"), else int64.

The chunk table (a few numbers per chunk of ``CHUNK_DEMANDS`` demands) and the per-key
table are all that stay in memory; :meth:`DemandFile.chunks` reads the chunks back in
order, one at a time, with plain reads (not a memory map, whose touched pages would count
in the process's resident memory).

The three files are anonymous (:func:`tempfile.TemporaryFile`: on Linux unlinked from
the start, ``O_TMPFILE``), so nothing is left behind however the process ends, a SIGKILL
included; :meth:`DemandFile.close` (or leaving the ``with`` block) frees them at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from specs.limits import require_disk
from traces.demand import NEVER

# Demands per chunk: reading one back takes about 8 x this in int64 keys, the same in
# next uses and the raw bytes; the Python work per chunk is a few calls.
CHUNK_DEMANDS = 1 << 18
_U32_NEVER = np.iinfo(np.uint32).max


def key_dtype(num_keys: int) -> np.dtype:
    """The smallest unsigned integer type holding every key (and every step size)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_keys - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.int64)


def spill_bytes(max_demands: int, max_steps: int, num_keys: int) -> int:
    """Disk bytes a :class:`DemandFile` of at most these sizes takes."""
    kb = key_dtype(num_keys).itemsize
    nb = 4 if max_demands < _U32_NEVER else 8
    return max_demands * (kb + nb) + max_steps * kb


@dataclass(frozen=True)
class Chunk:
    """Chunk ``index`` holds demands [demand0, demand0 + demands) and steps
    [step0, step0 + steps)."""

    index: int
    demand0: int
    demands: int
    step0: int
    steps: int


@dataclass(frozen=True)
class ChunkData:
    """One chunk read back: ``keys`` int64 [demands]; ``step_start`` int64 [steps + 1]
    (offsets into ``keys``, from 0); ``nxt`` int64 [demands], global positions, NEVER for
    none."""

    chunk: Chunk
    keys: np.ndarray
    step_start: np.ndarray
    nxt: np.ndarray


class DemandFile:
    """A demand sequence on disk: :meth:`append` steps, :meth:`finish`, then read
    :meth:`chunks` (see the module doc). ``folder``: where the temporary folder goes
    (default: the system's temp folder, ``TMPDIR``)."""

    def __init__(
        self, num_keys: int, folder: str | None = None, chunk_demands: int = CHUNK_DEMANDS
    ) -> None:
        self.num_keys = num_keys
        self.dtype = key_dtype(num_keys)
        self.chunk_demands = max(1, chunk_demands)
        self._keys, self._steps, self._next = (
            tempfile.TemporaryFile(prefix=f"fmoe-demands-{name}-", dir=folder)  # noqa: SIM115
            for name in ("keys", "steps", "next")
        )  # closed in close()
        self._buf_keys: list[np.ndarray] = []
        self._buf_sizes: list[np.ndarray] = []
        self._buffered = 0
        self.table: list[Chunk] = []
        self.num_demands = 0
        self.num_steps = 0
        self.next_dtype: np.dtype | None = None
        self.first: np.ndarray | None = None  # after finish: each key's first position

    # -- writing ----------------------------------------------------------------------
    def append(self, keys: np.ndarray, sizes: np.ndarray) -> None:
        """Append steps: ``sizes[j]`` keys each (possibly 0), ``keys`` in step order,
        distinct and ascending within a step, each in ``0 .. num_keys - 1``."""
        self._buf_keys.append(keys)
        self._buf_sizes.append(sizes)
        self._buffered += int(keys.size)
        if self._buffered >= self.chunk_demands:
            self._flush()

    def _flush(self) -> None:
        if not self._buf_sizes:
            return
        keys = np.concatenate(self._buf_keys).astype(self.dtype)
        sizes = np.concatenate(self._buf_sizes).astype(self.dtype)
        self._buf_keys, self._buf_sizes, self._buffered = [], [], 0
        keys.tofile(self._keys)
        sizes.tofile(self._steps)
        self.table.append(
            Chunk(len(self.table), self.num_demands, int(keys.size), self.num_steps, sizes.size)
        )
        self.num_demands += int(keys.size)
        self.num_steps += int(sizes.size)

    def finish(self) -> None:
        """Write the last chunk and the next uses (backward pass); then :meth:`chunks`."""
        from traces.cachesim_jit import _next_chunk

        self._flush()
        self._keys.flush()
        self._steps.flush()
        n = self.num_demands
        self.next_dtype = np.dtype(np.uint32 if n < _U32_NEVER else np.int64)
        never_out = _U32_NEVER if self.next_dtype == np.uint32 else NEVER
        last = np.full(self.num_keys, NEVER, np.int64)
        isz = self.next_dtype.itemsize
        fn = self._next
        fn.truncate(n * isz)
        for ch in reversed(self.table):
            keys = _read(self._keys, self.dtype, ch.demand0, ch.demands)
            out = np.empty(ch.demands, self.next_dtype)
            _next_chunk(keys.astype(np.int64), ch.demand0, last, out, never_out)
            fn.seek(ch.demand0 * isz)
            out.tofile(fn)
        fn.flush()
        self.first = last

    # -- reading ----------------------------------------------------------------------
    def chunks(self) -> Iterator[ChunkData]:
        """The chunks in order, one at a time (after :meth:`finish`). Each read seeks
        first, so several passes may interleave."""
        if self.next_dtype is None:
            raise RuntimeError("DemandFile.chunks before finish")
        for ch in self.table:
            keys = _read(self._keys, self.dtype, ch.demand0, ch.demands).astype(np.int64)
            start = np.zeros(ch.steps + 1, np.int64)
            np.cumsum(_read(self._steps, self.dtype, ch.step0, ch.steps), out=start[1:])
            raw = _read(self._next, self.next_dtype, ch.demand0, ch.demands)
            nxt = raw.astype(np.int64)
            if self.next_dtype == np.uint32:
                nxt[raw == _U32_NEVER] = NEVER
            yield ChunkData(ch, keys, start, nxt)

    def close(self) -> None:
        """Free the files (idempotent)."""
        for fh in (self._keys, self._steps, self._next):
            fh.close()

    def __enter__(self) -> DemandFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(fh, dtype: np.dtype, first: int, count: int) -> np.ndarray:
    """``count`` items of ``dtype`` from item ``first`` of the open file ``fh``."""
    fh.seek(first * dtype.itemsize)
    return np.fromfile(fh, dtype, count)


def check_disk(max_demands: int, max_steps: int, num_keys: int, folder: str | None) -> None:
    """InputError when the temp folder cannot hold a spill of these (upper-bound) sizes."""
    where = folder or tempfile.gettempdir()
    require_disk(
        "the bounds' temporary demand file",
        spill_bytes(max_demands, max_steps, num_keys),
        where,
        f"free space under {where} or point TMPDIR at a larger folder",
    )


__all__ = ["CHUNK_DEMANDS", "Chunk", "ChunkData", "DemandFile", "check_disk", "key_dtype"]
