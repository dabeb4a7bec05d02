"""Expert kernels: three interchangeable ways to run routed experts on one device, identical results.

Every kernel computes, for each token t and each of its k slots,
    y[t, slot] = norm_e( down_e( silu(x[t] @ gate_e) * (x[t] @ up_e) ) ),   e = topk_ids[t, slot]
    out[t]    += w[t, slot] · y[t, slot]
where norm_e is the identity, or the per-expert output RMSNorm (`moe.expert_output_norm`) applied to
each expert's own output before its mixing weight. With per_slot=True a kernel also returns the
unmixed y (T, k, D), in (token, slot) order, for regularisers that compare a token's experts (the
expert-output orthogonality); without it y is summed and never kept, so asking nothing costs nothing.
The experts come as `ExpertGroup`s: consecutive experts that share one hidden width I, stacked as
gate_up (n, D, 2I) = [gate | up] and down (n, I, D). Equal-width experts are one group; mixed widths
(`model.expert_widths`) are one group per width.

  loop     readable reference: one select + matmul + weighted index_add per expert.
  sorted   sort the (token, slot) pairs by expert once, run one contiguous chunk per expert.
  grouped  the same sorted layout through torch.nn.functional.grouped_mm, one call per group: no host
           sync with one group; one per layer with several (the row count of each group).

All kernels are differentiable in x, the weights, the norm weights and the mixing weights (so the
router learns), through `out` and through y.
Dispatchers (moe/experts.py) choose the kernel; this module knows nothing of devices or ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.models.layers import swiglu

log = logging.getLogger(__name__)
PATHS = ("loop", "sorted", "grouped")
__all__ = ["PATHS", "ExpertGroup", "ExpertNorm", "run_experts", "run_expert_groups", "swiglu"]

# (y (n, D), experts: int or (n,) long ids of each row) -> (n, D): the per-expert output norm
ExpertNorm = Callable[[torch.Tensor, "int | torch.Tensor"], torch.Tensor]


@dataclass
class ExpertGroup:
    """Experts first .. first + n - 1, all of one hidden width I."""

    first: int
    gate_up: torch.Tensor  # (n, D, 2I) = [gate | up]
    down: torch.Tensor  # (n, I, D)

    @property
    def n(self) -> int:
        return self.gate_up.shape[0]


def run_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    path: str = "grouped",
    norm: ExpertNorm | None = None,
    per_slot: bool = False,
):
    """Equal-width experts stacked as gate_up (E, D, 2I), down (E, I, D); see run_expert_groups."""
    groups = [ExpertGroup(0, gate_up, down)]
    return run_expert_groups(x, topk_ids, topk_weights, groups, path, norm, per_slot)


def run_expert_groups(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: list[ExpertGroup],
    path: str = "grouped",
    norm: ExpertNorm | None = None,
    per_slot: bool = False,
):
    """x: (T, D), topk_ids: (T, k) long, topk_weights: (T, k) -> out (T, D) in the compute dtype, or
    (out, y (T, k, D)) with per_slot=True, y being each slot's expert output before its mixing weight
    (0 for id -1). norm: the per-expert output norm applied to every expert output, or None.

    Under autocast (bf16 on GPU) everything is cast to the autocast dtype first: grouped_mm is not an
    autocast op, and index_add needs one dtype for the expert outputs and the mixing weights.
    """
    if path not in PATHS:
        raise ValueError(f"unknown dispatch path {path!r}; choose one of {', '.join(PATHS)}")
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, topk_weights = x.to(dtype), topk_weights.to(dtype)
    # id -1 = "no expert" (hierarchical models pad with it): route the slot to expert 0 with weight 0,
    # which adds exactly 0 and keeps every path free of host syncs.
    none = topk_ids < 0
    topk_ids, topk_weights = topk_ids.clamp(min=0), topk_weights.masked_fill(none, 0.0)
    groups = [ExpertGroup(g.first, g.gate_up.to(dtype), g.down.to(dtype)) for g in groups]
    if path == "grouped" and not all(grouped_mm_usable(x, g.gate_up, g.down) for g in groups):
        path = "sorted"
    kernel = {"loop": experts_loop, "sorted": experts_sorted, "grouped": experts_grouped}[path]
    out, y = kernel(x, topk_ids, topk_weights, groups, norm, per_slot)
    if not per_slot:
        return out
    return out, y.masked_fill(none[..., None], 0.0)  # (T, k, D); a -1 slot has no expert output


def experts_loop(x, topk_ids, topk_weights, groups, norm=None, per_slot=False):
    out = torch.zeros_like(x)
    T, k = topk_ids.shape
    y_slots = x.new_zeros(T, k, x.shape[1]) if per_slot else None  # (T, k, D)
    for g in groups:
        # unbind once: indexing gate_up[e] per expert makes backward build a full-size zero gradient each time
        for j, (gate_up, down) in enumerate(zip(g.gate_up.unbind(0), g.down.unbind(0))):
            token_idx, slot = torch.where(topk_ids == g.first + j)  # tokens routed here, and in which slot
            y = swiglu(x[token_idx], gate_up, down)  # (n_e, D)
            if norm is not None:
                y = norm(y, g.first + j)
            if per_slot:
                y_slots[token_idx, slot] = y
            out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None])
    return out, y_slots


def _sort_by_expert(topk_ids: torch.Tensor, n_experts: int):
    """Order of the flattened (token, slot) pairs grouped by expert, and tokens per expert."""
    flat = topk_ids.reshape(-1)  # (T·k,)
    order = torch.argsort(flat, stable=True)  # (T·k,) pair indices, expert-major
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    return order, counts


def _mix_sorted(x, y, order, topk_ids, topk_weights, norm, per_slot):
    """y: (T·k, D) expert outputs of the pairs in `order` -> out (T, D), and y in (T, k, D) order."""
    T, k = topk_ids.shape
    if norm is not None:
        y = norm(y, topk_ids.reshape(-1)[order])  # each row's own expert
    out = torch.zeros_like(x).index_add_(0, order // k, y * topk_weights.reshape(-1)[order, None])
    if not per_slot:
        return out, None
    return out, torch.zeros_like(y).index_copy(0, order, y).view(T, k, -1)  # back to (token, slot) order


def experts_sorted(x, topk_ids, topk_weights, groups, norm=None, per_slot=False):
    k = topk_ids.shape[1]
    order, counts = _sort_by_expert(topk_ids, sum(g.n for g in groups))
    token_idx = order // k  # (T·k,) token of each sorted pair
    chunks = torch.split(x[token_idx], counts.tolist())  # one host sync per layer
    weights = [(gu, dn) for g in groups for gu, dn in zip(g.gate_up.unbind(0), g.down.unbind(0))]
    y = torch.cat([swiglu(c, gu, dn) for c, (gu, dn) in zip(chunks, weights)])  # (T·k, D)
    return _mix_sorted(x, y, order, topk_ids, topk_weights, norm, per_slot)


def experts_grouped(x, topk_ids, topk_weights, groups, norm=None, per_slot=False):
    k = topk_ids.shape[1]
    order, counts = _sort_by_expert(topk_ids, sum(g.n for g in groups))
    token_idx = order // k
    rows = x[token_idx]  # (T·k, D) sorted by expert, so each group's rows are contiguous
    if len(groups) > 1:  # one host sync: where each width group's rows start
        sizes = torch.stack([counts[g.first : g.first + g.n].sum() for g in groups]).tolist()
        row_groups = torch.split(rows, sizes)
    else:
        row_groups = (rows,)
    outs = []
    for g, r in zip(groups, row_groups):
        offs = torch.cumsum(counts[g.first : g.first + g.n], dim=0).to(torch.int32)  # (n,) end of each expert
        h = _contiguous_grad(F.grouped_mm(r, g.gate_up, offs=offs))  # (rows, 2I)
        gate, up = h.chunk(2, dim=-1)
        outs.append(_contiguous_grad(F.grouped_mm(F.silu(gate) * up, g.down, offs=offs)))  # (rows, D)
    y = outs[0] if len(outs) == 1 else torch.cat(outs)  # (T·k, D)
    return _mix_sorted(x, y, order, topk_ids, topk_weights, norm, per_slot)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects stride-0 (expanded) incoming gradients.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


_warned: set[str] = set()


def grouped_mm_usable(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """grouped_mm exists, and every row stride is a multiple of 16 bytes (its kernels require it)."""
    reason = None
    if not hasattr(F, "grouped_mm"):
        reason = "this torch has no torch.nn.functional.grouped_mm"
    elif x.device.type == "cpu" and x.dtype not in (torch.float32, torch.bfloat16):
        reason = f"grouped_mm on CPU supports fp32/bf16, not {x.dtype}"
    elif x.device.type == "cuda" and (
        x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 8
    ):
        reason = "grouped_mm on CUDA needs bf16 (train.dtype=bf16) and a GPU of compute capability >= 8.0"
    elif torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        reason = "under torch.compile grouped_mm supports only bf16"
    elif any((n * x.element_size()) % 16 for n in (x.shape[-1], gate_up.shape[-1], down.shape[-2])):
        reason = "d_model and every expert's hidden width (x2) must be multiples of 16 bytes for grouped_mm"
    if reason and reason not in _warned:
        _warned.add(reason)
        log.warning("dispatch=grouped unavailable (%s); using dispatch=sorted", reason)
    return reason is None
