"""The ground floor: contracts every other package shares.

ModelSpec, HardwareProfile, the model and hardware presets with their JSON, InputError,
JSON and atomic-write helpers, and the analytic cost functions. This package imports
nothing else of the project (import-linter checks it in ``make lint``).
"""

from specs.errors import InputError
from specs.hardware import HardwareProfile
from specs.model_spec import ModelSpec
from specs.presets import load_hardware, load_model

__all__ = ["InputError", "HardwareProfile", "ModelSpec", "load_hardware", "load_model"]
