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

Mixed widths (`model.expert_widths: [r1, r2, ...]`): the E experts split into len(widths) equal groups,
in order, of hidden width int(r · d_expert); an architecture may also pass each expert's width
(`hidden=`, e.g. tree experts narrowing with depth). Each run of equal widths is stacked separately:
parameters `gate_up`, `down` for equal widths (one group, the names transformers' OLMoE conversion
knows), `gate_up_{g}`, `down_{g}` for group g otherwise. Every parameter lives under `.experts.`, the marker that gradient
clipping, parameter counting and HF conversion use for routed experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from moelab.moe.dispatch import PATHS, ExpertGroup, run_expert_groups

Dispatcher = Callable[["RoutedExperts", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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

    def __call__(self, experts: RoutedExperts, x, topk_ids, topk_weights) -> torch.Tensor:
        return run_expert_groups(x, topk_ids, topk_weights, experts.groups(), self.kernel)

    def __repr__(self) -> str:
        return f"LocalDispatcher({self.kernel!r})"


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

    def groups(self) -> list[ExpertGroup]:
        """The weights as width groups, in expert order."""
        return [
            ExpertGroup(first, getattr(self, gu), getattr(self, dn)) for first, gu, dn in self.group_names
        ]

    def expert_sizes(self) -> list[int]:
        """Parameters of each routed expert: gate, up and down = 3 · D · I_e."""
        d_model = self.groups()[0].gate_up.shape[1]
        return [3 * d_model * width for width in self.hidden]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.dispatcher(self, x, topk_ids, topk_weights)  # (T, D)

    def extra_repr(self) -> str:
        widths = sorted(set(self.hidden))
        return f"n_experts={self.n_experts}, widths={widths}, dispatcher={self.dispatcher!r}"


def set_dispatcher(model: nn.Module, dispatcher: Dispatcher) -> int:
    """Give every RoutedExperts in `model` this dispatcher; returns how many there are."""
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for module in experts:
        module.dispatcher = dispatcher
    return len(experts)
