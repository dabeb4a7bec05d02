"""Cheap per-step routing statistics, computed on device (the trainer reads them back in one transfer).

Per MoE layer: expert token counts, MaxVio = max(load)/mean(load) − 1, mean router entropy (nats)
over real tokens, the range of the loss-free balancing bias, and the RMS of the routing state where a
model returns one (`RoutingInfo.extra["routing_state"]`, cross-layer routing). Model-level values
come from an optional `model.telemetry()` (e.g. the cross-layer mixing weights α_l).
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
