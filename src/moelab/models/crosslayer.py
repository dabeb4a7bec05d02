"""Cross-layer routing: a routing state that persists across layers, read by one router shared by all.

A low-dimensional routing state r (width Z = `model.routing_dim`) runs beside the residual stream.
The embedding has width D + Z: h = e[..., :D] is the residual stream, r₀ = e[..., D:]. In every block,
after attention and the post-attention RMSNorm (x̂, what the experts see), the state is updated

    r_l = RMSNorm_Z(mix(r_{l-1}, update(x̂)))
    update:  gated  a(x̂) · silu(b(x̂))        two bias-free Linear(D→Z)
             linear a(x̂)                      one bias-free Linear(D→Z)
    mix:     sum    r_{l-1} + u
             alpha  (1 − α_l)·r_{l-1} + α_l·u,  α_l = ½ + ½·tanh(θ_l), θ_l a scalar per block, init 0

and the router of MoE layer l reads only r_l: logits = shared_gate(r_l) + offset_l(r_l), with one
bias-free Linear(Z→E) held once by the model and one per MoE layer (its router's `weight`, initialised
to 0: every layer starts from the shared router). Expert index e therefore means the same routing
direction at every depth (the experts themselves are not shared). The penalty
losses["router_offset"] = Σ_l mean (or sum) of offset_l's squared weights keeps layers near the shared
router, weighted by `model.router_offset_coef`. Top-k, norm_topk_prob, loss-free balancing (a bias
per layer) and the balancing losses are the base model's. `RoutingInfo.extra["routing_state"]` = r_l.

Everything else (attention, norms, RoPE, KV cache, routed experts, losses) is shared with the base.
Shapes: B batch, N sequence, D d_model, Z routing_dim, E experts, T = B·N, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moelab.config import Config, ModelConfig
from moelab.errors import ConfigError
from moelab.models.base import MoEModel, MoEOutput, normal_init
from moelab.models.layers import (
    Attention,
    KVCache,
    RMSNorm,
    SwiGLU,
)
from moelab.moe.experts import RoutedExperts
from moelab.moe.routing import RoutingInfo, TopKRouter


@dataclass
class CrossLayerConfig(ModelConfig):
    """Cross-layer routing: a routing state beside the residual stream, one router shared by all layers."""

    routing_dim: int = 32  # Z: width of the routing state
    routing_update: Literal["gated", "linear"] = "gated"  # gated: a(x̂)·silu(b(x̂)); linear: a(x̂)
    routing_mix: Literal["sum", "alpha"] = "sum"  # sum: r + u; alpha: (1-α_l)·r + α_l·u, α_l = ½+½·tanh(θ_l)
    routing_dense_layers: bool = True  # dense-first layers update the routing state too (own update, norm)
    router_offset_penalty: Literal["mean", "sum"] = "mean"  # per layer: mean or sum of squared offsets
    router_offset_coef: float = 0.1  # weight of losses["router_offset"] (summed over MoE layers)

    def validate(self) -> None:
        super().validate()
        if self.routing_dim <= 0:
            raise ConfigError(f"model.routing_dim={self.routing_dim} must be > 0")
        if not (self.router_offset_coef >= 0 and math.isfinite(self.router_offset_coef)):
            raise ConfigError(
                f"model.router_offset_coef={self.router_offset_coef} must be a finite number >= 0"
            )


class RoutingStateUpdate(nn.Module):
    """r_l = RMSNorm_Z(mix(r_{l-1}, update(x̂)))."""

    def __init__(self, cfg: CrossLayerConfig):
        super().__init__()
        self.a = nn.Linear(cfg.d_model, cfg.routing_dim, bias=False)
        self.b = (
            nn.Linear(cfg.d_model, cfg.routing_dim, bias=False) if cfg.routing_update == "gated" else None
        )
        self.theta = nn.Parameter(torch.zeros(())) if cfg.routing_mix == "alpha" else None  # α = ½ at init
        self.norm = RMSNorm(cfg.routing_dim, cfg.rms_norm_eps)

    def forward(self, r, h):  # r: (B, N, Z) previous state, h: (B, N, D) normalised hidden state
        u = self.a(h) if self.b is None else self.a(h) * F.silu(self.b(h))  # (B, N, Z)
        if self.theta is None:
            r = r + u
        else:
            alpha = (0.5 + 0.5 * torch.tanh(self.theta.float())).to(u.dtype)
            r = (1 - alpha) * r + alpha * u
        return self.norm(r)


class CrossLayerRouter(TopKRouter):
    """One MoE layer's router: logits = (shared_gate + offset)(r). Its `weight` (E, Z) is the offset."""

    def forward(self, r: torch.Tensor, shared_gate: torch.Tensor) -> RoutingInfo:  # r: (T, Z), gate: (E, Z)
        logits = F.linear(r, shared_gate + self.weight).float()  # (T, E)
        topk_ids, topk_weights = self.select(logits)
        return RoutingInfo(logits, topk_ids, topk_weights.to(r.dtype), {"routing_state": r})


class MoE(nn.Module):
    """Router on the routing state → top-k routed experts on x̂ (+ shared experts on every token)."""

    def __init__(self, cfg: CrossLayerConfig, moe_cfg):
        super().__init__()
        self.router = CrossLayerRouter(
            cfg.routing_dim,
            cfg.n_experts,
            cfg.top_k,
            cfg.norm_topk_prob,
            bias_on=moe_cfg.lflb_bias_on,
            bias_clamp=moe_cfg.lflb_bias_clamp,
        )
        self.experts = RoutedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, cfg.expert_widths)
        n_shared = cfg.n_shared_experts
        self.shared = SwiGLU(cfg.d_model, n_shared * cfg.d_expert) if n_shared else None

    def forward(self, h, r, shared_gate):  # h: (B, N, D), r: (B, N, Z)
        B, N, D = h.shape
        flat = h.reshape(B * N, D)  # (T, D)
        routing = self.router(r.reshape(B * N, -1), shared_gate)
        y = self.experts(flat, routing.topk_ids, routing.topk_weights)  # (T, D)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, N, D), routing


class Block(nn.Module):
    def __init__(self, cfg: CrossLayerConfig, moe_cfg, dense: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_dense) if dense else MoE(cfg, moe_cfg)
        updates = not dense or cfg.routing_dense_layers
        self.routing_update = RoutingStateUpdate(cfg) if updates else None

    def forward(self, x, r, shared_gate, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.mlp_norm(x)  # x̂: what the experts and the routing update see
        if self.routing_update is not None:
            r = self.routing_update(r, h)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h, r, shared_gate)
            return x + y, r, routing
        return x + self.mlp(h), r, None


class CrossLayer(MoEModel):
    config_class = CrossLayerConfig

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        cfg = self.cfg = config.model
        # one table of width D + Z: the residual stream and the initial routing state of each token
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model + cfg.routing_dim, padding_idx=cfg.pad_token_id)
        self.shared_gate = nn.Linear(cfg.routing_dim, cfg.n_experts, bias=False)  # (E, Z), every MoE layer
        self.blocks = nn.ModuleList(
            [Block(cfg, config.moe, dense=i < cfg.n_dense_layers) for i in range(cfg.n_total_layers)]
        )
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # (Dh/2,)
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def routers(self) -> list[CrossLayerRouter]:
        return [moe.router for moe in self.moe_layers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The base init (orthogonal shared gate with moe.router_init=orthogonal); then offsets 0 (every
        layer starts from the shared router) and θ 0 (α = ½)."""
        normal_init(self, self.cfg)
        if self.config.moe.router_init == "orthogonal":
            nn.init.orthogonal_(self.shared_gate.weight)
        for router in self.routers():
            router.weight.zero_()
        for block in self.blocks:
            if block.routing_update is not None and block.routing_update.theta is not None:
                block.routing_update.theta.zero_()
        self.init_non_persistent()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, N)
        attention_mask: torch.Tensor | None = None,  # (B, N), or (B, cached + N) with a cache; 1 = real
        labels: torch.Tensor | None = None,  # (B, N) next-token targets (already shifted); -100 = ignore
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, N); default: positions after the cache
    ) -> MoEOutput:
        e = self.embed(input_ids)  # (B, N, D + Z)
        x, r = e[..., : self.cfg.d_model], e[..., self.cfg.d_model :]  # (B, N, D), (B, N, Z)
        cos, sin, mask = self.positions(input_ids, attention_mask, cache, position_ids, x.dtype)
        routing = []
        for i, block in enumerate(self.blocks):
            x, r, info = block(x, r, self.shared_gate.weight, cos, sin, mask, cache, i)
            if info is not None:
                routing.append(info)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = self.lm_head(self.norm(x))  # (B, N, V)
        extra = {"router_offset": self.router_offset_penalty()} if labels is not None else None
        return self.output(input_ids, logits, routing, labels, attention_mask, extra)

    def effective_router_weights(self) -> list[torch.Tensor]:
        """(E, Z) per MoE layer: shared gate + that layer's offset (what `moelab trace` compares)."""
        return [self.shared_gate.weight + router.weight for router in self.routers()]

    router_weights = effective_router_weights  # what the router-orthogonality regulariser reads

    def telemetry(self) -> dict[str, torch.Tensor]:
        """Logged by the trainer under "model": the mixing weight α_l of every block that has one."""
        thetas = [b.routing_update.theta for b in self.blocks if b.routing_update is not None]
        thetas = [t for t in thetas if t is not None]
        return {"routing_alpha": 0.5 + 0.5 * torch.tanh(torch.stack(thetas).float())} if thetas else {}

    def router_offset_penalty(self) -> torch.Tensor:
        """Σ over MoE layers of the mean (or sum) of the offset's squared weights."""
        per_layer = [r.weight.float().pow(2) for r in self.routers()]
        reduce = torch.mean if self.cfg.router_offset_penalty == "mean" else torch.sum
        return torch.stack([reduce(w) for w in per_layer]).sum()


Model = CrossLayer  # the registry builds `Model(config)` from each model file
