"""Running the routed experts: three interchangeable paths with identical results.

Every path computes, for each token t and each of its k slots,
    out[t] += w[t, slot] · down_e( silu(x[t] @ gate_e) * (x[t] @ up_e) ),   e = topk_ids[t, slot]
with stacked expert weights gate_up (E, D, 2I) = [gate | up] and down (E, I, D).

  loop     readable reference: one select + matmul + weighted index_add per expert.
  sorted   sort the (token, slot) pairs by expert once, run one contiguous chunk per expert.
  grouped  the same sorted layout through torch.nn.functional.grouped_mm: no host sync at all.

All paths are differentiable in x, the weights and the mixing weights (so the router learns).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
PATHS = ("loop", "sorted", "grouped")


def run_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    path: str = "grouped",
) -> torch.Tensor:
    """x: (T, D), topk_ids: (T, k) long, topk_weights: (T, k) -> (T, D) in the compute dtype.

    Under autocast (bf16 on GPU) everything is cast to the autocast dtype first: grouped_mm is not an
    autocast op, and index_add needs one dtype for the expert outputs and the mixing weights.
    """
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, topk_weights = x.to(dtype), topk_weights.to(dtype)
    # id -1 = "no expert" (hierarchical models pad with it): route the slot to expert 0 with weight 0,
    # which adds exactly 0 and keeps every path free of host syncs.
    none = topk_ids < 0
    topk_ids, topk_weights = topk_ids.clamp(min=0), topk_weights.masked_fill(none, 0.0)
    gate_up, down = gate_up.to(dtype), down.to(dtype)
    if path == "grouped":
        if grouped_mm_usable(x, gate_up, down):
            return experts_grouped(x, topk_ids, topk_weights, gate_up, down)
        path = "sorted"
    if path == "sorted":
        return experts_sorted(x, topk_ids, topk_weights, gate_up, down)
    if path == "loop":
        return experts_loop(x, topk_ids, topk_weights, gate_up, down)
    raise ValueError(f"unknown dispatch path {path!r}; choose one of {', '.join(PATHS)}")


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert (or a dense MLP): down(silu(gate(x)) * up(x)). gate_up: (D, 2I), down: (I, D)."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def experts_loop(x, topk_ids, topk_weights, gate_up, down):
    out = torch.zeros_like(x)
    # unbind once: indexing gate_up[e] per expert makes backward build a full-size zero gradient each time
    gate_ups, downs = gate_up.unbind(0), down.unbind(0)
    for e in range(gate_up.shape[0]):
        token_idx, slot = torch.where(topk_ids == e)  # tokens routed to e, and in which of their k slots
        y = swiglu(x[token_idx], gate_ups[e], downs[e])  # (n_e, D)
        out.index_add_(0, token_idx, y * topk_weights[token_idx, slot, None])
    return out


def _sort_by_expert(topk_ids: torch.Tensor, n_experts: int):
    """Order of the flattened (token, slot) pairs grouped by expert, and tokens per expert."""
    flat = topk_ids.reshape(-1)  # (T·k,)
    order = torch.argsort(flat, stable=True)  # (T·k,) pair indices, expert-major
    counts = torch.bincount(flat, minlength=n_experts)  # (E,)
    return order, counts


def experts_sorted(x, topk_ids, topk_weights, gate_up, down):
    k = topk_ids.shape[1]
    order, counts = _sort_by_expert(topk_ids, gate_up.shape[0])
    token_idx = order // k  # (T·k,) token of each sorted pair
    chunks = torch.split(x[token_idx], counts.tolist())  # one host sync per layer
    experts = zip(chunks, gate_up.unbind(0), down.unbind(0))
    y = torch.cat([swiglu(c, gu, dn) for c, gu, dn in experts])  # (T·k, D)
    y = y * topk_weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_idx, y)


def experts_grouped(x, topk_ids, topk_weights, gate_up, down):
    k = topk_ids.shape[1]
    order, counts = _sort_by_expert(topk_ids, gate_up.shape[0])
    token_idx = order // k
    offs = torch.cumsum(counts, dim=0).to(torch.int32)  # (E,) end of each expert's rows
    h = _contiguous_grad(F.grouped_mm(x[token_idx], gate_up, offs=offs))  # (T·k, 2I)
    gate, up = h.chunk(2, dim=-1)
    y = _contiguous_grad(F.grouped_mm(F.silu(gate) * up, down, offs=offs))  # (T·k, D)
    y = y * topk_weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_idx, y)


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
        reason = "d_model, 2*d_expert and d_expert must be multiples of 16 bytes for grouped_mm"
    if reason and reason not in _warned:
        _warned.add(reason)
        log.warning("dispatch=grouped unavailable (%s); using dispatch=sorted", reason)
    return reason is None
