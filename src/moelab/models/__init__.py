"""Model registry: `model.arch` names a built-in model file, or is a path to a model .py file.

A model file defines `Model(config)` returning a module that honours the output contract
(see moelab.models.olmoe.MoEOutput).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from moelab.config import Config
from moelab.errors import ConfigError

ARCHITECTURES = {"olmoe": "moelab.models.olmoe"}


def model_module(arch: str, base_dir: Path | None = None):
    """The Python module of an architecture: a registered name, or a path to a .py model file."""
    if arch in ARCHITECTURES:
        return importlib.import_module(ARCHITECTURES[arch])
    path = Path(arch)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.suffix == ".py" and path.is_file():
        name = f"moelab_user_model_{abs(hash(str(path.resolve())))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules[name]
    known = ", ".join(ARCHITECTURES)
    raise ConfigError(f"model.arch={arch!r} is neither a known architecture ({known}) nor a model .py file")


def build(config: Config, base_dir: Path | None = None) -> nn.Module:
    """Instantiate the model a config describes (weights freshly initialised)."""
    return model_module(config.model.arch, base_dir).Model(config)
