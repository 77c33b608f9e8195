"""Policy registry: names to classes. Each policy module registers itself on import.

Modules listed in ``BUILTIN_MODULES`` are imported on first lookup, so listing policies
does not import torch or any executor. So are your own policies' modules:

- those named in the environment variable ``FMOE_POLICY_MODULES`` (comma-separated
  module names, importable from ``sys.path``, e.g. with ``PYTHONPATH=.``): for a policy
  you are writing; the variable reaches a sweep's local worker processes too;
- the entry points of group ``fmoe.policies`` of installed packages (each names a module
  or an object in one; loading it registers its policies): for a policy you ship.

A module that cannot be imported is one InputError naming it.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from typing import Any

from policies.base import Policy
from specs.errors import InputError

BUILTIN_MODULES: list[str] = [
    "policies.fmoe",
    "policies.no_offload",
    "policies.lru",
    "policies.lfu",
    "policies.deepspeed",
    "policies.mixtral_offloading",
    "policies.moe_infinity",
    "policies.promoe",
    "policies.oracle",
    "policies.llama_cpp",
    "policies.ktransformers",
    "policies.fiddler",
    "policies.hobbit",
    "policies.lfru",
    "policies.least_stale",
    "policies.fmoe_hybrid",
]

ENV_MODULES = "FMOE_POLICY_MODULES"
ENTRY_POINT_GROUP = "fmoe.policies"

_REGISTRY: dict[str, type[Policy]] = {}
_loaded = False


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"policy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True  # first: a plugin that looks policies up while loading must not recurse
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
        for mod in user_policy_modules():
            _import_plugin(mod, f"{ENV_MODULES}={os.environ.get(ENV_MODULES, '')}")
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin is the user's input: one line
                raise InputError(
                    f"policy plugin {ep.name!r} ({ep.value}, entry point group "
                    f"{ENTRY_POINT_GROUP!r}) failed to load: {type(exc).__name__}: {exc}"
                ) from None


def user_policy_modules() -> list[str]:
    """The module names in ``FMOE_POLICY_MODULES`` (empty when unset)."""
    return [m.strip() for m in os.environ.get(ENV_MODULES, "").split(",") if m.strip()]


def _import_plugin(module: str, where: str) -> None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or the module's own error while registering
        raise InputError(
            f"policy module {module!r} (from {where}) cannot be imported: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def policy_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[Policy]:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown policy {name!r} (known: {', '.join(sorted(_REGISTRY))})"
        ) from None


def make_policy(name: str, **options: Any) -> Policy:
    """Instantiate a registered policy with validated options."""
    return policy_class(name)(**options)


def describe_policies() -> list[dict[str, Any]]:
    """One record per policy for `fmoe policies --json`."""
    out = []
    for name in policy_names():
        cls = _REGISTRY[name]
        out.append(
            {
                "name": name,
                "description": cls.description,
                "reads_future": cls.reads_future,
                "wants_lookahead": cls.wants_lookahead,
                "async_search": cls.async_search,
                "needs_training": cls.needs_training,
                "options": cls.Options.model_json_schema().get("properties", {}),
            }
        )
    return out
