"""Trace files: write (format version 2), read (versions 1 and 2), convert.

Format version 2 (:mod:`traces.v2_format`) is compact (uint8/uint16 ids, float16
weights, optional probability rows dense at float16 or sparse top-N), checksummed per
chunk, written in one streaming pass and read lazily (:mod:`traces.v2_reader`), so
neither writing nor simulating holds a whole trace. Version-1 files (safetensors,
:mod:`traces.io_v1`) still load, fully into memory; ``fmoe trace convert`` upgrades them.
docs/traces.md describes both and every integrity check.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from specs.errors import InputError
from specs.model_spec import ModelSpec
from traces import v2_format as fmt
from traces.types import Request, Routing, Workload
from traces.v2_writer import TraceWriter

SCHEMA_VERSION = fmt.SCHEMA_VERSION
META_KEY = "fmoe_trace"  # the v1 metadata key


def file_version(path: str | Path) -> int:
    """1 or 2 from the file's first bytes; InputError for a missing or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a trace file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    if head[:8] == fmt.MAGIC:
        return 2
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{":
        return 1
    hint = ""
    if head.lstrip()[:1] in (b"{", b"["):
        # a public routing log (JSON / JSON lines) is converted first, not read as is
        hint = "; it looks like JSON: convert a routing log with `fmoe trace import`"
    raise InputError(f"{path}: not an fmoe trace file (neither format version 1 nor 2){hint}")


def load_workload(path: str | Path, spec: ModelSpec | None = None) -> Workload:
    """Read a trace file (either version), checking every structural invariant first.

    ``spec``, when given, must have the file's MoE layers, experts and top-K (else
    InputError) and becomes the workload's spec. A version-2 file is checked whole
    (checksums and values) and then read lazily; a version-1 file is read into memory.
    Any malformed, truncated, corrupt or mismatched file raises one InputError naming the
    file and the problem.
    """
    path = Path(path)
    if file_version(path) == 2:
        from traces.v2_reader import open_v2

        return open_v2(path, spec)
    from traces.io_v1 import load_v1

    return load_v1(path, spec)


def write_requests(
    path: str | Path,
    spec: ModelSpec,
    requests: Iterable[Request],
    provenance: dict[str, Any] | None = None,
    *,
    gate_top_n: int | None = None,
    progress: Any = None,
) -> int:
    """Stream ``requests`` into a version-2 file at ``path`` (atomic); returns how many.

    ``progress``: an object with ``update(n)`` (a tqdm bar), called per request.
    """
    n = 0
    with TraceWriter(path, spec, provenance, gate_top_n=gate_top_n) as w:
        for req in requests:
            w.add(req)
            n += 1
            if progress is not None:
                progress.update(1)
            del req  # the writer keeps only the encoded rows: a drawn chunk goes early
    return n


def save_workload(workload: Workload, path: str | Path, *, gate_top_n: int | None = None) -> None:
    """Validate ``workload`` and write it to ``path`` as format version 2, atomically.

    Raises InputError for an invalid workload (the temporary file is removed). On any
    failure an existing file at ``path`` is left untouched.
    """
    write_requests(
        path, workload.spec, workload.requests, workload.provenance, gate_top_n=gate_top_n
    )


def routing_only(req: Request) -> Request:
    """``req`` with its top-K routing and lengths only: no gate, lookahead or embedding
    rows, no prompt text or embedding (what a router-only public trace carries)."""
    r = req.routing
    return Request(
        req.request_id,
        req.arrival_s,
        req.prompt_len,
        req.output_len,
        Routing(np.asarray(r.topk_ids), np.asarray(r.topk_weights)),
        tags=dict(req.tags),
    )


def convert_trace(
    src: str | Path,
    dst: str | Path,
    *,
    gate_top_n: int | None = None,
    strip_to_routing: bool = False,
) -> Workload:
    """Read ``src`` (version 1 or 2) and write it to ``dst`` as version 2; returns the input.

    The input is checked as any load is; the output keeps its requests, texts, tags and
    provenance (plus ``converted_from``), with weights and rows at float16;
    ``strip_to_routing`` keeps only each request's top-K routing (:func:`routing_only`:
    how a policy does on a trace with no optional fields).
    """
    if Path(src).resolve() == Path(dst).resolve():
        raise InputError(f"{dst}: the output must differ from the input")
    w = load_workload(src)
    prov = {**w.provenance, "converted_from": {"path": str(src), "version": file_version(src)}}
    reqs: Iterable[Request] = w.requests
    if strip_to_routing:
        prov["routing_only"] = True
        reqs = (routing_only(r) for r in w.requests)
    write_requests(dst, w.spec, reqs, prov, gate_top_n=gate_top_n)
    return w
