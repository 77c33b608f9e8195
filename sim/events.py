"""Spans of transfers and compute per GPU, and their Chrome trace (Perfetto) form."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from specs.jsonio import atomic_output


@dataclass(frozen=True)
class Span:
    """One interval on a GPU's track: ``cat`` is "h2d" (a copy segment) or "compute"."""

    cat: str
    device: int
    name: str
    start: float
    end: float
    tid: int = 0
    args: dict[str, Any] = field(default_factory=dict)


class EventLog:
    """Collects spans during a run (only when asked: it costs time)."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def span(
        self, cat: str, device: int, name: str, start: float, end: float, tid: int = 0, **args: Any
    ) -> None:
        self.spans.append(Span(cat, device, name, start, end, tid, args))

    def to_chrome(self) -> dict[str, Any]:
        """Trace event format: one process per GPU, thread 0 compute, threads 1.. link channels."""
        events: list[dict[str, Any]] = []
        devices = sorted({s.device for s in self.spans})
        for d in devices:
            events.append(
                {"ph": "M", "name": "process_name", "pid": d, "args": {"name": f"GPU {d}"}}
            )
            events.append(
                {"ph": "M", "name": "thread_name", "pid": d, "tid": 0, "args": {"name": "compute"}}
            )
        for tid in sorted({s.tid for s in self.spans if s.tid > 0}):
            for d in devices:
                name = f"h2d link channel {tid - 1}"
                events.append(
                    {"ph": "M", "name": "thread_name", "pid": d, "tid": tid, "args": {"name": name}}
                )
        for s in self.spans:
            events.append(
                {
                    "name": s.name,
                    "cat": s.cat,
                    "ph": "X",
                    "ts": s.start * 1e6,
                    "dur": max(s.end - s.start, 0.0) * 1e6,
                    "pid": s.device,
                    "tid": s.tid,
                    "args": s.args,
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(log: EventLog, path: str | Path) -> None:
    """Write ``log`` as a Chrome trace JSON file, atomically."""
    payload = log.to_chrome()
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
