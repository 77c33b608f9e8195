"""The workload data model: requests, routing traces, prompts; file IO, validation,
importers of public formats, a synthetic generator, prompt sets."""

from traces.io import load_workload, save_workload
from traces.types import Request, Routing, Workload

__all__ = ["Request", "Routing", "Workload", "load_workload", "save_workload"]
