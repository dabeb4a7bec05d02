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
Everything else (blocks, attention, norms, RoPE, KV cache, dispatch, the model assembly) is OLMoE's:
this file subclasses `moelab.models.olmoe` and changes only the MoE block.
Shapes: B batch, N sequence, D d_model, E experts, k top_k paths, L tree depth, T = B·N, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelab.config import Config, ModelConfig
from moelab.errors import ConfigError
from moelab.models.layers import SwiGLU
from moelab.models.olmoe import MoE, OLMoE
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


class TreeMoE(MoE):
    """Tree router → the experts on the top-k paths (+ shared experts on every token); the forward
    pass is OLMoE's MoE block's."""

    def __init__(self, cfg: HierarchicalConfig, moe_cfg):
        nn.Module.__init__(self)
        b, depth = cfg.tree_branches, cfg.tree_depth
        self.router = TreeRouter(cfg.d_model, b, depth, cfg.top_k, bias_clamp=moe_cfg.lflb_bias_clamp)
        hidden = tree_widths(b, depth, cfg.d_expert)  # one stacked group per depth
        self.experts = RoutedExperts(cfg.n_experts, cfg.d_model, cfg.d_expert, hidden=hidden)
        n_shared = cfg.n_shared_experts
        self.shared = SwiGLU(cfg.d_model, n_shared * cfg.d_expert) if n_shared else None


class Hierarchical(OLMoE):
    """OLMoE's blocks and assembly with `TreeMoE` blocks, the tree's balancing losses and its count of
    active parameters."""

    config_class = HierarchicalConfig
    moe_class = TreeMoE

    def __init__(self, config: Config):
        if config.moe.load_balance == "hf_concat":
            raise ConfigError(
                "moe.load_balance=hf_concat is a flat-router convention; hierarchical balances each "
                "node's branches (per_layer) or not at all (none)"
            )
        if config.moe.load_balance_scope != "micro_batch":
            raise ConfigError(
                f"moe.load_balance_scope={config.moe.load_balance_scope}: the tree's per-node balancing "
                f"loss is computed per micro-batch on each rank; use micro_batch"
            )
        for name in ("topk_gap_coef", "expert_size_penalty"):  # both read one softmax over all experts
            if getattr(config.moe, name) > 0:
                raise ConfigError(
                    f"moe.{name}={getattr(config.moe, name)} is a flat-router regulariser (one softmax over "
                    f"all experts); hierarchical routes by per-node softmaxes: set it to 0"
                )
        super().__init__(config)

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


Model = Hierarchical  # the registry builds `Model(config)` from each model file
