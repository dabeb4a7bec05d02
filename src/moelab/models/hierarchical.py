"""Hierarchical MoE: routed experts on the edges of a perfect b-ary tree (tree experts).

Each MoE layer has a tree of `model.tree_depth` = L decision levels with `model.tree_branches` = b branches
per node, in heap order (child c of node i is node b·i + c + 1), and one SwiGLU expert per edge
(expert b·i + c): E = b·(b^L - 1)/(b - 1) experts, of hidden width d_expert // b^d at depth d
(1 = the root's children), so experts narrow as the choice gets finer. All node routers are one
bias-free Linear(D → E) with a softmax over each node's b branches. A token takes its top_k best
root-to-leaf paths (path score = product of branch probabilities, found by an exact pruned search) and
every expert on them, weighted by the product of branch probabilities from the root down to it, summed
over its selected paths; `n_shared_experts` experts of width d_expert see every token.
`RoutingInfo.topk_ids` holds the distinct experts (k·L slots, -1 = none), and the search, its exactness
argument, the balancing loss and the router live in `moelab.moe.tree`.

Balancing: the load-balancing term balances each node's branch choices (`tree_balance_loss`), the z-loss
is per node, and loss-free balancing moves each branch's bias toward its siblings' mean count.
Everything else (attention, norms, RoPE, KV cache, dispatch) is the base model's.
Shapes: B batch, N sequence, D d_model, E experts, k top_k paths, L tree depth, T = B·N, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelab.config import Config, ModelConfig
from moelab.errors import ConfigError
from moelab.models.base import MoEModel, MoEOutput, normal_init
from moelab.models.layers import Attention, KVCache, RMSNorm, SwiGLU
from moelab.moe.experts import RoutedExperts
from moelab.moe.tree import TreeRouter, tree_balance_loss, tree_experts, tree_widths, tree_z_loss


@dataclass
class HierarchicalConfig(ModelConfig):
    """Tree experts: a b-ary tree of routing decisions per MoE layer, one expert per edge."""

    tree_branches: int = 2  # b: branches per node (>= 2)
    tree_depth: int = 3  # L: decision levels; model.n_experts must be b·(b^L - 1)/(b - 1)

    def validate(self) -> None:
        if self.tree_branches < 2 or self.tree_depth < 1:
            raise ConfigError(
                f"model.tree_branches={self.tree_branches} must be >= 2 and model.tree_depth="
                f"{self.tree_depth} >= 1"
            )
        b, depth = self.tree_branches, self.tree_depth
        if self.n_experts != tree_experts(b, depth):
            raise ConfigError(
                f"model.n_experts={self.n_experts} does not match the tree: tree_branches={b}, "
                f"tree_depth={depth} has {tree_experts(b, depth)} edges; set model.n_experts="
                f"{tree_experts(b, depth)}"
            )
        super().validate()
        if self.top_k > b**depth:
            raise ConfigError(f"model.top_k={self.top_k} paths exceeds the tree's {b**depth} leaves")
        if self.d_expert // b**depth < 1:
            raise ConfigError(
                f"model.d_expert={self.d_expert} gives the deepest experts width {self.d_expert}//{b}^{depth}"
                f" = 0; use d_expert >= {b**depth}"
            )
        if self.expert_widths or self.norm_topk_prob:
            raise ConfigError(
                "model.expert_widths and model.norm_topk_prob do not apply to hierarchical "
                "(widths follow the depth; weights are path products)"
            )


class MoE(nn.Module):
    """Tree router → the experts on the top-k paths (+ shared experts on every token)."""

    def __init__(self, cfg: HierarchicalConfig, moe_cfg):
        super().__init__()
        b, depth = cfg.tree_branches, cfg.tree_depth
        self.router = TreeRouter(cfg.d_model, b, depth, cfg.top_k, bias_clamp=moe_cfg.lflb_bias_clamp)
        hidden = tree_widths(b, depth, cfg.d_expert)  # one stacked group per depth
        self.experts = RoutedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, hidden=hidden)
        n_shared = cfg.n_shared_experts
        self.shared = SwiGLU(cfg.d_model, n_shared * cfg.d_expert) if n_shared else None

    def forward(self, x):  # (B, N, D)
        B, N, D = x.shape
        flat = x.reshape(B * N, D)  # (T, D)
        routing = self.router(flat)  # topk_ids, topk_weights: (T, k·L)
        y = self.experts(flat, routing)  # (T, D); ids and weights from routing, which gets expert terms
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.view(B, N, D), routing


class Block(nn.Module):
    def __init__(self, cfg: HierarchicalConfig, moe_cfg, dense: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_dense) if dense else MoE(cfg, moe_cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        h = self.mlp_norm(x)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h)
            return x + y, routing
        return x + self.mlp(h), None


class Hierarchical(MoEModel):
    config_class = HierarchicalConfig

    def __init__(self, config: Config):
        super().__init__()
        if config.moe.load_balance == "hf_concat":
            raise ConfigError(
                "moe.load_balance=hf_concat is a flat-router convention; hierarchical balances each "
                "node's branches (per_layer) or not at all (none)"
            )
        for name in ("topk_gap_coef", "expert_size_penalty"):  # both read one softmax over all experts
            if getattr(config.moe, name) > 0:
                raise ConfigError(
                    f"moe.{name}={getattr(config.moe, name)} is a flat-router regulariser (one softmax over "
                    f"all experts); hierarchical routes by per-node softmaxes: set it to 0"
                )
        self.config = config
        cfg = self.cfg = config.model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
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

    def routers(self) -> list[TreeRouter]:
        return [moe.router for moe in self.moe_layers]

    def reset_parameters(self) -> None:
        """The base init (normal_init); orthogonal router rows with moe.router_init=orthogonal."""
        normal_init(self, self.cfg)
        if self.config.moe.router_init == "orthogonal":
            for router in self.routers():
                nn.init.orthogonal_(router.weight)
        self.init_non_persistent()

    def balance_losses(self, routing, valid) -> dict[str, torch.Tensor]:
        """load_balance: each node's branch choices (moe.tree.tree_balance_loss), unless
        moe.load_balance=none; router_z: per node. Both from the unbiased logits."""
        logits = [r.router_logits for r in routing]
        if not logits:
            return {}
        cfg, losses = self.cfg, {}
        if self.config.moe.load_balance != "none":
            losses["load_balance"] = tree_balance_loss(
                logits, cfg.tree_branches, cfg.tree_depth, cfg.top_k, valid
            )
        losses["router_z"] = tree_z_loss(logits, cfg.tree_branches, valid)
        return losses

    def count_parameters(self) -> dict[str, int]:
        """total: every parameter once. active: everything but the routed experts, plus per MoE layer
        the most routed parameters a token can use: min(top_k, b^d) experts of width d_expert // b^d at
        each depth d (top_k paths touch at most that many distinct edges per depth; the bound is
        reached when the paths part at the root, or as early as b allows)."""
        b, k = self.cfg.tree_branches, self.cfg.top_k
        total = sum(p.numel() for p in self.parameters())
        active = total
        for moe in self.moe_layers:
            sizes = moe.experts.expert_sizes()  # (E,) parameters of each expert, 3·D·width
            active -= sum(sizes)
            for d in range(1, self.cfg.tree_depth + 1):  # the first expert of depth d is tree_experts(b, d-1)
                active += min(k, b**d) * sizes[tree_experts(b, d - 1)]
        return {"total": total, "active": active}

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
        logits = self.lm_head(self.norm(x))  # (B, N, V)
        return self.output(input_ids, logits, routing, labels, attention_mask)


Model = Hierarchical  # the registry builds `Model(config)` from each model file
