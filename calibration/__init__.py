"""What a model and a machine cost: model specs, hardware profiles and presets,
cost functions, microbenchmarks, fitting, and simulator-vs-real validation.

The spec, profile, preset and cost modules are the bottom layer; ``bench`` and
``validate`` (when present) sit on top of realrun and sim and are imported only by the CLI.
"""

from calibration.errors import InputError
from calibration.hardware import HardwareProfile
from calibration.model_spec import ModelSpec
from calibration.presets import load_hardware, load_model

__all__ = ["InputError", "HardwareProfile", "ModelSpec", "load_hardware", "load_model"]
