"""Model checkpoints: a directory with model.safetensors + config.yaml (+ tokenizer.json, model.py).

Writes go to a temporary directory that is renamed only when complete, so nothing half-written
looks like a valid checkpoint. A model defined by a user's model file (an experiment) carries a
copy of that file, so the checkpoint loads anywhere.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelab.config import Config, load_config, save_config
from moelab.errors import MoelabError
from moelab.io import atomic_dir
from moelab.models import ARCHITECTURES, build

WEIGHTS, CONFIG, TOKENIZER, MODEL_FILE = "model.safetensors", "config.yaml", "tokenizer.json", "model.py"
STEP_DIR = re.compile(r"^step-(\d{7,})$")  # RUN_DIR/checkpoints/step-NNNNNNN; temporaries never match


def write_model(
    directory: Path, model: torch.nn.Module, config: Config | None = None, state: dict | None = None
) -> None:
    """Write weights, config (and the model file of a user architecture) into an existing directory.

    state: the whole state dict of a model sharded across ranks (train/distributed.py gathers it);
    None = the model's own."""
    config = config or model.config
    state = weights_to_save(model, state)
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt", "moelab": "1"})
    if config.model.arch not in ARCHITECTURES:  # an experiment's own model file travels with it
        source = Path(sys.modules[type(model).__module__].__file__)  # the file the model was built from
        shutil.copyfile(source, directory / MODEL_FILE)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, arch=MODEL_FILE))
    save_config(config, directory / CONFIG)


def weights_to_save(model: torch.nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors. A module shared by several layers (e.g. one router
    for all layers) appears under each of its names; safetensors refuses aliased tensors, so every
    name after the first gets its own copy (loading assigns the same values to the one module)."""
    tensors = model.state_dict() if state is None else state
    state, seen = {}, set()
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        state[name] = t.clone() if key in seen else t
        seen.add(key)
    return state


def copy_tokenizer(tokenizer_json: Path, directory: Path) -> None:
    """Copy a tokenizer.json, and the tokenizer_meta.json beside it (its eos/pad ids), into `directory`."""
    shutil.copyfile(tokenizer_json, directory / TOKENIZER)
    meta = Path(tokenizer_json).with_name("tokenizer_meta.json")
    if meta.is_file():
        shutil.copyfile(meta, directory / meta.name)


def save_checkpoint(
    model: torch.nn.Module, out: str | Path, config: Config | None = None, tokenizer: Path | None = None
) -> Path:
    """Write a complete checkpoint directory atomically; `tokenizer` is a tokenizer.json to copy along."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        write_model(tmp, model, config)
        if tokenizer is not None:
            copy_tokenizer(tokenizer, tmp)
    return out


def checkpoint_step(ckpt: str | Path) -> int | None:
    """The training step a checkpoint directory is named for (step-N), None for any other name."""
    m = re.fullmatch(r"step-(\d+)", Path(ckpt).name)
    return int(m.group(1)) if m else None


def run_checkpoints(run_dir: str | Path, needs: tuple[str, ...] = (WEIGHTS, CONFIG)) -> list[Path]:
    """A run's complete step checkpoints (each holding every file in `needs`), oldest first.

    The newest of them is the run's checkpoint for every command (resume, eval, generate, trace,
    to-hf, ...). `checkpoints/latest` is not read: a deleted pointer, or one a kill left behind the
    newest rename, must not make commands disagree about which checkpoint a run has."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / name).is_file() for name in needs):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a checkpoint dir or a run dir (its newest complete checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    found = run_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise MoelabError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        raise MoelabError(
            f"{path / 'checkpoints'} holds no complete checkpoint (step-N/ with {WEIGHTS} and {CONFIG})"
        )
    raise MoelabError(f"{path} is not a checkpoint (no {WEIGHTS}) nor a run directory with checkpoints")


def load(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()) -> torch.nn.Module:
    """Load a model from a checkpoint dir or run dir, in eval mode, exactly as saved."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / CONFIG).is_file():
        raise MoelabError(f"checkpoint {ckpt} has no {CONFIG}")
    config = load_config(ckpt / CONFIG, overrides)
    with torch.device("meta"):
        model = build(config, base_dir=ckpt)
    load_weights(model, ckpt, device)
    return model.to(device).eval()


def load_weights(model: torch.nn.Module, ckpt: Path, device="cpu") -> None:
    """Load model.safetensors into `model` (may live on the meta device), refusing mismatches."""
    try:
        state = load_file(str(ckpt / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MoelabError(f"{ckpt / WEIGHTS} could not be read ({e}); the checkpoint is corrupt") from None
    assign_state(model, state, f"{ckpt} does not match its config.yaml")
    _rebuild_non_persistent(model, device)


def assign_state(model: torch.nn.Module, state: dict, mismatch: str) -> None:
    """load_state_dict(strict, assign): the tensors become the parameters (no copy; works on meta).

    A mismatch raises MoelabError: `mismatch` followed by the first offending key.
    """
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise MoelabError(f"{mismatch}: {detail}") from None


def _rebuild_non_persistent(model: torch.nn.Module, device) -> None:
    """Buffers not in the state dict (RoPE frequencies) are still on meta: recompute them."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name in module._non_persistent_buffers_set:
                module.register_buffer(name, torch.empty_like(buf, device=device), persistent=False)
    if hasattr(model, "init_non_persistent"):
        model.init_non_persistent()
