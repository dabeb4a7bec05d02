"""A test-only architecture: OLMoE with ONE router module shared by every MoE layer.

It exercises what a new architecture relies on without being built in: its own config dataclass
(`shared_router_scale`, `router_norm_coef`), a model-specific loss term weighted by its own coefficient,
and a router that `routers()` lists once per layer (tracing, telemetry, interventions, loss-free
balancing must all cope). Loaded by path: `model.arch: <this file>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.models.olmoe import OLMoE, OLMoEConfig
from moelab.moe.losses import loss_coefficients, weighted_loss


@dataclass
class SharedRouterConfig(OLMoEConfig):
    """OLMoE with one router for all MoE layers."""

    shared_router_scale: float = 1.0  # multiplies the shared router's initial weights
    router_norm_coef: float = 0.0  # weight of losses["router_norm"], the shared router's mean squared weight

    def validate(self) -> None:
        super().validate()
        if self.shared_router_scale <= 0:
            from moelab.errors import ConfigError

            raise ConfigError(f"model.shared_router_scale={self.shared_router_scale} must be > 0")


class SharedRouterOLMoE(OLMoE):
    config_class = SharedRouterConfig

    def __init__(self, config):
        super().__init__(config)
        router = self.moe_layers[0].router
        router.weight.data.mul_(config.model.shared_router_scale)
        for moe in self.moe_layers[1:]:
            moe.router = router  # the same module in every MoE layer

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        out = super().forward(input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if labels is not None:
            out.losses["router_norm"] = self.moe_layers[0].router.weight.float().pow(2).mean()
            out.loss = weighted_loss(out.losses, loss_coefficients(self.config))
        return out


Model = SharedRouterOLMoE
