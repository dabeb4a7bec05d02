"""Model checkpoints: a directory with model.safetensors + config.yaml (training state comes later).

Writes go to a temporary directory that is renamed only when complete, so nothing half-written
looks like a valid checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelab.config import Config, load_config, save_config
from moelab.errors import MoelabError
from moelab.models import build

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def save_checkpoint(model: torch.nn.Module, out: str | Path, config: Config | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "moelab": "1"})
        save_config(config or model.config, tmp / CONFIG)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a checkpoint dir or a run dir (its checkpoints/latest)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.exists():
        target = latest.read_text().strip() if latest.is_file() else latest
        return resolve_checkpoint(path / "checkpoints" / target)
    raise MoelabError(f"{path} is not a checkpoint (no {WEIGHTS}) nor a run directory with checkpoints")


def load(path: str | Path, device: str | torch.device = "cpu", overrides: list[str] = ()) -> torch.nn.Module:
    """Load a model from a checkpoint dir or run dir, in eval mode, exactly as saved."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / CONFIG).is_file():
        raise MoelabError(f"checkpoint {ckpt} has no {CONFIG}")
    config = load_config(ckpt / CONFIG, overrides)
    with torch.device("meta"):
        model = build(config, base_dir=ckpt)
    try:
        state = load_file(str(ckpt / WEIGHTS), device=str(device))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MoelabError(f"{ckpt / WEIGHTS} could not be read ({e}); the checkpoint is corrupt") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise MoelabError(f"{ckpt} does not match its config.yaml: {first}") from None
    _rebuild_non_persistent(model, device)
    return model.to(device).eval()


def _rebuild_non_persistent(model: torch.nn.Module, device) -> None:
    """Buffers not in the state dict (RoPE frequencies) are still on meta: recompute them."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta and name in module._non_persistent_buffers_set:
                fresh = torch.empty_like(buf, device=device)
                module.register_buffer(name, fresh, persistent=False)
    if hasattr(model, "init_non_persistent"):
        model.init_non_persistent()
