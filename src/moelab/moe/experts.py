"""Routed experts = expert weights + a swappable dispatcher.

`RoutedExperts(x (T, D), topk_ids (T, k), topk_weights (T, k)) -> (T, D)` holds the SwiGLU weights of
E routed experts and hands them, with the tokens, to its `dispatcher`: the object that decides where
and how the experts run. Model files build a `RoutedExperts` and call it; which dispatcher runs is
chosen from outside (`moelab.build` from `moe.dispatch`, `train.parallel.parallelize`, or
`set_dispatcher`), so a model file never learns about kernels, devices or ranks.

Dispatchers are plain callables `dispatcher(experts, x, topk_ids, topk_weights) -> (T, D)`:
  LocalDispatcher(kernel)  every expert on this device, with the loop | sorted | grouped kernel
                           (moe/dispatch.py); the expert-parallel dispatchers of the scale-out work
                           implement the same call.
A dispatcher applies `experts.output_norm` (when set) to each expert's output before its mixing
weight, and, called with `per_slot=True`, returns `(out (T, D), y (T, k, D))`: each slot's expert
output before mixing (0 for id -1). Only the expert-output orthogonality asks for y.

Output regularisers (`configure_experts`, applied by `moelab.build` from the `moe:` section, like the
dispatcher, so model files need not know them):
  output_norm        `moe.expert_output_norm`: none | learned (an RMSNorm per expert, weight (E, D)
                     initialised to 1, parameter `output_norm.weight` under `.experts.`, so it counts,
                     clips and decays as a routed-expert norm) | frozen (the RMSNorm with weight 1).
  output_orthogonality   `moe.expert_output_orthogonality_coef > 0`: when the model calls its experts
                     with the layer's RoutingInfo, `experts(x, routing)`, the dispatcher also returns the
                     per-slot outputs and RoutedExperts writes each token's term (T,) into
                     `routing.extra["expert_output_orthogonality"]` (moe/losses.py). It travels out of
                     the block with the RoutingInfo, so it survives activation checkpointing and compile,
                     and `MoEModel.output` averages it over real tokens and layers. Off, no per-slot
                     output is built.

Mixed widths (`model.expert_widths: [r1, r2, ...]`): the E experts split into len(widths) equal groups,
in order, of hidden width int(r · d_expert); an architecture may also pass each expert's width
(`hidden=`, e.g. tree experts narrowing with depth). Each run of equal widths is stacked separately:
parameters `gate_up`, `down` for equal widths (one group, the names transformers' OLMoE conversion
knows), `gate_up_{g}`, `down_{g}` for group g otherwise. Every parameter lives under `.experts.`, the
marker that gradient clipping, parameter counting and HF conversion use for routed experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moelab.moe.dispatch import PATHS, ExpertGroup, run_expert_groups
from moelab.moe.losses import expert_output_orthogonality_per_token
from moelab.moe.routing import RoutingInfo

Dispatcher = Callable[["RoutedExperts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
OUTPUT_NORMS = ("none", "learned", "frozen")


def expert_hidden_widths(n_experts: int, d_expert: int, widths: Sequence[float] = ()) -> list[int]:
    """Hidden width of each routed expert: d_expert for all, or int(r · d_expert) per equal group."""
    if not widths:
        return [d_expert] * n_experts
    if n_experts % len(widths):
        raise ValueError(f"{n_experts} experts do not split into {len(widths)} equal width groups")
    per_group = n_experts // len(widths)
    return [int(r * d_expert) for r in widths for _ in range(per_group)]


class LocalDispatcher:
    """Every expert runs on the device of its weights, with one of the kernels loop | sorted | grouped."""

    def __init__(self, kernel: str = "grouped"):
        if kernel not in PATHS:
            raise ValueError(f"unknown dispatch kernel {kernel!r}; choose one of {', '.join(PATHS)}")
        self.kernel = kernel

    def __call__(self, experts: RoutedExperts, x, topk_ids, topk_weights, per_slot: bool = False):
        groups, norm = experts.groups(), experts.output_norm
        return run_expert_groups(x, topk_ids, topk_weights, groups, self.kernel, norm, per_slot)

    def __repr__(self) -> str:
        return f"LocalDispatcher({self.kernel!r})"


class ExpertOutputNorm(nn.Module):
    """RMSNorm of each expert's own output, weight (E, D) per expert (learned) or 1 (frozen).

    fp32 normalisation, cast back before the weight, as models/layers.py RMSNorm. Called by the
    kernels on rows that belong to known experts: `norm(y (n, D), experts)` with experts an int (every
    row from that expert) or (n,) long ids of each row.
    """

    def __init__(self, n_experts: int, d_model: int, eps: float, learned: bool, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        ones = torch.ones(n_experts, d_model, device=device, dtype=dtype) if learned else None
        self.weight = nn.Parameter(ones) if learned else None  # (E, D)

    def forward(self, y: torch.Tensor, experts: int | torch.Tensor) -> torch.Tensor:
        y32 = y.float()
        normed = (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)).to(y.dtype)  # (n, D)
        if self.weight is None:
            return normed
        return self.weight[experts].to(y.dtype) * normed  # (D,) or (n, D) weight rows

    def extra_repr(self) -> str:
        return f"{'learned' if self.weight is not None else 'frozen'}, eps={self.eps}"


class RoutedExperts(nn.Module):
    """E routed SwiGLU experts (equal or mixed hidden widths) and the dispatcher that runs them."""

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_expert: int,
        widths: Sequence[float] = (),
        dispatcher: Dispatcher | None = None,
        hidden: Sequence[int] | None = None,
    ):
        """hidden: an explicit hidden width per expert (e.g. a tree's widths by depth), instead of
        d_expert and `widths`; each run of consecutive equal widths becomes one stacked group."""
        super().__init__()
        self.n_experts = n_experts
        self.hidden = (
            list(hidden) if hidden is not None else expert_hidden_widths(n_experts, d_expert, widths)
        )
        if len(self.hidden) != n_experts:
            raise ValueError(f"{len(self.hidden)} hidden widths given for {n_experts} experts")
        starts = [e for e in range(n_experts) if e == 0 or self.hidden[e] != self.hidden[e - 1]]
        ends = starts[1:] + [n_experts]
        self.group_names = []  # (first expert, gate_up name, down name) per width group
        for g, (first, end) in enumerate(zip(starts, ends)):
            size, width = end - first, self.hidden[first]
            suffix = "" if len(starts) == 1 else f"_{g}"
            gate_up = nn.Parameter(torch.empty(size, d_model, 2 * width))  # (n, D, 2I) = [gate | up]
            down = nn.Parameter(torch.empty(size, width, d_model))  # (n, I, D)
            self.register_parameter(f"gate_up{suffix}", gate_up)
            self.register_parameter(f"down{suffix}", down)
            self.group_names.append((first, f"gate_up{suffix}", f"down{suffix}"))
        self.dispatcher = dispatcher or LocalDispatcher()
        self.output_norm: ExpertOutputNorm | None = None  # set by configure_experts
        self.output_orthogonality = False  # set by configure_experts

    def set_output_norm(self, mode: str, eps: float) -> None:
        """none | learned | frozen (see the module docstring); a learned weight starts at 1."""
        if mode not in OUTPUT_NORMS:
            raise ValueError(f"unknown expert output norm {mode!r}; choose one of {', '.join(OUTPUT_NORMS)}")
        ref = self.groups()[0].gate_up
        self.output_norm = (
            None
            if mode == "none"
            else ExpertOutputNorm(self.n_experts, ref.shape[1], eps, mode == "learned", ref.device, ref.dtype)
        )

    def groups(self) -> list[ExpertGroup]:
        """The weights as width groups, in expert order."""
        return [
            ExpertGroup(first, getattr(self, gu), getattr(self, dn)) for first, gu, dn in self.group_names
        ]

    def expert_sizes(self) -> list[int]:
        """Parameters of each routed expert: gate, up and down = 3 · D · I_e, plus D for a learned
        output norm (its row of the (E, D) weight)."""
        d_model = self.groups()[0].gate_up.shape[1]
        learned = self.output_norm is not None and self.output_norm.weight is not None
        return [3 * d_model * width + (d_model if learned else 0) for width in self.hidden]

    def forward(
        self,
        x: torch.Tensor,  # (T, D)
        topk_ids: torch.Tensor | RoutingInfo,  # (T, k) long, or the layer's RoutingInfo
        topk_weights: torch.Tensor | None = None,  # (T, k); None when given a RoutingInfo
    ) -> torch.Tensor:
        """(T, D) mixed expert outputs. Given the layer's RoutingInfo, the ids and weights come from it
        and, with output orthogonality on, each token's term (T,) is written to its extra."""
        routing = topk_ids if isinstance(topk_ids, RoutingInfo) else None
        if routing is not None:
            topk_ids, topk_weights = routing.topk_ids, routing.topk_weights
        if routing is None or not self.output_orthogonality:
            return self.dispatcher(self, x, topk_ids, topk_weights)  # (T, D)
        out, y = self.dispatcher(self, x, topk_ids, topk_weights, per_slot=True)  # (T, D), (T, k, D)
        routing.extra["expert_output_orthogonality"] = expert_output_orthogonality_per_token(y, topk_ids >= 0)
        return out

    def extra_repr(self) -> str:
        widths = sorted(set(self.hidden))
        orth = ", output_orthogonality=True" if self.output_orthogonality else ""
        return f"n_experts={self.n_experts}, widths={widths}, dispatcher={self.dispatcher!r}{orth}"


def set_dispatcher(model: nn.Module, dispatcher: Dispatcher) -> int:
    """Give every RoutedExperts in `model` this dispatcher; returns how many there are."""
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for module in experts:
        module.dispatcher = dispatcher
    return len(experts)


def configure_experts(model: nn.Module, config) -> int:
    """Set the output regularisers of `config.moe` on every RoutedExperts in `model` (see the module
    docstring): the output norm (eps = model.rms_norm_eps) and whether the per-token expert-output
    orthogonality is computed. Called by `moelab.build` before any weights are loaded; returns how
    many RoutedExperts there are."""
    moe = config.moe
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for module in experts:
        module.set_output_norm(moe.expert_output_norm, config.model.rms_norm_eps)
        module.output_orthogonality = moe.expert_output_orthogonality_coef > 0
    return len(experts)
