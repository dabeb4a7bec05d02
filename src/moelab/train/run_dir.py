"""A run directory before training starts: which config trains, from which model file.

`prepare_run` turns `moelab train CONFIG [--out DIR] [--resume]` into (config, run_dir): a new run
takes CONFIG plus overrides; a resumed one takes the run's saved config plus overrides, refusing any
change to the model, and an experiment resumes from the model file its newest checkpoint carries
(not the experiment's file, which may have been edited or moved) unless the user asks for the edited
one. The trainer then copies an experiment's model file into the run (`run_model_file`) so later
checkpoints copy a file that stays put.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from moelab.checkpoint import MODEL_FILE
from moelab.config import Config, load_config, read_yaml, to_dict
from moelab.errors import MoelabError
from moelab.experiments import is_model_file, resume_model_file
from moelab.io import atomic_file
from moelab.train.checkpoint import latest_checkpoint


def prepare_run(
    config_path: str | Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    take_edited_model: bool = False,
):
    """The run directory (not created here: train() makes it once its checks pass) and its config.

    On --resume, the run's saved config (plus overrides) wins; it may not change the model, and an
    experiment resumes from the model file its checkpoint carries (take_edited_model: the edited one)."""
    config_path = Path(config_path)
    config_dir = config_path if config_path.is_dir() else config_path.parent
    if out is None:
        out = Path("runs") / (config_path.name if config_path.is_dir() else config_path.stem)
    if out.exists() and not out.is_dir():
        raise MoelabError(f"--out {out} is a file; give a directory for the run")
    if resume:
        return _resume_config(out, overrides, take_edited_model), out
    if take_edited_model:
        raise MoelabError("--take-edited-model applies to --resume (a new run trains the experiment's file)")
    config = load_config(config_path, overrides)
    if latest_checkpoint(out) is not None:
        raise MoelabError(f"{out} already holds checkpoints; pass --resume to continue or --out NEW_DIR")
    arch = Path(config.model.arch)
    if arch.suffix == ".py" and not arch.is_absolute():
        config.model.arch = str((config_dir / arch).resolve())  # an experiment's model file
    return config, out


def _resume_config(run_dir: Path, overrides: list[str], take_edited_model: bool) -> Config:
    """The saved config plus overrides, refusing model changes; an experiment's model.arch points at
    the model file to build (the newest checkpoint's copy, or the edited experiment file)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise MoelabError(f"--resume: {run_dir} has no config.yaml; start the run without --resume first")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MoelabError(f"--resume: no checkpoint in {run_dir}/checkpoints")
    data = read_yaml(saved)
    model = data.get("model") or {}
    arch = model.get("arch")
    if isinstance(arch, str) and is_model_file(arch):
        origin = Path(arch) if Path(arch).is_absolute() else run_dir / arch
        say = os.environ.get("RANK", "0") == "0"
        data["model"] = {**model, "arch": str(resume_model_file(origin, ckpt, take_edited_model, say))}
    elif take_edited_model:
        raise MoelabError(
            f"--take-edited-model: {run_dir} trains the built-in architecture {arch!r}, no model file"
        )
    trained = load_config(data, base_dir=run_dir).model
    config = load_config(data, overrides, base_dir=run_dir)
    for f in dataclasses.fields(trained):
        before, after = getattr(trained, f.name), getattr(config.model, f.name)
        if before != after:
            raise MoelabError(
                f"--resume cannot change the model: model.{f.name} is {before!r} in {run_dir}, asked "
                f"{after!r}; train another model with --out NEW_DIR"
            )
    return config


def run_model_file(config: Config, run_dir: Path, resume: bool) -> tuple[Config, str | None]:
    """An experiment trains from RUN_DIR/model.py, a copy of the file it is built from, which stays
    put while it trains (checkpoints copy it; the experiment's file may be edited, the resumed
    checkpoint pruned). Returns the config pointing at it, and the experiment file the run's
    config.yaml names (None: a built-in architecture)."""
    if not is_model_file(config.model.arch):
        return config, None
    source, copy = Path(config.model.arch), run_dir / MODEL_FILE
    origin = read_yaml(run_dir / "config.yaml")["model"]["arch"] if resume else str(source)
    if source.resolve() != copy.resolve():
        with atomic_file(copy, "wb") as fh:
            fh.write(source.read_bytes())
    data = to_dict(config)
    data["model"]["arch"] = str(copy.resolve())
    return load_config(data), origin


def logged_val(metrics: Path, step: int) -> bool:
    """metrics.jsonl holds the validation of `step` (a torn line counts as none)."""
    if not metrics.is_file():
        return False
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("type") == "val" and record.get("step") == step:
            return True
    return False
