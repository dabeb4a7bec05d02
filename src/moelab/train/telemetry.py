"""Cheap per-step routing statistics, computed on device (the trainer reads them back in one transfer).

Per MoE layer: expert token counts, MaxVio = max(load)/mean(load) − 1, mean router entropy (nats)
over real tokens, the range of the loss-free balancing bias, the RMS of the routing state where a
model returns one (`RoutingInfo.extra["routing_state"]`, cross-layer routing), and, for models whose
routed experts have unequal hidden widths, the load share of each width group. Over the window of
steps since the previous logged line: the number of dead experts (no tokens) and percentiles of the
per-expert load share. Model-level values come from an optional `model.telemetry()` (e.g. the
cross-layer mixing weights α_l).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.models.base import model_routers
from moelab.moe.experts import RoutedExperts
from moelab.moe.routing import RoutingInfo


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """counts: (L, E) -> (L,) max(load)/mean(load) − 1 (0 = perfectly balanced)."""
    counts = counts.float()
    return counts.max(dim=-1).values / counts.mean(dim=-1).clamp(min=1e-9) - 1.0


LOAD_PERCENTILES = (0.0, 25.0, 50.0, 75.0, 100.0)


def window_load_stats(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts: (L, E) summed over a window -> (dead (L,), load_pct (L, P)), on device.

    dead: experts with zero tokens; load_pct: the `LOAD_PERCENTILES` of each layer's per-expert load
    share (count / layer total; 0 for a layer without assignments), linearly interpolated between the
    sorted shares as numpy.percentile's default method does.
    """
    c = counts.float()
    dead = (c == 0).sum(dim=-1).float()
    share = c / c.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    ordered = share.sort(dim=-1).values  # (L, E)
    pos = torch.tensor(LOAD_PERCENTILES, device=c.device) / 100.0 * (c.shape[-1] - 1)  # (P,)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    frac = pos - lo.float()
    low, high = ordered[:, lo], ordered[:, hi]  # (L, P)
    return dead, low + (high - low) * frac


def router_entropy(routing: list[RoutingInfo], valid: torch.Tensor | None) -> torch.Tensor:
    """(L,) mean per-token entropy of the (unbiased) router distribution, padding excluded."""
    out = []
    for r in routing:
        logp = r.router_logits.detach().float().log_softmax(dim=-1)  # (T, E)
        h = -(logp.exp() * logp).sum(dim=-1)  # (T,)
        if valid is None:
            out.append(h.mean())
        else:
            w = valid.reshape(-1).float()
            out.append((h * w).sum() / w.sum().clamp(min=1))
    return torch.stack(out)


def balance_bias_range(model: torch.nn.Module) -> torch.Tensor:
    """(L, 2) min and max of each MoE layer's balancing bias (0, 0 for a router without one).

    One row per entry of `model.routers()`, so a router shared by several layers appears once per layer.
    """
    rows = []
    for router in model_routers(model):
        bias = getattr(router, "balance_bias", None)
        if bias is None:
            rows.append(torch.zeros(2))
        else:
            b = bias.detach().float().cpu()
            rows.append(torch.stack([b.min(), b.max()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2)


def routing_state_rms(routing: list[RoutingInfo]) -> torch.Tensor | None:
    """(L,) root mean square of each MoE layer's routing state over all tokens, or None when the model
    returns no routing state."""
    states = [r.extra.get("routing_state") for r in routing]
    if not states or any(s is None for s in states):
        return None
    return torch.stack([s.detach().float().pow(2).mean().sqrt() for s in states])


def model_telemetry(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{name: (n,) tensor} from the model's optional `telemetry()` method; {} without one."""
    values = model.telemetry() if callable(getattr(model, "telemetry", None)) else {}
    return {name: v.detach().float().reshape(-1) for name, v in values.items()}


def expert_widths(model: torch.nn.Module) -> list[list[int]] | None:
    """Hidden width of every routed expert, one list per MoE layer in `model.routers()` order, or None
    when every expert has the same width.

    Read from the model's `RoutedExperts` modules (module order = layer order); one module shared by
    every layer is listed once per layer. None too when the modules do not map onto the layers."""
    modules = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    n_layers = len(model_routers(model))
    if len(modules) == 1:
        modules = modules * n_layers
    if not modules or len(modules) != n_layers:
        return None
    widths = [[int(w) for w in m.hidden] for m in modules]
    return widths if len({w for row in widths for w in row}) > 1 else None


@dataclass
class WidthGroups:
    """The experts of each MoE layer grouped by hidden width, for `width_group_load`."""

    widths: list[int]  # (G,) distinct widths, ascending
    index: torch.Tensor  # (L, E) long: the group of each expert
    experts: list[list[int]]  # (L, G) experts of each width per layer (perfect balance: experts / E)

    @classmethod
    def of(cls, model: torch.nn.Module, device) -> WidthGroups | None:
        widths = expert_widths(model)
        if widths is None:
            return None
        distinct = sorted({w for row in widths for w in row})
        index = [[distinct.index(w) for w in row] for row in widths]
        experts = [[row.count(g) for g in range(len(distinct))] for row in index]
        return cls(distinct, torch.tensor(index, dtype=torch.long, device=device), experts)


def width_group_load(counts: torch.Tensor, groups: WidthGroups) -> torch.Tensor:
    """counts: (L, E) -> (L, G) share of each layer's top-k assignments going to each width group,
    on device (the trainer reads it back with the other per-layer values)."""
    c = counts.float()
    per_group = torch.zeros(c.shape[0], len(groups.widths), device=c.device)
    per_group.scatter_add_(1, groups.index.to(c.device), c)
    return per_group / per_group.sum(dim=1, keepdim=True).clamp(min=1e-9)
