"""Training checkpoints: RUN_DIR/checkpoints/step-NNNNNNN/ = a model checkpoint + train_state.pt.

train_state.pt holds what exact resume needs: optimizer state, step, tokens seen, the loader's
cursor and every RNG state. The balancing biases are buffers, so they are in model.safetensors.
A run on several ranks saves the same files from rank 0, with every tensor whole (expert and FSDP2
shards gathered; optimizer moments too), so any world size and `moelab.load` read it.
Directories are written atomically; `latest` is a small text file naming the newest one; only the
newest `keep_last` are kept (older ones are renamed to a hidden temporary, then deleted).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from moelab.checkpoint import (
    CONFIG,
    STEP_DIR,
    WEIGHTS,
    copy_tokenizer,
    load_weights,
    run_checkpoints,
    write_model,
)
from moelab.errors import MoelabError
from moelab.io import DiskFullError, atomic_dir, atomic_file, disk_full, remove_tree, tree_size

STATE = "train_state.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_checkpoint(
    run_dir: Path,
    step: int,
    model,
    config,
    train_state: dict,
    tokenizer: Path | None,
    keep_last: int,
    weights: dict | None = None,
) -> Path:
    """weights: the whole state dict when the model is sharded across ranks (None: the model's own)."""
    ckpt_root = run_dir / "checkpoints"
    out = ckpt_root / f"step-{step:07d}"
    previous = list_checkpoints(run_dir)
    try:
        with atomic_dir(out) as tmp:
            write_model(tmp, model, config, weights)
            if tokenizer is not None and tokenizer.is_file():
                copy_tokenizer(tokenizer, tmp)
            torch.save(train_state, tmp / STATE)
        with atomic_file(ckpt_root / "latest") as fh:
            fh.write(out.name + "\n")
    except DiskFullError:
        # one checkpoint's size is what the next one needs; the run goes on from the last complete one
        resume = f"moelab train {run_dir / 'config.yaml'} --out {run_dir} --resume"
        hint = "free some space, then continue with: " + resume
        if previous:
            hint = f"{hint} (from {previous[-1].name})"
        raise disk_full(out, needed=tree_size(previous[-1]) if previous else None, hint=hint) from None
    for old in _prunable(run_dir, step, keep_last):
        remove_tree(old)  # renamed first: a kill mid-delete leaves a temporary, never a half step-N
    return out


def _prunable(run_dir: Path, step: int, keep_last: int) -> list[Path]:
    """Complete checkpoints beyond the newest `keep_last`, and step directories older than `step`
    that lack their training state (left half-deleted by a run killed while pruning)."""
    complete = list_checkpoints(run_dir)
    old = complete[:-keep_last] if keep_last > 0 else []
    for path in (run_dir / "checkpoints").iterdir():
        m = STEP_DIR.match(path.name)
        if m and int(m.group(1)) < step and path.is_dir() and path not in complete:
            old.append(path)
    return old


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete training checkpoints (weights, config and training state), oldest first."""
    return run_checkpoints(run_dir, (WEIGHTS, CONFIG, STATE))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete training checkpoint: the rule of moelab.checkpoint.resolve_checkpoint, which
    every other command uses, plus the training state."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_training_checkpoint(ckpt: Path, model, device) -> dict:
    """Load weights into `model` and return the training state; refuse corrupt/incompatible ones."""
    if not (ckpt / WEIGHTS).is_file() or not (ckpt / STATE).is_file():
        raise MoelabError(f"checkpoint {ckpt} is incomplete (needs {WEIGHTS} and {STATE})")
    load_weights(model, ckpt, device)
    try:
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MoelabError(
            f"{ckpt / STATE} could not be read ({type(e).__name__}); the checkpoint is corrupt"
        ) from None
    missing = {"step", "optimizer", "loader", "rng"} - set(state)
    if missing:
        raise MoelabError(f"{ckpt / STATE} lacks {sorted(missing)}; it was not written by moelab train")
    return state
