"""Where and in which precision a model runs: the same rule for training, evaluation and analysis."""

from __future__ import annotations

import contextlib

import torch

from moelab.errors import MoelabError


def resolve_device(tc) -> torch.device:
    if tc.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise MoelabError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(tc.device)


def autocast_for(tc, device: torch.device):
    """bf16 autocast on GPU (auto or bf16); fp32 otherwise."""
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
