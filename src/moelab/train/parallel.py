"""`parallelize(model, config)`: what runs around a model, applied from outside it in a fixed order.

  1. expert dispatcher   every RoutedExperts gets the dispatcher of `moe.dispatch` (local kernels today;
                         expert-parallel dispatchers plug in here)
  2. activation checkpointing   each of `model.blocks` recomputes its activations in backward
  3. torch.compile       each of `model.blocks` is compiled in place

Model files know nothing of this: they expose `model.blocks` and call their `RoutedExperts`. Every step
keeps parameter names (so checkpoints, optimizer groups and HF conversion are unaffected): blocks are
changed in place, never wrapped in another module.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import Config
from moelab.errors import MoelabError
from moelab.moe.experts import LocalDispatcher, set_dispatcher
from moelab.moe.placement import PlacementDispatcher, place_experts


def parallelize(model: nn.Module, config: Config) -> nn.Module:
    """Apply dispatcher, activation checkpointing and compile, as `config` asks; returns the model."""
    if place_experts(model, config.parallel.expert_devices):  # one process, experts on their devices
        set_dispatcher(model, PlacementDispatcher(config.moe.dispatch))  # (moe/placement.py)
    else:
        set_dispatcher(model, LocalDispatcher(config.moe.dispatch))
    tc = config.train
    if tc.activation_checkpointing or tc.compile:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise MoelabError(
                f"train.activation_checkpointing/compile need the model's blocks in `model.blocks` "
                f"(an nn.ModuleList); {type(model).__name__} has none"
            )
        for block in blocks:
            if tc.activation_checkpointing:
                checkpoint_activations(block)
            if tc.compile:
                block.compile()
    return model


class _Checkpointed:
    """Mixed into a block's class: forward recomputes the block's activations in backward.

    Only while training with gradients enabled (evaluation and generation run the block as is).
    """

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


_checkpointed_classes: dict[type, type] = {}


def checkpoint_activations(block: nn.Module) -> nn.Module:
    """Make `block` recompute its activations in backward, in place (its class becomes a subclass
    with a checkpointing forward, as FSDP2's fully_shard does; parameter names stay the same)."""
    cls = type(block)
    if issubclass(cls, _Checkpointed):
        return block
    if cls not in _checkpointed_classes:
        _checkpointed_classes[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    block.__class__ = _checkpointed_classes[cls]
    return block
