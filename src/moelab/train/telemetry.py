"""Cheap per-step routing statistics, computed on device (the trainer reads them back in one transfer).

Per MoE layer: expert token counts, MaxVio = max(load)/mean(load) − 1, mean router entropy (nats)
over real tokens, and the range of the loss-free balancing bias.
"""

from __future__ import annotations

import torch

from moelab.models.base import model_routers
from moelab.moe.routing import RoutingInfo


def max_violation(counts: torch.Tensor) -> torch.Tensor:
    """counts: (L, E) -> (L,) max(load)/mean(load) − 1 (0 = perfectly balanced)."""
    counts = counts.float()
    return counts.max(dim=-1).values / counts.mean(dim=-1).clamp(min=1e-9) - 1.0


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
