"""The output contract and what every moelab model provides besides forward().

Everything downstream (trainer, evaluation, generation, tracing, telemetry, interventions, report)
depends only on this:

  model(input_ids, attention_mask=None, labels=None) -> MoEOutput
                                (out.logits is None only in training mode with labels and
                                train.loss_chunk_tokens > 0: see MoEOutput)
  model.config                  the Config it was built from
  model.blocks                  nn.ModuleList of the repeated blocks; parallelize() wraps each one
                                (activation checkpointing, compile) without the model knowing
  model.routers()               the router module of each MoE layer, in the order of out.routing
                                (the hook point; the protocol is in moe/routing.py)
  model.count_parameters()      {"total", "active"}
  model.update_balance_biases(counts)   loss-free balancing step from (L, E) counts
  model.new_cache(batch, max_len)       a KV cache for generation
  model.init_non_persistent()   recompute buffers that are not saved (after loading on meta)
  model.telemetry()             optional: {name: (n,) tensor} of model-level values the trainer logs

`MoEModel` implements the generic ones from `routers()` and the model's `RoutedExperts` modules; an
architecture whose tokens use a variable number of experts overrides `count_parameters` and says how.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moelab.models.layers import KVCache, attention_mask_4d, rope_cos_sin, rope_inv_freq
from moelab.models.lm_loss import chunked_cross_entropy
from moelab.moe.experts import RoutedExperts
from moelab.moe.losses import loss_coefficients, routing_losses, specialization_losses, weighted_loss
from moelab.moe.routing import RoutingInfo, expert_counts


@dataclass
class MoEOutput:
    """The output contract every moelab model returns.

    `logits` is None only when the model is in training mode, labels are given and
    train.loss_chunk_tokens > 0: the loss then comes from the lm_head chunk by chunk (models/lm_loss.py)
    and the full logits never exist. Evaluation, generation and tracing run in eval mode and get them.
    """

    logits: torch.Tensor | None  # (B, N, V); None only in training with train.loss_chunk_tokens > 0
    loss: torch.Tensor | None = None  # total training loss (weighted terms), when labels are given
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted named terms (ce, ...)
    routing: list[RoutingInfo] = field(default_factory=list)  # one per MoE layer
    expert_counts: torch.Tensor | None = None  # (L, E) tokens per expert, padding excluded


class MoEModel(nn.Module):
    """Base class of moelab models: the generic parts of the contract above."""

    config_class = None  # the architecture's ModelConfig subclass (the `model:` section is parsed into it)

    def routers(self) -> list[nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} must list its routers (see moelab.models.base)")

    # -- plumbing shared by models built from models/layers.py: they hold `cfg` (config.model),
    # `embed` (nn.Embedding) and a non-persistent `inv_freq` buffer (Dh/2,).

    @torch.no_grad()
    def init_non_persistent(self) -> None:
        """Buffers that are derived, not saved: the RoPE inverse frequencies."""
        self.inv_freq.copy_(rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.inv_freq.device))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p, cfg = self.embed.weight, self.cfg
        return KVCache(cfg.n_total_layers, batch, cfg.n_heads, max_len, cfg.head_dim, p.device, p.dtype)

    @staticmethod
    def position_ids(input_ids, cache, position_ids=None) -> torch.Tensor:
        """(B, N) the given positions, or by default the positions after the cache."""
        if position_ids is not None:
            return position_ids
        B, N = input_ids.shape
        start = cache.length if cache is not None else 0
        return torch.arange(start, start + N, device=input_ids.device).expand(B, N)

    def positions(self, input_ids, attention_mask, cache, position_ids, dtype):
        """RoPE cos/sin (B, 1, N, Dh) and the attention mask for a forward call (after the cache)."""
        N = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        cos, sin = rope_cos_sin(self.position_ids(input_ids, cache, position_ids), self.inv_freq, dtype)
        return cos, sin, attention_mask_4d(attention_mask, N, start + N, input_ids.device)

    def router_weights(self) -> list[torch.Tensor]:
        """The (E, D_in) matrix of each MoE layer's router (the router-orthogonality regulariser reads it);
        an architecture whose logits come from more than one matrix returns their effective sum."""
        return [router.weight for router in self.routers()]

    def balance_losses(self, routing, valid) -> dict[str, torch.Tensor]:
        """The balancing terms (load_balance, router_z) over flat top-k routers; an architecture that
        routes differently (e.g. a tree of branch choices) overrides this."""
        return routing_losses(routing, self.cfg.top_k, self.config.moe.load_balance, valid)

    def head_output(self, input_ids, hidden, routing, labels, attention_mask, extra_losses=None) -> MoEOutput:
        """`output` from the final hidden state (B, N, D) through `self.lm_head`: in training with labels
        and train.loss_chunk_tokens > 0 the ce comes chunk by chunk without the (B·N, V) logits (out.logits
        is None); otherwise the logits are computed as usual."""
        chunk = self.config.train.loss_chunk_tokens
        if labels is None or not self.training or chunk <= 0:
            return self.output(input_ids, self.lm_head(hidden), routing, labels, attention_mask, extra_losses)
        ce = chunked_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.reshape(-1), chunk)
        return self.output(input_ids, None, routing, labels, attention_mask, extra_losses, ce=ce)

    def output(
        self, input_ids, logits, routing, labels, attention_mask, extra_losses=None, ce=None
    ) -> MoEOutput:
        """The output contract from the logits (or, with logits None, an already computed `ce`) and the
        routing: expert counts of real tokens and, with labels, the unweighted terms (ce, balancing,
        switched-on specialization regularisers, `extra_losses` of the architecture) and their weighted
        sum."""
        N = input_ids.shape[1]  # this call's tokens (logits may be cut to fewer positions by a hook)
        valid = attention_mask[:, -N:].reshape(-1) if attention_mask is not None else None  # (T,) real
        out = MoEOutput(
            logits, routing=routing, expert_counts=routing_counts(routing, self.cfg.n_experts, valid)
        )
        if labels is not None:
            if ce is None:
                ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.reshape(-1), ignore_index=-100)
            out.losses = {"ce": ce, **self.balance_losses(routing, valid)}
            out.losses.update(extra_losses or {})
            out.losses.update(specialization_losses(routing, self.router_weights(), self.config, valid))
            out.loss = weighted_loss(out.losses, loss_coefficients(self.config))
        return out

    def count_parameters(self) -> dict[str, int]:
        """total: every parameter once. active: what one token uses = everything but the routed experts,
        plus top_k times the mean routed-expert size of each MoE layer (for equal widths: top_k experts).
        A learned expert output norm (moe.expert_output_norm) is part of each routed expert's size."""
        return count_parameters(self, self.config.model.top_k)

    @torch.no_grad()
    def update_balance_biases(self, counts: torch.Tensor) -> None:
        """Loss-free balancing step, after the optimizer step. counts: (L, E) summed over micro-batches.

        A router shared by several layers moves once, by the counts of all the layers it serves.
        """
        if not self.config.moe.lflb:
            return
        per_router: dict[int, list] = {}
        for router, c in zip(self.routers(), counts, strict=True):
            entry = per_router.setdefault(id(router), [router, torch.zeros_like(c)])
            entry[1] += c
        for router, c in per_router.values():
            router.update_balance_bias(c, self.config.moe.lflb_rate)


@torch.no_grad()
def normal_init(model: nn.Module, cfg) -> None:
    """The init every built-in architecture starts from: N(0, cfg.init_std) for every parameter
    (truncated at ±3 std with cfg.init="truncated_normal"), 1 for norm weights, 0 for the padding row
    of `model.embed`. An architecture sets its own special parameters after calling it."""
    std = cfg.init_std
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif cfg.init == "truncated_normal":
            nn.init.trunc_normal_(p, 0.0, std, -3 * std, 3 * std)
        else:
            nn.init.normal_(p, 0.0, std)
    model.embed.weight[cfg.pad_token_id].zero_()


def model_routers(model: nn.Module) -> list[nn.Module]:
    """`model.routers()`; for model files written before the router protocol (experiment copies of an
    older olmoe.py), the `.router` of each of their `moe_layers`."""
    if callable(getattr(model, "routers", None)):
        return list(model.routers())
    if hasattr(model, "moe_layers"):
        return [layer.router for layer in model.moe_layers]
    raise AttributeError(f"{type(model).__name__} has no routers() (see moelab.models.base)")


def count_parameters(model: nn.Module, top_k: int) -> dict[str, int]:
    """{"total", "active"}; see MoEModel.count_parameters. Shared parameters are counted once."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            sizes = module.expert_sizes()
            inactive += sum(sizes) - top_k * sum(sizes) / len(sizes)
    return {"total": total, "active": total - round(inactive)}


def routing_counts(
    routing: list[RoutingInfo], n_experts: int, valid: torch.Tensor | None
) -> torch.Tensor | None:
    """(L, E) tokens per expert per MoE layer (padding and id -1 excluded), or None without MoE layers."""
    if not routing:
        return None
    return torch.stack([expert_counts(r.topk_ids, n_experts, valid) for r in routing])
