"""`parallelize(model, config)`: what runs around a model, applied from outside it in a fixed order.

  1. expert dispatcher   every RoutedExperts gets the dispatcher of `moe.dispatch`: local kernels, or
                         with `parallel.ep > 1` under torchrun the expert-parallel all-to-all dispatcher
                         (moe/expert_parallel.py), each rank keeping only its E/ep experts
  2. activation checkpointing   each of `model.blocks` recomputes its activations in backward
  3. torch.compile       each of `model.blocks` is compiled in place
  4. data parallel       under torchrun: `ddp` starts every replica from rank 0's weights (gradients are
                         averaged once per step by train/distributed.py); `fsdp` applies FSDP2's
                         fully_shard to each block, then to the model

Model files know nothing of this: they expose `model.blocks` and call their `RoutedExperts`. Every step
keeps parameter names (so checkpoints, optimizer groups and HF conversion are unaffected): blocks are
changed in place, never wrapped in another module (fully_shard too swaps classes in place). Expert
shards keep their names with E/ep rows; checkpoints gather them whole (train/distributed.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import Config
from moelab.errors import MoelabError
from moelab.moe.expert_parallel import ExpertParallelDispatcher, shard_experts
from moelab.moe.experts import LocalDispatcher, set_dispatcher
from moelab.moe.placement import PlacementDispatcher, place_experts


def parallelize(model: nn.Module, config: Config, d=None) -> nn.Module:
    """Apply dispatcher, activation checkpointing, compile and data parallelism, as `config` asks and
    `d` (train.distributed.Dist of a torchrun job; None = one process) allows; returns the model."""
    if d is not None and d.ep > 1:
        try:
            shard_experts(model, d.ep, d.ep_rank)
        except ValueError as e:
            raise MoelabError(f"parallel.ep={d.ep}: {e}") from None
        set_dispatcher(model, ExpertParallelDispatcher(config.moe.dispatch, d.ep_group, d.ep, d.ep_rank))
    elif place_experts(model, config.parallel.expert_devices):  # one process, experts on their devices
        set_dispatcher(model, PlacementDispatcher(config.moe.dispatch))  # (moe/placement.py)
    else:
        set_dispatcher(model, LocalDispatcher(config.moe.dispatch))
    tc = config.train
    if tc.activation_checkpointing or tc.compile or (d is not None and d.fsdp):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise MoelabError(
                f"train.activation_checkpointing, train.compile and parallel.data_parallel=fsdp need the "
                f"model's blocks in `model.blocks` (an nn.ModuleList); {type(model).__name__} has none"
            )
        for block in blocks:
            if tc.activation_checkpointing:
                checkpoint_activations(block)
            if tc.compile:
                block.compile()
    if d is not None and d.active:
        from moelab.train.distributed import broadcast_parameters

        if d.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        else:
            broadcast_parameters(model, d)
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
