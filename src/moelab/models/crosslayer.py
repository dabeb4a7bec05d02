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

Optional context in the routing state, each off by default, applied in this order after the update:
    window     W = `model.routing_window`: r ← (1 − γ_l)·r + γ_l·mean(r over the last W positions of
               the same document, real tokens only, fp32), γ_l = ½ + ½·tanh(φ_l), φ_l initialised to
               `model.routing_window_gamma_init`. A document starts after each eos token.
    attention  H = `model.routing_attention_heads`: r ← RMSNorm_Z(r + attn(r)), causal self-attention
               over r with Z-wide projections and its own RoPE (head dim Z/H), eager so that the mean
               attention paid to other positions (real tokens) is known: RoutingInfo.extra
               ["routing_attention_other"], logged by telemetry.
With a KV cache, the past routing states, document ids and routing keys/values are cached too.

Everything else (attention, norms, RoPE, KV cache, routed experts, losses) is shared with the base.
Shapes: B batch, N sequence, D d_model, Z routing_dim, E experts, T = B·N, V vocabulary.
"""

from __future__ import annotations

import dataclasses
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
    apply_rope,
    rope_cos_sin,
    rope_inv_freq,
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
    routing_window: int = 0  # W > 0: mix in the causal mean of the last W states of the same document
    routing_window_gamma_init: float = 0.0  # φ at init; the window's weight is γ = ½ + ½·tanh(φ)
    routing_attention_heads: int = 0  # H > 0: r ← RMSNorm_Z(r + causal self-attention over r)

    def validate(self) -> None:
        super().validate()
        if self.routing_dim <= 0:
            raise ConfigError(f"model.routing_dim={self.routing_dim} must be > 0")
        if not (self.router_offset_coef >= 0 and math.isfinite(self.router_offset_coef)):
            raise ConfigError(
                f"model.router_offset_coef={self.router_offset_coef} must be a finite number >= 0"
            )
        if self.routing_window < 0 or self.routing_attention_heads < 0:
            raise ConfigError("model.routing_window and model.routing_attention_heads must be >= 0 (0 = off)")
        if not math.isfinite(self.routing_window_gamma_init):
            raise ConfigError(
                f"model.routing_window_gamma_init={self.routing_window_gamma_init} must be finite"
            )
        H = self.routing_attention_heads
        if H and (self.routing_dim % H or (self.routing_dim // H) % 2):
            raise ConfigError(
                f"model.routing_dim={self.routing_dim} must split into model.routing_attention_heads={H} "
                f"heads of even width (for rotary embeddings)"
            )


@dataclass
class RoutingContext:
    """What the routing state's context steps need besides r, computed once per forward call."""

    docs: torch.Tensor  # (B, n_k) long document id of every position so far (cached + this call)
    valid: torch.Tensor | None  # (B, n_k) bool real tokens, None = all real
    cos: torch.Tensor | None  # (B, 1, N, Z/H) RoPE of the routing attention (None without it)
    sin: torch.Tensor | None
    mask: torch.Tensor | None  # the model's attention mask (B or 1, 1, N, n_k); None = plain causal
    cache: CrossLayerCache | None
    layer: int = 0


class RoutingStateUpdate(nn.Module):
    """r_l = RMSNorm_Z(mix(r_{l-1}, update(x̂))), then the optional window and attention steps."""

    def __init__(self, cfg: CrossLayerConfig):
        super().__init__()
        self.a = nn.Linear(cfg.d_model, cfg.routing_dim, bias=False)
        self.b = (
            nn.Linear(cfg.d_model, cfg.routing_dim, bias=False) if cfg.routing_update == "gated" else None
        )
        self.theta = nn.Parameter(torch.zeros(())) if cfg.routing_mix == "alpha" else None  # α = ½ at init
        self.norm = RMSNorm(cfg.routing_dim, cfg.rms_norm_eps)
        self.window = cfg.routing_window
        self.phi = nn.Parameter(torch.full((), cfg.routing_window_gamma_init)) if self.window else None
        self.attention = RoutingAttention(cfg) if cfg.routing_attention_heads else None

    def forward(self, r, h, ctx: RoutingContext):  # r: (B, N, Z) previous state, h: (B, N, D) = x̂
        u = self.a(h) if self.b is None else self.a(h) * F.silu(self.b(h))  # (B, N, Z)
        if self.theta is None:
            r = r + u
        else:
            alpha = (0.5 + 0.5 * torch.tanh(self.theta.float())).to(u.dtype)
            r = (1 - alpha) * r + alpha * u
        r = self.norm(r)
        if self.window:
            gamma = (0.5 + 0.5 * torch.tanh(self.phi.float())).to(r.dtype)
            r = (1 - gamma) * r + gamma * window_mean(r, self.window, ctx)
        stats = {}
        if self.attention is not None:
            r, stats["routing_attention_other"] = self.attention(r, ctx)
        return r, stats


def window_mean(r: torch.Tensor, window: int, ctx: RoutingContext) -> torch.Tensor:
    """(B, N, Z) mean of each position's last `window` states (itself included) within its document,
    real tokens only, in fp32. A loop over the W offsets, each a masked shifted add: exact, no cumsums."""
    B, N, Z = r.shape
    past = ctx.cache.store_state(ctx.layer, r) if ctx.cache is not None else r  # (B, n_k, Z) incl. cache
    n_k = past.shape[1]
    past = past.float()
    keep = torch.ones(B, n_k, dtype=torch.bool, device=r.device) if ctx.valid is None else ctx.valid
    docs = ctx.docs  # (B, n_k)
    total = torch.zeros(B, N, Z, device=r.device)
    count = torch.zeros(B, N, 1, device=r.device)
    q = torch.arange(n_k - N, n_k, device=r.device)  # (N,) positions of this call's tokens
    for s in range(min(window, n_k)):
        j = q - s  # (N,) the position s steps back
        ok = j >= 0
        jc = j.clamp(min=0)
        same = ok & (docs[:, jc] == docs[:, q]) & keep[:, jc]  # (B, N)
        total += past[:, jc] * same[..., None]
        count += same[..., None]
    return (total / count.clamp(min=1)).to(r.dtype)


class RoutingAttention(nn.Module):
    """r ← RMSNorm_Z(r + attn(r)): causal multi-head self-attention over the routing state, Z-wide
    projections, RoPE of head dim Z/H. Eager (fp32 softmax), so the attention to other positions is known."""

    def __init__(self, cfg: CrossLayerConfig):
        super().__init__()
        Z, self.n_heads = cfg.routing_dim, cfg.routing_attention_heads
        self.head_dim = Z // self.n_heads
        self.q_proj, self.k_proj = nn.Linear(Z, Z, bias=False), nn.Linear(Z, Z, bias=False)
        self.v_proj, self.o_proj = nn.Linear(Z, Z, bias=False), nn.Linear(Z, Z, bias=False)
        self.norm = RMSNorm(Z, cfg.rms_norm_eps)

    def forward(self, r, ctx: RoutingContext):  # r: (B, N, Z)
        B, N, Z = r.shape
        projs = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(r).view(B, N, self.n_heads, self.head_dim).transpose(1, 2) for p in projs)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)  # (B, H, N, Z/H)
        if ctx.cache is not None:
            k, v = ctx.cache.update_routing(ctx.layer, k, v)  # (B, H, n_k, Z/H)
        n_k = k.shape[2]
        scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)  # (B, H, N, n_k)
        mask = ctx.mask
        if mask is None and N > 1:  # the model's None means plain causal
            mask = torch.ones(N, n_k, dtype=torch.bool, device=r.device).tril(n_k - N)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)  # (B, H, N, n_k) fp32
        y = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, Z)
        # mean attention a real query pays to positions other than itself
        self_prob = probs[..., torch.arange(N), torch.arange(n_k - N, n_k)]  # (B, H, N)
        other = (1 - self_prob.detach()).mean(dim=1)  # (B, N)
        w = torch.ones(B, N, device=r.device) if ctx.valid is None else ctx.valid[:, -N:].float()
        other = (other * w).sum() / w.sum().clamp(min=1)
        return self.norm(r + self.o_proj(y)), other


class CrossLayerCache(KVCache):
    """The base KV cache plus what the routing state's context needs at decoding time: each layer's
    past routing states (window), the routing attention's keys and values, the document ids."""

    def __init__(self, cfg: CrossLayerConfig, batch: int, max_len: int, device, dtype):
        super().__init__(cfg.n_total_layers, batch, cfg.n_heads, max_len, cfg.head_dim, device, dtype)
        L, Z, H = cfg.n_total_layers, cfg.routing_dim, cfg.routing_attention_heads
        self.states = (
            torch.zeros(L, batch, max_len, Z, device=device, dtype=dtype) if cfg.routing_window else None
        )
        shape = (L, batch, H, max_len, Z // max(H, 1))
        self.rk = torch.zeros(shape, device=device, dtype=dtype) if H else None
        self.rv = torch.zeros(shape, device=device, dtype=dtype) if H else None
        self.docs = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.next_doc = torch.zeros(
            batch, dtype=torch.long, device=device
        )  # (B,) id of the next token's document

    def store_state(self, layer: int, r: torch.Tensor) -> torch.Tensor:
        """r (B, n, Z) after the filled part; returns (B, length + n, Z)."""
        end = self.length + r.shape[1]
        self.states[layer, :, self.length : end] = r
        return self.states[layer, :, :end]

    def update_routing(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Routing-attention k, v (B, H, n, Z/H) after the filled part; returns all so far."""
        end = self.length + k.shape[2]
        self.rk[layer, :, :, self.length : end] = k
        self.rv[layer, :, :, self.length : end] = v
        return self.rk[layer, :, :, :end], self.rv[layer, :, :, :end]


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
        y = self.experts(flat, routing)  # (T, D); ids and weights from routing, which gets expert terms
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

    def forward(self, x, r, shared_gate, cos, sin, mask, ctx: RoutingContext, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.mlp_norm(x)  # x̂: what the experts and the routing update see
        stats = {}
        if self.routing_update is not None:
            r, stats = self.routing_update(r, h, dataclasses.replace(ctx, layer=layer))
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h, r, shared_gate)
            routing.extra.update(stats)
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
        if cfg.routing_attention_heads:  # (Z/H/2,) RoPE of the routing attention
            Dr = cfg.routing_dim // cfg.routing_attention_heads
            self.register_buffer("routing_inv_freq", torch.empty(Dr // 2), persistent=False)
        self._attention_other = None  # (L,) of the last forward call, for telemetry
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def routers(self) -> list[CrossLayerRouter]:
        return [moe.router for moe in self.moe_layers]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The base init (orthogonal shared gate with moe.router_init=orthogonal); then offsets 0 (every
        layer starts from the shared router), θ 0 (α = ½) and φ = routing_window_gamma_init."""
        normal_init(self, self.cfg)
        if self.config.moe.router_init == "orthogonal":
            nn.init.orthogonal_(self.shared_gate.weight)
        for router in self.routers():
            router.weight.zero_()
        for block in self.blocks:
            update = block.routing_update
            if update is not None and update.theta is not None:
                update.theta.zero_()
            if update is not None and update.phi is not None:
                update.phi.fill_(self.cfg.routing_window_gamma_init)
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
        position_ids = self.position_ids(input_ids, cache, position_ids)
        cos, sin, mask = self.positions(input_ids, attention_mask, cache, position_ids, x.dtype)
        ctx = self.routing_context(input_ids, attention_mask, cache, position_ids, x.dtype, mask)
        routing = []
        for i, block in enumerate(self.blocks):
            x, r, info = block(x, r, self.shared_gate.weight, cos, sin, mask, ctx, cache, i)
            if info is not None:
                routing.append(info)
        others = [
            info.extra["routing_attention_other"]
            for info in routing
            if "routing_attention_other" in info.extra
        ]
        self._attention_other = torch.stack(others).detach() if others else None
        if cache is not None:
            cache.length += input_ids.shape[1]
        extra = {"router_offset": self.router_offset_penalty()} if labels is not None else None
        return self.head_output(input_ids, self.norm(x), routing, labels, attention_mask, extra)

    def new_cache(self, batch: int, max_len: int) -> CrossLayerCache:
        p = self.embed.weight
        return CrossLayerCache(self.cfg, batch, max_len, p.device, p.dtype)

    @torch.no_grad()
    def init_non_persistent(self) -> None:
        super().init_non_persistent()
        if self.cfg.routing_attention_heads:
            Dr = self.cfg.routing_dim // self.cfg.routing_attention_heads
            self.routing_inv_freq.copy_(rope_inv_freq(Dr, self.cfg.rope_theta, self.routing_inv_freq.device))

    def routing_context(self, input_ids, attention_mask, cache, position_ids, dtype, mask) -> RoutingContext:
        """Document ids (a document starts after each eos), real-token mask and routing RoPE of this call."""
        cfg = self.cfg
        eos = (input_ids == cfg.eos_token_id).long()  # (B, N)
        first = cache.next_doc[:, None] if cache is not None else 0
        docs = first + eos.cumsum(dim=1) - eos  # (B, N) eos tokens end their own document
        if cache is not None:
            end = cache.length + input_ids.shape[1]
            cache.docs[:, cache.length : end] = docs
            cache.next_doc += eos.sum(dim=1)
            docs = cache.docs[:, :end]
        valid = attention_mask.bool() if attention_mask is not None else None
        cos = sin = None
        if cfg.routing_attention_heads:
            cos, sin = rope_cos_sin(position_ids, self.routing_inv_freq, dtype)
        return RoutingContext(docs, valid, cos, sin, mask, cache)

    def effective_router_weights(self) -> list[torch.Tensor]:
        """(E, Z) per MoE layer: shared gate + that layer's offset (what `moelab trace` compares)."""
        return [self.shared_gate.weight + router.weight for router in self.routers()]

    router_weights = effective_router_weights  # what the router-orthogonality regulariser reads

    def telemetry(self) -> dict[str, torch.Tensor]:
        """Logged by the trainer under "model": α_l and γ_l of every block that has them, and the mean
        attention to other positions of each MoE layer's routing attention in the last forward call."""
        thetas = [b.routing_update.theta for b in self.blocks if b.routing_update is not None]
        thetas = [t for t in thetas if t is not None]
        phis = [b.routing_update.phi for b in self.blocks if b.routing_update is not None]
        phis = [p for p in phis if p is not None]
        out = {}
        if thetas:
            out["routing_alpha"] = 0.5 + 0.5 * torch.tanh(torch.stack(thetas).float())
        if phis:
            out["routing_window_gamma"] = 0.5 + 0.5 * torch.tanh(torch.stack(phis).float())
        if self._attention_other is not None:
            out["routing_attention_other"] = self._attention_other
        return out

    def router_offset_penalty(self) -> torch.Tensor:
        """Σ over MoE layers of the mean (or sum) of the offset's squared weights."""
        per_layer = [r.weight.float().pow(2) for r in self.routers()]
        reduce = torch.mean if self.cfg.router_offset_penalty == "mean" else torch.sum
        return torch.stack([reduce(w) for w in per_layer]).sum()


Model = CrossLayer  # the registry builds `Model(config)` from each model file
