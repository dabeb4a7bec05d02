"""`moelab new`: an experiment is a directory with an editable copy of a model file and its config.

The config's `model.arch: model.py` points at the copy, so `moelab train experiments/NAME` trains the
edited model with the shared trainer, data and analysis; checkpoints carry the file along.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from moelab.config import load_config, save_config
from moelab.errors import MoelabError
from moelab.io import atomic_dir
from moelab.models import ARCHITECTURES, model_module


def default_config(base: str, root: Path = Path("configs")) -> Path:
    """The config `moelab new --from BASE` starts from: root/tiny-cpu-BASE.yaml where an architecture needs
    its own (hierarchical: n_experts follows the tree), otherwise root/tiny-cpu.yaml."""
    own = root / f"tiny-cpu-{base}.yaml"
    return own if own.is_file() else root / "tiny-cpu.yaml"


def new_experiment(name: str, base: str, config_path: Path, parent: Path) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise MoelabError(f"experiment name {name!r} must be letters, digits, '-', '_' or '.'")
    if base not in ARCHITECTURES:
        raise MoelabError(
            f"--from {base!r} is not a known architecture; choose one of {', '.join(ARCHITECTURES)}"
        )
    out = parent / name
    if out.exists():
        raise MoelabError(f"{out} already exists; choose another name or delete it")
    # parsed as the chosen architecture, so the copy's config.yaml lists that architecture's own fields;
    # a missing --config is an error, not silent OLMoE-size defaults
    config = load_config(config_path, [f"model.arch={base}"])
    config.model.arch = "model.py"
    with atomic_dir(out, replace=False) as tmp:
        shutil.copyfile(model_module(base).__file__, tmp / "model.py")
        save_config(config, tmp / "config.yaml")
    return out
