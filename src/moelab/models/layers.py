"""Shared transformer layers: RMSNorm, rotary embeddings, attention masks, KV cache, attention, SwiGLU.

Every built-in architecture imports these; an experiment copies one into its own model file only when
it wants to change that layer. Numerics follow transformers' OLMoE (the reference the tests compare
against): RMSNorm in fp32, rotate_half RoPE, QK-norm over the full projected width before the head
split, softmax of the eager attention in fp32.

Shapes: B batch, N sequence (n_q queries, n_k keys), D d_model, H heads, Dh head dim, I hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(Dh/2,) inverse frequencies θ^(-2i/Dh) of rotary embeddings."""
    exponent = torch.arange(0, head_dim, 2, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


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
    """Multi-head causal self-attention with RoPE and optional QK-norm; SDPA or the eager reference.

    cfg needs d_model, n_heads, head_dim, qk_norm, rms_norm_eps and attention ("sdpa" | "eager").
    """

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


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert or a dense MLP: down(silu(gate(x)) * up(x)). gate_up (D, 2I) = [gate | up], down (I, D)."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


class SwiGLU(nn.Module):
    """SwiGLU MLP: dense layers and shared experts (S experts of width I = one of width S·I)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(d_model, 2 * d_hidden))  # (D, 2I) = [gate | up]
        self.down = nn.Parameter(torch.empty(d_hidden, d_model))  # (I, D)

    def forward(self, x):
        return swiglu(x, self.gate_up, self.down)
