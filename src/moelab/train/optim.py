"""AdamW with weight-decay groups, the LR schedule, the load-balance coefficient schedule, clipping groups."""

from __future__ import annotations

import math

import torch
from torch import nn

from moelab.config import TrainConfig
from moelab.moe.losses import load_balance_coef_at  # noqa: F401  (the schedule lives with the weighting)


def is_routed_expert(name: str) -> bool:
    """Routed-expert parameters live under `.experts.` (see models/olmoe.py); shared experts do not."""
    return ".experts." in name


def build_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; vectors (norms) and parameters whose name contains a `no_decay` part get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name for part in tc.no_decay)
        (no_decay if skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps, fused=device.type == "cuda"
    )


def lr_at(step: int, tc: TrainConfig) -> float:
    """LR of optimizer step `step` (0-based): linear warmup, cosine to min_lr, then hold (no restart)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    decay = tc.decay_steps or max(1, tc.steps - tc.warmup_steps)
    progress = min(1.0, (step - tc.warmup_steps) / decay)
    return tc.min_lr + (tc.lr - tc.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_grad_groups(
    model: nn.Module, clip_experts: float, clip_rest: float, expert_group=False
) -> torch.Tensor:
    """Clip routed-expert and other gradients separately. Returns (3,) norms: total, experts, rest.

    expert_group: under expert parallelism, the process group over which the routed-expert gradients
    are sharded (each rank holds E/ep experts): their squared norms are summed across it, so every rank
    clips by the norm of the whole expert gradient. False: the experts are whole here. FSDP2 (DTensor)
    gradients give their full norm by themselves."""
    experts, rest = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (experts if is_routed_expert(name) else rest).append(p)
    norms = []
    for params, max_norm, group in ((experts, clip_experts, expert_group), (rest, clip_rest, False)):
        if not params:
            norms.append(torch.zeros((), device=next(model.parameters()).device))
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # a DTensor norm (FSDP2): its full value
            norm = norm.full_tensor()
        if group is not False:
            square = norm.float().square()
            torch.distributed.all_reduce(square, group=group)  # sum over the expert shards
            norm = square.sqrt()
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        norms.append(norm)
    e, r = norms[0].float(), norms[1].float()
    return torch.stack([torch.sqrt(e * e + r * r), e, r])
