"""Policy registry: names to classes. Each policy module registers itself on import.

Modules listed in ``BUILTIN_MODULES`` are imported on first lookup, so listing policies
does not import torch or any executor.
"""

from __future__ import annotations

import importlib
from typing import Any

from calibration.errors import InputError
from policies.base import Policy

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
]

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
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)
        _loaded = True


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
