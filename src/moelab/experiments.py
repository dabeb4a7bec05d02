"""`moelab new`: an experiment is a directory with an editable copy of a model file and its config.

The config's `model.arch: model.py` points at the copy, so `moelab train experiments/NAME` trains the
edited model with the shared trainer, data and analysis; checkpoints carry the file along. A run's
config.yaml names the experiment's file it started from, but the run is built from its own copy
(RUN_DIR/model.py) and resumes from the copy its checkpoint carries: editing or moving experiments/
changes no run.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from moelab.checkpoint import MODEL_FILE
from moelab.config import load_config, save_config
from moelab.errors import MoelabError
from moelab.io import atomic_dir
from moelab.models import ARCHITECTURES, model_module

log = logging.getLogger(__name__)


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


def is_model_file(arch: str) -> bool:
    """model.arch names a user's model file (an experiment), not a registered architecture."""
    return arch not in ARCHITECTURES


def resume_model_file(origin: Path, ckpt: Path, take_edited: bool = False, say: bool = True) -> Path:
    """The model file a resumed experiment is built from: the copy `ckpt` carries, i.e. what was trained.

    `origin` (the experiment's file the run started from) may have been edited or moved since; an edit
    is named in one line (say=False: not on this rank). take_edited: train the edited origin from here
    on, an explicit choice to change the model mid-run."""
    copy = ckpt / MODEL_FILE
    if take_edited:
        if not origin.is_file():
            raise MoelabError(f"--take-edited-model: {origin} does not exist (the run's experiment file)")
        if say:
            log.warning(
                "training the edited %s from %s on (not the copy the checkpoint carries)", origin, ckpt
            )
        return origin
    if not copy.is_file():
        raise MoelabError(f"{ckpt} has no {MODEL_FILE}, the model file it was trained with; it is incomplete")
    if say and origin.is_file() and origin.read_bytes() != copy.read_bytes():
        log.warning(
            "%s differs from the copy in %s that this run was trained with; resuming with that copy "
            "(pass --take-edited-model to train the edited file)",
            origin,
            ckpt,
        )
    return copy
