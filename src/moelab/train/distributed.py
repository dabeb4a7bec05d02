"""Several processes (torchrun): the process groups and every cross-rank reduction of training.

Layout of W ranks with expert-parallel degree ep (W % ep == 0):
  data parallel     every rank reads different sequences (degree W); the non-expert weights are
                    replicas averaged once per optimizer step (ddp) or FSDP2 shards (fsdp).
  expert groups     ranks [g·ep, (g+1)·ep) together hold one full set of routed experts, each E/ep of
                    them (moe/expert_parallel.py); tokens travel inside a group by all-to-all.
  expert replicas   ranks with the same rank % ep hold the same expert shard; their gradients are
                    averaged like the replicas of the rest.

The gradient each rank ends a step with is the gradient of the mean of the ranks' losses, so W ranks
give the step one process gives on the same global batch. With W == 1 nothing here runs (`Dist.active`
is False): single-process training has no extra synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moelab.errors import MoelabError
from moelab.train.optim import is_routed_expert


@dataclass
class Dist:
    """This process's place in the job. A single process is Dist() (rank 0 of 1, nothing to reduce)."""

    rank: int = 0
    world_size: int = 1
    ep: int = 1
    fsdp: bool = False
    ep_group: object = None  # the ep ranks sharing one set of experts (None when ep == 1)
    replica_group: object = None  # the W / ep ranks holding the same expert shard (None: all ranks)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(config) -> Dist:
    """Join the torchrun job described by the environment (WORLD_SIZE, RANK, ...), or Dist() without one.

    Checks what depends on the world size: batch_size and ep must divide into it."""
    pc = config.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if pc.ep > 1:
            raise MoelabError(f"parallel.ep={pc.ep} needs ep processes or more; launch with --nproc {pc.ep}")
        return Dist()
    if world % pc.ep:
        raise MoelabError(f"parallel.ep={pc.ep} must divide the number of processes {world}")
    if config.train.batch_size % world:
        raise MoelabError(
            f"train.batch_size={config.train.batch_size} must be divisible by the {world} processes "
            f"(it is the global micro-batch; each rank takes batch_size / {world})"
        )
    if pc.data_parallel == "fsdp" and pc.ep > 1:
        raise MoelabError("parallel.data_parallel=fsdp with parallel.ep > 1 is not supported; use ddp")
    backend = pc.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and config.train.device != "cpu" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    rank = dist.get_rank()
    d = Dist(rank=rank, world_size=world, ep=pc.ep, fsdp=pc.data_parallel == "fsdp")
    # every rank creates every group, in the same order (a torch.distributed rule)
    for g in range(world // pc.ep):
        group = dist.new_group(list(range(g * pc.ep, (g + 1) * pc.ep))) if pc.ep > 1 else None
        if rank // pc.ep == g:
            d.ep_group = group
    if pc.ep > 1:
        for i in range(pc.ep):
            group = dist.new_group(list(range(i, world, pc.ep)))
            if rank % pc.ep == i:
                d.replica_group = group
    return d


def shutdown() -> None:
    """Leave the torchrun job, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- per-step reductions


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of `t` over every rank (in place; returned). One call per optimizer step carries the loss
    terms, the expert counts (for the balancing biases and telemetry) and the stop flag together."""
    if d.active:
        dist.all_reduce(t)
    return t


def average_gradients(model: nn.Module, d: Dist) -> None:
    """Make every gradient the mean over data-parallel ranks, once per optimizer step (after all
    micro-batches): one flat all-reduce per dtype for the replicated weights over all ranks, and one for
    the routed experts over the ranks holding the same shard (each shard's gradient already sums the
    tokens of its expert group). FSDP2 reduces its own (sharded) gradients in backward."""
    if not d.active:
        return
    rest, experts = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            (experts if d.ep > 1 and is_routed_expert(name) else rest).append(p.grad)
    if not d.fsdp:
        _all_reduce_mean(rest, None, d.world_size)
    if experts and d.world_size > d.ep:
        _all_reduce_mean(experts, d.replica_group, d.world_size)
    elif experts:
        torch._foreach_div_(experts, d.world_size)


def _all_reduce_mean(grads: list[torch.Tensor], group, world_size: int) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)  # one buffer per dtype
        dist.all_reduce(flat, group=group)
        flat /= world_size
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def balance_count_reducer(d: Dist):
    """For moe.load_balance_scope=global_batch: sums a rank's (L, E) load-balance counts and its token
    count over all ranks, detached (one all-reduce per micro-batch)."""

    def reduce(counts: torch.Tensor, n_tokens: torch.Tensor):
        packed = torch.cat([counts.detach().float().reshape(-1), n_tokens.detach().float().reshape(1)])
        if d.active:
            dist.all_reduce(packed)
        return packed[:-1].view(counts.shape), packed[-1]

    return reduce


def broadcast_parameters(model: nn.Module, d: Dist) -> None:
    """Start every replica from rank 0's weights and buffers (all ranks build with one seed; this makes
    it certain). Sharded expert parameters are left alone."""
    if not d.active:
        return
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if not (d.ep > 1 and is_routed_expert(name)):
            dist.broadcast(t.data, 0)


# ----------------------------------------------------------------------------- full state for checkpoints


def _full(t: torch.Tensor, name: str, d: Dist) -> torch.Tensor | None:
    """The whole tensor of parameter `name`, on rank 0's CPU (None on the other ranks): FSDP2 shards are
    gathered, expert shards concatenated. Called one tensor at a time, so no accelerator holds more than
    one whole tensor beyond its own shards while a checkpoint is gathered."""
    if hasattr(t, "full_tensor"):  # a DTensor (FSDP2)
        whole = t.full_tensor()
    elif d.ep > 1 and is_routed_expert(name) and t.ndim > 0:
        parts = [torch.empty_like(t) for _ in range(d.ep)]
        dist.all_gather(parts, t.contiguous(), group=d.ep_group)
        whole = torch.cat(parts)
    else:
        whole = t
    return whole.cpu() if d.is_main else None


def full_state_dict(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """model.state_dict() with every tensor whole, on rank 0's CPU (collective: every rank calls it;
    only rank 0's result holds tensors)."""
    return {name: _full(t.detach(), name, d) for name, t in model.state_dict().items()}


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """Name of each parameter in the optimizer's state-dict order (its ids 0, 1, ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def full_optimizer_state(optimizer, model: nn.Module, d: Dist) -> dict:
    """optimizer.state_dict() with whole moment tensors on rank 0's CPU (collective; only rank 0's result
    holds them), so any world size can resume it."""
    state = optimizer.state_dict()
    if not d.active:
        return state
    names = _param_names(model, optimizer)
    state["state"] = {
        i: {k: _full(v, names[i], d) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return state


def shard_optimizer_state(state: dict, optimizer, model: nn.Module, d: Dist) -> dict:
    """The inverse of full_optimizer_state: each moment tensor cut to this rank's part of its parameter."""
    if not d.active:
        return state
    names = _param_names(model, optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def part(v, i):
        if not torch.is_tensor(v) or v.ndim == 0:
            return v
        p = params[i]
        if hasattr(p, "device_mesh"):  # FSDP2: the same placement as the parameter
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
        if d.ep > 1 and is_routed_expert(names[i]):
            per = v.shape[0] // d.ep
            return v[d.ep_rank * per : (d.ep_rank + 1) * per].clone()
        return v

    state = dict(state)
    state["state"] = {i: {k: part(v, int(i)) for k, v in s.items()} for i, s in state["state"].items()}
    return state


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
