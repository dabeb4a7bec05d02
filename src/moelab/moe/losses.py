"""Balancing losses computed from the *unbiased* router logits; padding tokens are excluded.

load_balance_loss, two conventions (both are Switch-Transformer style: E · Σ_e f_e · P_e):
  per_layer  f_e = share of the layer's top-k assignments going to e, P_e = mean router prob of e;
             one loss per MoE layer, averaged over layers. Perfect balance = 1 (OLMoE's training).
  hf_concat  transformers' `load_balancing_loss_func`: all layers concatenated, f_e = assignments of e
             per token (not divided by k). Perfect balance ≈ top_k.
router_z_loss: mean over tokens of logsumexp(logits)², averaged over layers.
The top-k used for f is re-derived from the unbiased logits, so the bias of loss-free balancing
does not enter these losses.

Balancing scope (`moe.load_balance_scope`): micro_batch takes f and P from the tokens this process sees
in one micro-batch. global_batch counts f over the whole optimizer step (every micro-batch of every
data-parallel rank): inside `global_balance(reduce)` the (L, E) assignment counts and the token count
pass through `reduce` (detached) before f is formed, while P stays this micro-batch's. The trainer's
reducer sums them over the ranks (one micro-batch per step), or returns the step's counts gathered by a
no-grad routing pass (several micro-batches). Averaged over micro-batches and ranks (as the gradients
are), E · Σ_e f_e · P_e is then exactly the loss of the whole step's tokens seen at once. Outside the
context (evaluation) nothing changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from moelab.moe.routing import expert_counts


def _valid_weights(n_tokens: int, valid: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if valid is None:
        return torch.ones(n_tokens, device=device)
    return valid.reshape(-1).to(device=device, dtype=torch.float32)  # (T,)


# ((L, E) counts, () token count) -> both summed over the data-parallel ranks; set by global_balance
_count_reducer: Callable | None = None


@contextlib.contextmanager
def global_balance(reduce: Callable | None):
    """Within the block, load_balance_loss takes f from counts passed through `reduce` (None: local)."""
    global _count_reducer
    previous, _count_reducer = _count_reducer, reduce
    try:
        yield
    finally:
        _count_reducer = previous


def load_balance_loss(
    router_logits: list[torch.Tensor], top_k: int, valid: torch.Tensor | None = None, kind: str = "per_layer"
) -> torch.Tensor:
    """router_logits: one (T, E) tensor per MoE layer; valid: (T,) mask of real tokens or None.
    Inside `global_balance`, f counts the tokens of every rank (see the module docstring)."""
    n_experts = router_logits[0].shape[-1]
    w = _valid_weights(router_logits[0].shape[0], valid, router_logits[0].device)
    n_valid = w.sum().clamp(min=1)
    f_all, p_all = [], []
    for logits in router_logits:
        probs = logits.float().softmax(dim=-1)  # (T, E)
        topk_ids = torch.topk(probs, top_k, dim=-1).indices  # (T, k)
        f_all.append(expert_counts(topk_ids, n_experts, w))  # (E,) assignments
        p_all.append((probs * w[:, None]).sum(dim=0))  # (E,) summed probabilities
    f, p = torch.stack(f_all), torch.stack(p_all)  # (L, E)
    n_f = n_valid  # the tokens f is counted over
    if _count_reducer is not None:
        f, n_f = _count_reducer(f, n_valid)  # (L, E), (): over all ranks
        n_f = n_f.clamp(min=1)
    if kind == "per_layer":
        per_layer = n_experts * ((f / (n_f * top_k)) * (p / n_valid)).sum(dim=-1)  # (L,)
        return per_layer.mean()
    if kind == "hf_concat":
        layers = len(router_logits)
        return n_experts * ((f.sum(0) / (n_f * layers)) * (p.sum(0) / (n_valid * layers))).sum()
    raise ValueError(f"unknown load-balance convention {kind!r}")


def router_z_loss(router_logits: list[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
    w = _valid_weights(router_logits[0].shape[0], valid, router_logits[0].device)
    n_valid = w.sum().clamp(min=1)
    per_layer = [(torch.logsumexp(lg.float(), dim=-1).square() * w).sum() / n_valid for lg in router_logits]
    return torch.stack(per_layer).mean()


def routing_losses(
    routing, top_k: int, kind: str, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Unweighted balancing terms of a list of RoutingInfo: load_balance (unless kind="none"), router_z."""
    router_logits = [r.router_logits for r in routing]
    if not router_logits:
        return {}
    losses = {}
    if kind != "none":
        losses["load_balance"] = load_balance_loss(router_logits, top_k, valid, kind)
    losses["router_z"] = router_z_loss(router_logits, valid)
    return losses


# ----------------------------------------------------------------------------- specialization regularisers
# Each is off (not computed, not in `out.losses`) while its coefficient in `moe:` is 0.


def token_layer_mean(per_layer: list[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real tokens of each layer's (T,) values, then over layers."""
    w = _valid_weights(per_layer[0].shape[0], valid, per_layer[0].device)
    n_valid = w.sum().clamp(min=1)
    return torch.stack([(v.float() * w).sum() / n_valid for v in per_layer]).mean()


def expert_output_orthogonality_per_token(y: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """‖C − I‖_F / k' per token, C the cosine similarities of its k' real expert outputs.

    y: (T, k, D) each slot's expert output before mixing; real: (T, k) bool, False for id -1 slots
    (left out of C). 0 when a token's experts write orthogonal directions, √(1 − 1/k') when they all write
    the same one. Only the off-diagonal of C enters (its diagonal is 1 by definition; an all-zero
    output would otherwise count as −1). A token with one real slot costs 0. Returns (T,) fp32.
    """
    u = torch.nn.functional.normalize(y.float(), dim=-1)  # (T, k, D) unit rows (0 stays 0)
    cos = u @ u.transpose(1, 2)  # (T, k, k)
    k = real.shape[1]
    pairs = real[:, :, None] & real[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=real.device)
    n_real = real.sum(dim=1).clamp(min=1)  # (T,) k'
    return torch.linalg.vector_norm(cos * pairs, dim=(1, 2)) / n_real


def expert_output_orthogonality(
    per_token: list[torch.Tensor], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The per-token terms (T,) of each MoE layer averaged over real tokens and layers."""
    return token_layer_mean(per_token, valid)


def expert_size_loss(
    router_logits: list[torch.Tensor], widths: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_e p_e · I_e / d_expert per token, p the unbiased router softmax, averaged over real tokens and
    layers: the expected relative width of the experts a token's router favours.

    widths: (E,) I_e / d_expert. Differentiable in the logits, so it moves probability to narrower
    experts. With equal widths it is the constant Σ_e p_e = 1 (no gradient).
    """
    per_layer = [lg.float().softmax(dim=-1) @ widths.to(lg.device, torch.float32) for lg in router_logits]
    return token_layer_mean(per_layer, valid)  # each (T,)


def router_orthogonality(router_weights: list[torch.Tensor]) -> torch.Tensor:
    """‖Ŵ Ŵᵀ − I‖_F / (E·√D) of the row-normalised router weights Ŵ (E, D), averaged over layers.

    0 when the experts' routing directions are orthogonal; pushes experts apart in router space.
    """
    per_layer = []
    for w in router_weights:
        w_hat = torch.nn.functional.normalize(w.float(), dim=-1)  # (E, D) unit rows
        E, D = w_hat.shape
        gram = w_hat @ w_hat.T - torch.eye(E, device=w.device)
        per_layer.append(torch.linalg.matrix_norm(gram) / (E * math.sqrt(D)))
    return torch.stack(per_layer).mean()


def topk_gap_loss(
    router_logits: list[torch.Tensor], top_k: int, cap: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """−log(min(p_(k) − p_(k+1), cap) + 1e-8) on each token's sorted router probabilities, averaged over
    real tokens and layers: a decisive router (a clear gap after its k-th choice) costs little."""
    w = _valid_weights(router_logits[0].shape[0], valid, router_logits[0].device)
    per_layer = []
    for logits in router_logits:
        top = torch.topk(logits.float().softmax(dim=-1), top_k + 1, dim=-1).values  # (T, k+1) descending
        gap = (top[:, top_k - 1] - top[:, top_k]).clamp(max=cap)  # (T,)
        per_layer.append((-torch.log(gap + 1e-8) * w).sum() / w.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


def specialization_losses(
    routing,
    router_weights: list[torch.Tensor],
    config,
    valid: torch.Tensor | None = None,
    expert_widths: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The specialization regularisers switched on in `config.moe` (unweighted). router_weights: the
    (E, D_in) matrix each MoE layer's logits come from (for cross-layer routing: shared + offset).
    expert_widths: (E,) I_e / d_expert for the expert-size penalty; default from `model.expert_widths`.
    The expert-output orthogonality reads the per-token terms RoutedExperts left in each layer's
    `routing.extra` (moe/experts.py)."""
    moe, losses = config.moe, {}
    if moe.router_orthogonality_coef > 0 and router_weights:
        losses["router_orthogonality"] = router_orthogonality(router_weights)
    if moe.topk_gap_coef > 0 and routing:
        logits = [r.router_logits for r in routing]
        losses["topk_gap"] = topk_gap_loss(logits, config.model.top_k, moe.topk_gap_cap, valid)
    if moe.expert_output_orthogonality_coef > 0 and routing:
        key = "expert_output_orthogonality"
        missing = [i for i, r in enumerate(routing) if key not in r.extra]
        if missing:
            raise RuntimeError(
                f"moe.expert_output_orthogonality_coef > 0 but MoE layer {missing[0]} recorded no expert "
                f"outputs: the model file must call its experts with the RoutingInfo, experts(x, routing)"
            )
        losses[key] = expert_output_orthogonality([r.extra[key] for r in routing], valid)
    if moe.expert_size_penalty > 0 and routing:
        if expert_widths is None:
            from moelab.moe.experts import expert_hidden_widths  # experts.py imports this module

            cfg = config.model
            hidden = expert_hidden_widths(cfg.n_experts, cfg.d_expert, cfg.expert_widths)
            expert_widths = torch.tensor(hidden, dtype=torch.float32) / cfg.d_expert
        losses["expert_size"] = expert_size_loss([r.router_logits for r in routing], expert_widths, valid)
    return losses


# ----------------------------------------------------------------------------- weighting
# Models return unweighted terms in `out.losses`; the coefficients (and their schedules) are applied
# here only, by the model for `out.loss` and by the trainer with the step's schedule.


def load_balance_coef_at(step: int, base: float, decay_steps: int) -> float:
    """The load-balancing coefficient at `step`: constant, or linear from `base` to 0 over decay_steps."""
    if decay_steps <= 0:
        return base
    return base * max(0.0, 1.0 - step / decay_steps)


def loss_coefficients(config, step: int | None = None) -> dict[str, float]:
    """Weight of every loss term a model may return.

    ce = 1; load_balance = moe.load_balance_coef (decayed by train.load_balance_decay_steps at `step`;
    no schedule when step is None); router_z = moe.z_loss_coef; router_orthogonality, topk_gap,
    expert_output_orthogonality = moe.NAME_coef; expert_size = moe.expert_size_penalty; and for a
    model-specific term NAME the architecture's own config field `model.NAME_coef`.
    """
    moe = config.moe
    lb = moe.load_balance_coef
    if step is not None:
        lb = load_balance_coef_at(step, lb, config.train.load_balance_decay_steps)
    coefs = {"ce": 1.0, "load_balance": lb, "router_z": moe.z_loss_coef}
    coefs["router_orthogonality"] = moe.router_orthogonality_coef
    coefs["topk_gap"] = moe.topk_gap_coef
    coefs["expert_output_orthogonality"] = moe.expert_output_orthogonality_coef
    coefs["expert_size"] = moe.expert_size_penalty
    for name, value in vars(config.model).items():
        if name.endswith("_coef") and isinstance(value, int | float):
            coefs[name.removesuffix("_coef")] = float(value)
    return coefs


def weighted_loss(losses: dict[str, torch.Tensor], coefficients: dict[str, float]) -> torch.Tensor:
    """Σ coefficient · term. A term without a coefficient is a programming error and raises."""
    missing = [name for name in losses if name not in coefficients]
    if missing:
        raise KeyError(
            f"loss term {missing[0]!r} has no coefficient; declare model.{missing[0]}_coef in the "
            f"architecture's config"
        )
    total = None
    for name, term in losses.items():
        coef = coefficients[name]
        part = term if coef == 1.0 else coef * term
        total = part if total is None else total + part
    return total
