"""Model registry: `model.arch` names a built-in model file, or is a path to a model .py file.

A model file defines `Model(config)`, a `moelab.models.base.MoEModel` that honours the output contract,
with `Model.config_class`: its `ModelConfig` subclass (the `model:` section is parsed against it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from moelab.config import Config, ModelConfig
from moelab.errors import ConfigError

ARCHITECTURES = {
    "olmoe": "moelab.models.olmoe",
    "crosslayer": "moelab.models.crosslayer",
    "hierarchical": "moelab.models.hierarchical",
}


def model_module(arch: str, base_dir: Path | None = None):
    """The Python module of an architecture: a registered name, or a path to a .py model file."""
    if arch in ARCHITECTURES:
        return importlib.import_module(ARCHITECTURES[arch])
    path = Path(arch)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.suffix == ".py" and path.is_file():
        name = f"moelab_user_model_{abs(hash(str(path.resolve())))}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise ConfigError(f"model file {path} failed to import: {type(e).__name__}: {e}") from e
        return sys.modules[name]
    known = ", ".join(ARCHITECTURES)
    raise ConfigError(f"model.arch={arch!r} is neither a known architecture ({known}) nor a model .py file")


def config_class(arch: str, base_dir: Path | None = None) -> type[ModelConfig]:
    """The `model:` dataclass of an architecture (the base ModelConfig for files that declare none)."""
    module = model_module(arch, base_dir)
    if not hasattr(module, "Model"):
        raise ConfigError(f"model.arch={arch!r}: the model file defines no `Model` class")
    cls = getattr(module.Model, "config_class", None) or ModelConfig
    if not (isinstance(cls, type) and issubclass(cls, ModelConfig)):
        raise ConfigError(f"model.arch={arch!r}: Model.config_class must subclass moelab.config.ModelConfig")
    return cls


def build(config: Config, base_dir: Path | None = None) -> nn.Module:
    """Instantiate the model a config describes (weights freshly initialised), with the config's
    local expert dispatcher (`moe.dispatch`; `train.parallel.parallelize` may replace it) and expert
    output regularisers (`moe.expert_output_norm`, `moe.expert_output_orthogonality_coef`)."""
    from moelab.moe.experts import LocalDispatcher, configure_experts, set_dispatcher

    model = model_module(config.model.arch, base_dir).Model(config)
    set_dispatcher(model, LocalDispatcher(config.moe.dispatch))
    configure_experts(model, config)
    return model
