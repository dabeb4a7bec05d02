"""Top-k routing with loss-free balancing, the per-layer `RoutingInfo` every model returns, and the
router protocol that tracing, telemetry and interventions rely on.

Loss-free balancing (LFLB) keeps a per-expert bias that is added to the scores used to *select*
the top-k experts only. The mixing weights always come from the unbiased softmax, and
`RoutingInfo.router_logits` are always unbiased, so balancing never leaks into the gradient and
the analysis sees the real router. The bias is a saved buffer used in every forward pass.

The router protocol (the hook point of every moelab model): `model.routers()` lists, in the order of
`out.routing`, the module that produced each MoE layer's `RoutingInfo` (the same module may serve
several layers). Such a module
  - returns the layer's `RoutingInfo` from forward (a forward hook may replace it: interventions do);
  - has `n_experts` and `top_k`;
  - has `select(router_logits, exclude=None, force=None) -> (topk_ids, topk_weights)`: its own
    selection from unbiased logits, with experts `exclude`d or one expert `force`d into slot 0;
  - has `balance_bias` (E,) and `update_balance_bias(counts, rate)` if it balances without a loss.
`TopKRouter` is the reference implementation; an architecture whose router sees other inputs
subclasses it and overrides `logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RoutingInfo:
    """What one MoE layer decided for T = B·N tokens (padding included; masks are applied downstream)."""

    router_logits: torch.Tensor  # (T, E) fp32, without the balancing bias
    topk_ids: torch.Tensor  # (T, k) long, the experts each token was sent to (-1 = none)
    topk_weights: torch.Tensor  # (T, k) mixing weights, in the activation dtype
    extra: dict = field(default_factory=dict)  # model-specific state (e.g. cross-layer routing state)


class TopKRouter(nn.Module):
    """Linear(D→E, no bias) → fp32 softmax → top-k, with an optional balancing bias for selection.

    bias_on="scores" adds the bias to the softmax probabilities (DeepSeek-V3 style);
    bias_on="logits" adds it to the pre-softmax logits, with |bias| clamped (the research variant).
    With a zero bias (LFLB off) both select exactly the top-k of the softmax, as transformers' OLMoE.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        top_k: int,
        norm_topk_prob: bool = False,
        bias_on: str = "scores",
        bias_clamp: float = 1.0,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk_prob = n_experts, top_k, norm_topk_prob
        self.bias_on, self.bias_clamp = bias_on, bias_clamp
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))  # (E, D)
        self.register_buffer("balance_bias", torch.zeros(n_experts))  # (E,) fp32, saved with the model

    def _apply(self, fn, recurse=True):
        # Keep the bias fp32 when the module is cast (e.g. .to(torch.bfloat16)): bf16 cannot hold
        # 0.5 + 0.001, so the ±rate updates would silently vanish.
        super()._apply(fn, recurse)
        self.balance_bias.data = self.balance_bias.data.float()
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, D) -> (T, E) fp32 unbiased router logits."""
        return F.linear(x, self.weight).float()

    def forward(self, x: torch.Tensor) -> RoutingInfo:  # x: (T, D)
        logits = self.logits(x)  # (T, E)
        topk_ids, topk_weights = self.select(logits)
        return RoutingInfo(logits, topk_ids, topk_weights.to(x.dtype))

    def select(
        self, logits: torch.Tensor, exclude: torch.Tensor | None = None, force: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the (biased) selection scores; unbiased softmax mixing weights, fp32.

        logits: (T, E). exclude: (n,) expert ids that cannot be selected. force: an expert placed in
        slot 0 for every token; the other k-1 slots are the best remaining choices.
        """
        probs = logits.softmax(dim=-1)  # (T, E)
        scores = (probs if self.bias_on == "scores" else logits) + self.balance_bias  # selection scores
        if exclude is not None and exclude.numel():
            scores = scores.index_fill(1, exclude, float("-inf"))
        if force is None:
            topk_ids = torch.topk(scores, self.top_k, dim=-1).indices  # (T, k)
        else:
            scores = scores.index_fill(1, torch.tensor([force], device=scores.device), float("-inf"))
            rest = torch.topk(scores, self.top_k - 1, dim=-1).indices  # (T, k-1)
            first = torch.full((rest.shape[0], 1), force, dtype=rest.dtype, device=rest.device)
            topk_ids = torch.cat([first, rest], dim=1)  # (T, k)
        topk_weights = probs.gather(1, topk_ids)  # unbiased mixing weights
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_ids, topk_weights

    @torch.no_grad()
    def update_balance_bias(self, counts: torch.Tensor, rate: float) -> None:
        """Move the bias by ±rate toward balance: up for under-loaded experts, down for over-loaded.

        counts: (E,) tokens routed to each expert since the last update (padding excluded).
        """
        counts = counts.to(self.balance_bias.device, torch.float32)
        self.balance_bias.add_(rate * torch.sign(counts.mean() - counts))
        if self.bias_on == "logits":
            self.balance_bias.clamp_(-self.bias_clamp, self.bias_clamp)


def expert_counts(topk_ids: torch.Tensor, n_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens per expert, (E,) fp32, counting each (token, slot) once; padding and id -1 excluded.

    topk_ids: (T, k); valid: (T,) bool/0-1 mask of real tokens or None. No host sync.
    """
    weight = (topk_ids >= 0).float()  # (T, k)
    if valid is not None:
        weight = weight * valid.reshape(-1, 1).float()
    ids = topk_ids.clamp(min=0).reshape(-1)
    return torch.zeros(n_experts, device=topk_ids.device).scatter_add_(0, ids, weight.reshape(-1))
