"""OLMoE: the base Mixture-of-Experts transformer, an exact replica of OLMoE-1B-7B-0924.

This file holds only what is OLMoE's own: its config, the MoE block (router → routed experts, plus
shared experts), the pre-norm block and the model assembly. Generic layers come from
`moelab.models.layers`, routed experts from `moelab.moe`. To try a new architecture, copy this file
(`moelab new NAME --from olmoe`) and edit it; everything else in moelab depends only on the output
contract (`moelab.models.base`), never on this file's internals.

Numerics follow transformers' OlmoeForCausalLM: pre-norm blocks, an fp32-softmax router with top-k
and optional renormalisation, SwiGLU experts, untied lm_head. Additions that OLMoE does not use default
to off: shared experts, dense-first layers, loss-free balancing, mixed expert widths.

Shapes: B batch, N sequence, D d_model, E experts, k top-k, T = B·N flattened tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelab.config import Config, ModelConfig
from moelab.models.base import MoEModel, MoEOutput, normal_init
from moelab.models.layers import (
    Attention,
    KVCache,
    RMSNorm,
    SwiGLU,
)
from moelab.moe.experts import RoutedExperts
from moelab.moe.routing import TopKRouter


@dataclass
class OLMoEConfig(ModelConfig):
    """OLMoE adds no fields of its own: every field of the base `model:` section applies."""


class MoE(nn.Module):
    """Router → top-k routed experts (+ shared experts on every token)."""

    def __init__(self, cfg: OLMoEConfig, moe_cfg):
        super().__init__()
        self.router = TopKRouter(
            cfg.d_model,
            cfg.n_experts,
            cfg.top_k,
            cfg.norm_topk_prob,
            bias_on=moe_cfg.lflb_bias_on,
            bias_clamp=moe_cfg.lflb_bias_clamp,
        )
        self.experts = RoutedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, cfg.expert_widths)
        n_shared = cfg.n_shared_experts
        self.shared = SwiGLU(cfg.d_model, n_shared * cfg.d_expert) if n_shared else None

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        flat = x.reshape(B * N, D)  # (T, D)
        routing = self.router(flat)
        y = self.experts(flat, routing)  # (T, D); ids and weights from routing, which gets expert terms
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, N, D), routing


class Block(nn.Module):
    def __init__(self, cfg: OLMoEConfig, moe_cfg, dense: bool, moe_class: type[MoE] = MoE):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_dense) if dense else moe_class(cfg, moe_cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h)
            return x + y, routing
        return x + self.mlp(h), None


class OLMoE(MoEModel):
    config_class = OLMoEConfig
    moe_class = MoE  # an architecture that only changes the MoE block subclasses OLMoE and sets this

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        cfg = self.cfg = config.model
        # padding_idx: the pad row gets no gradient, as in transformers (it stays zero from init)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.blocks = nn.ModuleList(
            [
                Block(cfg, config.moe, i < cfg.n_dense_layers, self.moe_class)
                for i in range(cfg.n_total_layers)
            ]
        )
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # (Dh/2,)
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def routers(self) -> list[TopKRouter]:
        return [moe.router for moe in self.moe_layers]

    def reset_parameters(self) -> None:
        """N(0, init_std) (optionally truncated at ±3 std) for every matrix; norms 1; padding row 0;
        orthogonal router rows with moe.router_init=orthogonal."""
        normal_init(self, self.cfg)
        if self.config.moe.router_init == "orthogonal":
            for router in self.routers():
                nn.init.orthogonal_(router.weight)
        self.init_non_persistent()

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, N)
        attention_mask: torch.Tensor | None = None,  # (B, N), or (B, cached + N) with a cache; 1 = real
        labels: torch.Tensor | None = None,  # (B, N) next-token targets (already shifted); -100 = ignore
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, N); default: positions after the cache
    ) -> MoEOutput:
        x = self.embed(input_ids)  # (B, N, D)
        cos, sin, mask = self.positions(input_ids, attention_mask, cache, position_ids, x.dtype)
        routing = []
        for i, block in enumerate(self.blocks):
            x, r = block(x, cos, sin, mask, cache, i)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.head_output(input_ids, self.norm(x), routing, labels, attention_mask)


Model = OLMoE  # the registry builds `Model(config)` from each model file
