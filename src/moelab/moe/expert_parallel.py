"""Expert parallelism: the routed experts of each MoE layer split across the `ep` ranks of a group.

Rank i of an expert-parallel group holds experts [i·E/ep, (i+1)·E/ep) whole (`shard_experts` slices
every RoutedExperts parameter along its expert dimension; names stay the same). `ExpertParallelDispatcher`
implements the dispatcher call of moe/experts.py:

  1. each (token, slot) pair is sorted by expert, hence by the rank that owns it;
  2. counts go first (an all-to-all of (ep,) counts, one host sync per layer for the split sizes), then
     the pairs' rows and their local expert ids;
  3. the owner runs its experts with the local kernel (each row mixed with weight 1, the output norm
     included), and the outputs travel back by the reverse all-to-all;
  4. the token's own rank mixes them with its mixing weights.

The row exchanges are torch's differentiable all-to-all (`all_to_all_single_autograd`), whose backward is
the reverse all-to-all, so gradients reach x, the expert weights and the mixing weights (the router) as
on the local path; mixing stays on the token's rank, so the router's gradient never travels.
Every rank of the group calls its MoE layers in the same order (same model, same micro-batches).
Each rank's expert gradients come from the tokens of the whole group; replicas of one shard in other
groups are averaged by the trainer (train/distributed.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moelab.moe.dispatch import PATHS, run_expert_groups
from moelab.moe.experts import RoutedExperts


class ExpertParallelDispatcher:
    """Dispatch across the ranks of `group` (size ep); this rank holds experts ep_rank·E/ep onwards."""

    def __init__(self, kernel: str, group, ep: int, ep_rank: int):
        if kernel not in PATHS:
            raise ValueError(f"unknown dispatch kernel {kernel!r}; choose one of {', '.join(PATHS)}")
        self.kernel, self.group, self.ep, self.ep_rank = kernel, group, ep, ep_rank

    def __call__(self, experts: RoutedExperts, x, topk_ids, topk_weights, per_slot: bool = False):
        groups = experts.groups()
        if len(groups) != 1:
            raise ValueError("expert parallelism needs experts of one hidden width (model.expert_widths)")
        dtype = (
            torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        )
        x, topk_weights = x.to(dtype), topk_weights.to(dtype)
        T, k = topk_ids.shape
        n_local = groups[0].n  # E / ep experts on this rank
        # id -1 = no expert: route to expert 0 with weight 0 (adds exactly 0), as the local kernels do
        none = topk_ids < 0
        ids, topk_weights = topk_ids.clamp(min=0), topk_weights.masked_fill(none, 0.0)
        flat = ids.reshape(-1)  # (T·k,)
        order = torch.argsort(flat, stable=True)  # (T·k,) pairs grouped by expert, hence by owner rank
        owner = flat[order] // n_local  # (T·k,) non-decreasing
        send_counts = torch.bincount(owner, minlength=self.ep)  # (ep,)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        sizes = torch.cat([send_counts, recv_counts]).tolist()  # one host sync: the split sizes
        send, recv = sizes[: self.ep], sizes[self.ep :]
        local_ids = flat[order] - owner * n_local  # (T·k,) expert index on its owner
        recv_ids = local_ids.new_empty(sum(recv))
        dist.all_to_all_single(recv_ids, local_ids, recv, send, group=self.group)
        rows = x[order // k]  # (T·k, D)
        recv_rows = all_to_all_single_autograd(rows, recv, send, self.group)  # (n_recv, D)
        ones = recv_rows.new_ones(recv_rows.shape[0], 1)
        y = run_expert_groups(recv_rows, recv_ids[:, None], ones, groups, self.kernel, experts.output_norm)
        y_back = all_to_all_single_autograd(y, send, recv, self.group)  # (T·k, D)
        out = torch.zeros_like(x).index_add_(0, order // k, y_back * topk_weights.reshape(-1)[order, None])
        if not per_slot:
            return out  # (T, D)
        y_slots = torch.zeros_like(y_back).index_copy(0, order, y_back).view(T, k, -1)  # (token, slot) order
        return out, y_slots.masked_fill(none[..., None], 0.0)

    def __repr__(self) -> str:
        return f"ExpertParallelDispatcher({self.kernel!r}, ep={self.ep}, rank={self.ep_rank})"


def shard_experts(model: nn.Module, ep: int, ep_rank: int) -> int:
    """Keep only experts [ep_rank·E/ep, (ep_rank+1)·E/ep) of every RoutedExperts, in place: each of its
    parameters (gate_up, down, a learned output-norm weight; all (E, ...)) becomes its slice along dim 0.
    Returns how many RoutedExperts were sharded."""
    modules = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for module in modules:
        if len(module.group_names) != 1:
            raise ValueError("expert parallelism needs experts of one hidden width (model.expert_widths)")
        per = module.n_experts // ep
        for sub in (module, module.output_norm):
            if sub is None:
                continue
            for name, p in list(sub.named_parameters(recurse=False)):
                shard = p.detach()[ep_rank * per : (ep_rank + 1) * per].clone()
                setattr(sub, name, nn.Parameter(shard, requires_grad=p.requires_grad))
    return len(modules)
