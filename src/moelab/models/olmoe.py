"""OLMoE: the base Mixture-of-Experts transformer, an exact replica of OLMoE-1B-7B-0924.

One readable file: building blocks, the MoE block, the model. To try a new architecture, copy this
file (`moelab new NAME --from olmoe`) and edit it; everything else in moelab depends only on the
output contract (`MoEOutput` below), never on this file's internals.

Numerics follow transformers' OlmoeForCausalLM: pre-norm blocks; RMSNorm computed in fp32;
q_norm/k_norm over the full projected width, before the head split and RoPE (θ = 10,000, rotate_half
convention); no GQA; an fp32-softmax router with top-k and optional renormalisation; SwiGLU experts;
untied lm_head. Additions that OLMoE does not use default to off: shared experts, dense-first layers,
loss-free balancing.

Shapes: B batch, N sequence, D d_model, H heads, Dh head dim, E experts, k top-k, I d_expert,
T = B·N flattened tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from moelab.config import Config
from moelab.moe.dispatch import run_experts, swiglu
from moelab.moe.losses import load_balance_loss, router_z_loss
from moelab.moe.routing import RoutingInfo, TopKRouter, expert_counts


@dataclass
class MoEOutput:
    """The output contract every moelab model returns."""

    logits: torch.Tensor  # (B, N, V)
    loss: torch.Tensor | None = None  # total training loss, when labels are given
    losses: dict[str, torch.Tensor] = field(
        default_factory=dict
    )  # named scalar terms (ce, load_balance, ...)
    routing: list[RoutingInfo] = field(default_factory=list)  # one per MoE layer
    expert_counts: torch.Tensor | None = None  # (L, E) tokens per expert, padding excluded


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 and cast back before the weight (as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions: (B, N) -> cos, sin: (B, 1, N, Dh), frequencies repeated in two halves."""
    freqs = positions[..., None].float() * inv_freq  # (B, N, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, N, Dh)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, Dh). rotate_half convention: pairs are (i, i + Dh/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values of every layer for incremental decoding; `length` tokens are filled."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int, device, dtype):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, n, Dh) after the filled part; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache holds {self.k.shape[3]} positions; {end} needed")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def attention_mask_4d(attention_mask: torch.Tensor | None, n_q: int, n_k: int, device) -> torch.Tensor | None:
    """Boolean (B or 1, 1, n_q, n_k) mask, True = may attend; None when plain causal suffices.

    Queries are the last n_q of n_k positions. attention_mask: (B, n_k) with 1 for real tokens.
    A query may always attend to itself, so rows of padding never become all -inf (NaN).
    """
    if attention_mask is None and n_q in (1, n_k):
        return None  # SDPA's is_causal (n_q == n_k) or no mask at all (one new token)
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, n_q, n_k) causal
    if attention_mask is not None:
        keys = attention_mask[:, None, None, :].bool()  # (B, 1, 1, n_k)
        mask = (mask & keys) | (k_pos == q_pos)[None, None]
    return mask


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.eager = cfg.attention == "eager"

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0):
        B, N, D = x.shape
        q = self.q_norm(self.q_proj(x))  # (B, N, D): QK-norm over the full width, before the head split
        k = self.k_norm(self.k_proj(x))
        v = self.v_proj(x)
        q, k, v = (
            t.view(B, N, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)
        )  # (B, H, N, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, n_k, Dh)
        causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        if self.eager:
            y = eager_attention(q, k, v, mask, causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, N, D))


def eager_attention(q, k, v, mask, causal):
    """Reference attention: softmax(q·kᵀ/√Dh + mask)·v with the softmax in fp32."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, n_q, n_k)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v


class DenseMLP(nn.Module):
    """SwiGLU MLP: used by dense layers and for shared experts (S experts of width I = one of width S·I)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(d_model, 2 * d_hidden))  # (D, 2I) = [gate | up]
        self.down = nn.Parameter(torch.empty(d_hidden, d_model))  # (I, D)

    def forward(self, x):
        return swiglu(x, self.gate_up, self.down)


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked tensors. Parameters under `.experts.` count as routed."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(n_experts, d_model, 2 * d_expert))  # (E, D, 2I)
        self.down = nn.Parameter(torch.empty(n_experts, d_expert, d_model))  # (E, I, D)


class MoE(nn.Module):
    """Router → top-k routed experts (+ shared experts on every token)."""

    def __init__(self, cfg, moe_cfg):
        super().__init__()
        self.dispatch = moe_cfg.dispatch
        self.router = TopKRouter(
            cfg.d_model,
            cfg.n_experts,
            cfg.top_k,
            cfg.norm_topk_prob,
            bias_on=moe_cfg.lflb_bias_on,
            bias_clamp=moe_cfg.lflb_bias_clamp,
        )
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.d_expert)
        n_shared = cfg.n_shared_experts
        self.shared = DenseMLP(cfg.d_model, n_shared * cfg.d_expert) if n_shared else None

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        flat = x.reshape(B * N, D)  # (T, D)
        routing = self.router(flat)
        y = run_experts(
            flat,
            routing.topk_ids,
            routing.topk_weights,
            self.experts.gate_up,
            self.experts.down,
            self.dispatch,
        )
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, N, D), routing


class Block(nn.Module):
    def __init__(self, cfg, moe_cfg, dense: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = DenseMLP(cfg.d_model, cfg.d_dense) if dense else MoE(cfg, moe_cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h)
            return x + y, routing
        return x + self.mlp(h), None


# ----------------------------------------------------------------------------- the model


class OLMoE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        cfg = self.cfg = config.model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            [Block(cfg, config.moe, dense=i < cfg.n_dense_layers) for i in range(cfg.n_total_layers)]
        )
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # (Dh/2,)
        self.activation_checkpointing = False  # set by the trainer: recompute each block in backward
        self.reset_parameters()

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) (optionally truncated at ±3 std) for every matrix; norms 1; padding row 0."""
        cfg = self.cfg
        std = cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif cfg.init == "truncated_normal":
                nn.init.trunc_normal_(p, 0.0, std, -3 * std, 3 * std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.embed.weight[cfg.pad_token_id].zero_()
        self.init_non_persistent()

    @torch.no_grad()
    def init_non_persistent(self) -> None:
        """Buffers that are derived, not saved: the RoPE inverse frequencies."""
        cfg = self.cfg
        exponent = torch.arange(0, cfg.head_dim, 2, device=self.inv_freq.device).float() / cfg.head_dim
        self.inv_freq.copy_(1.0 / (cfg.rope_theta**exponent))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed.weight
        cfg = self.cfg
        return KVCache(cfg.n_total_layers, batch, cfg.n_heads, max_len, cfg.head_dim, p.device, p.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, N)
        attention_mask: torch.Tensor | None = None,  # (B, N), or (B, cached + N) with a cache; 1 = real
        labels: torch.Tensor | None = None,  # (B, N) next-token targets (already shifted); -100 = ignore
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,  # (B, N); default: positions after the cache
    ) -> MoEOutput:
        B, N = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + N, device=input_ids.device).expand(B, N)
        x = self.embed(input_ids)  # (B, N, D)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        mask = attention_mask_4d(attention_mask, N, start + N, input_ids.device)
        routing = []
        for i, block in enumerate(self.blocks):
            if self.activation_checkpointing and self.training and cache is None:
                x, r = checkpoint(block, x, cos, sin, mask, None, i, use_reentrant=False)
            else:
                x, r = block(x, cos, sin, mask, cache, i)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.length += N
        logits = self.lm_head(self.norm(x))  # (B, N, V)

        valid = None  # (T,) real tokens of this call
        if attention_mask is not None:
            valid = attention_mask[:, -N:].reshape(-1)
        counts = [expert_counts(r.topk_ids, self.cfg.n_experts, valid) for r in routing]
        out = MoEOutput(logits=logits, routing=routing, expert_counts=torch.stack(counts) if counts else None)
        if labels is not None:
            out.losses, out.loss = self.compute_losses(logits, labels, routing, valid)
        return out

    def compute_losses(self, logits, labels, routing, valid):
        moe = self.config.moe
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.reshape(-1), ignore_index=-100)
        losses = {"ce": ce}
        total = ce
        router_logits = [r.router_logits for r in routing]
        if router_logits and moe.load_balance != "none":
            losses["load_balance"] = load_balance_loss(router_logits, self.cfg.top_k, valid, moe.load_balance)
            total = total + moe.load_balance_coef * losses["load_balance"]
        if router_logits:
            losses["router_z"] = router_z_loss(router_logits, valid)
            total = total + moe.z_loss_coef * losses["router_z"]
        return losses, total

    @torch.no_grad()
    def update_balance_biases(self, counts: torch.Tensor) -> None:
        """Loss-free balancing step, after the optimizer step. counts: (L, E) summed over micro-batches."""
        if not self.config.moe.lflb:
            return
        for moe, c in zip(self.moe_layers, counts, strict=True):
            moe.router.update_balance_bias(c, self.config.moe.lflb_rate)

    def count_parameters(self) -> dict[str, int]:
        """Total parameters, and active ones: top_k of n_experts routed experts per token."""
        total = sum(p.numel() for p in self.parameters())
        routed = sum(p.numel() for n, p in self.named_parameters() if ".experts." in n)
        inactive = routed * (self.cfg.n_experts - self.cfg.top_k) // self.cfg.n_experts
        return {"total": total, "active": total - inactive}


Model = OLMoE  # the registry builds `Model(config)` from each model file
