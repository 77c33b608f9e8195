"""Preset registry: the JSON files under specs/presets/, looked up by name.

``load_model`` and ``load_hardware`` accept a preset name or a path to a JSON file.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.jsonio import load_model_json
from specs.model_spec import ModelSpec


def _preset_dir(kind: str) -> Path:
    return Path(str(resources.files("specs") / "presets" / kind))


def model_preset_names() -> list[str]:
    return sorted(p.stem for p in _preset_dir("models").glob("*.json"))


def hardware_preset_names() -> list[str]:
    return sorted(p.stem for p in _preset_dir("hardware").glob("*.json"))


@cache
def _load_model_preset(name: str) -> ModelSpec:
    return load_model_json(ModelSpec, _preset_dir("models") / f"{name}.json")


@cache
def _load_hardware_preset(name: str) -> HardwareProfile:
    return load_model_json(HardwareProfile, _preset_dir("hardware") / f"{name}.json")


def _is_path(ref: str) -> bool:
    return ref.endswith(".json") or "/" in ref


def load_model(ref: str) -> ModelSpec:
    """A ModelSpec from a preset name or a JSON path. InputError names unknown presets."""
    if _is_path(ref):
        return ModelSpec.from_json(ref)
    if ref not in model_preset_names():
        raise InputError(f"unknown model preset {ref!r} (known: {', '.join(model_preset_names())})")
    return _load_model_preset(ref).model_copy(deep=True)


def load_hardware(ref: str) -> HardwareProfile:
    """A HardwareProfile from a preset name or a JSON path. InputError names unknown presets."""
    if _is_path(ref):
        return HardwareProfile.from_json(ref)
    if ref not in hardware_preset_names():
        raise InputError(
            f"unknown hardware preset {ref!r} (known: {', '.join(hardware_preset_names())})"
        )
    return _load_hardware_preset(ref).model_copy(deep=True)
