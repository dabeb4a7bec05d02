"""Generation with a KV cache: the prompt is prefilled in one forward call, then one token per step.

One sequence at a time (batch 1). Greedy at temperature 0; otherwise softmax(logits / T) restricted to
the nucleus (the most probable tokens whose mass first reaches top_p), sampled with a torch.Generator
seeded by `seed`, so a seed always gives the same text. The model runs exactly as trained (same
router, balancing biases and dispatch path), in eval mode under torch.inference_mode.

The model sees at most `max_seq_len` positions; the token predicted at the last of them is still
in-distribution (training predicts it too), so a prompt of N tokens yields at most max_seq_len - N + 1.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moelab.errors import MoelabError
from moelab.train.device import autocast_for

log = logging.getLogger(__name__)


@dataclass
class Step:
    """One decoding step: the chosen token and the forward output it was chosen from."""

    token: torch.Tensor  # (1,) long, on the model's device
    output: Any  # the model's MoEOutput for the positions fed in this step (the whole prompt at step 0)


def generate(
    model: nn.Module,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> list[int]:
    """The new token ids only (the prompt excluded); stops after `eos_token_id`, which is included."""
    steps = generate_steps(model, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_token_id)
    tokens = [step.token for step in steps]
    return torch.cat(tokens).tolist() if tokens else []


def generate_steps(
    model: nn.Module,
    prompt_ids: list[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_token_id: int | None = None,
) -> Iterator[Step]:
    """Like `generate`, but yields every step with its forward output (logits, routing) for analysis.

    Arguments are checked at once (not at the first step). The model stays in eval mode until the
    iterator is exhausted or closed, then gets its previous mode back.
    """
    cfg = model.config.model
    prompt = _prompt_tensor(prompt_ids, cfg.vocab_size, next(model.parameters()).device)  # (1, N)
    if max_new_tokens < 0:
        raise MoelabError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not (0 <= temperature < math.inf and 0 < top_p <= 1):  # written so that NaN fails too
        raise MoelabError(
            f"temperature={temperature} must be a finite number >= 0 and top_p={top_p} in (0, 1]"
        )
    n = prompt.shape[1]
    if n > cfg.max_seq_len:
        raise MoelabError(
            f"the prompt has {n} tokens but the model's max_seq_len is {cfg.max_seq_len}; shorten the prompt"
        )
    n_new = min(max_new_tokens, cfg.max_seq_len - n + 1)
    if n_new < max_new_tokens:
        log.warning(
            "generating %d tokens, not %d: the model's context ends at %d positions",
            n_new,
            max_new_tokens,
            cfg.max_seq_len,
        )
    cache_len = min(n + max_new_tokens, cfg.max_seq_len)
    return _decode(model, prompt, n_new, cache_len, temperature, top_p, seed, eos_token_id)


@torch.inference_mode()  # as a decorator, it wraps each resumption, so the caller's grad mode is untouched
def _decode(model, prompt, n_new, cache_len, temperature, top_p, seed, eos_token_id) -> Iterator[Step]:
    if n_new == 0:
        return
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, cache_len)
        inputs = prompt  # (1, N) at the prefill, then (1, 1)
        precision = autocast_for(model.config.train, prompt.device)  # as trained: bf16 on GPU
        for i in range(n_new):
            with precision:
                out = model(inputs, cache=cache)
            token = next_token(out.logits[:, -1], temperature, top_p, generator)  # (1,)
            yield Step(token, out)
            if i + 1 == n_new:
                break  # the last token is never fed back: the cache needs only N + n_new - 1 slots
            if eos_token_id is not None and bool(token == eos_token_id):  # the one host sync per step
                break
            inputs = token[:, None]
    finally:
        model.train(was_training)


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> (B,) token ids: argmax at temperature 0, else a nucleus sample per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) -> (B, V): softmax(logits / T) in fp32, zero outside the top-p nucleus, renormalised.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p: a token stays
    when the mass of the tokens ranked above it is still below top_p (so the top token always stays).
    """
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_above >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def _prompt_tensor(prompt_ids: list[int] | torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    """A (1, N) long tensor on `device` from a list of ids or an (N,) / (1, N) tensor, checked."""
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.reshape(1, -1) if prompt_ids.dim() == 1 else prompt_ids
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise MoelabError(
                f"prompt_ids has shape {tuple(prompt_ids.shape)}; pass one sequence, shaped (N,) or (1, N)"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex:
            raise MoelabError(f"prompt_ids must hold integer token ids, not {ids.dtype}")
        ids = ids.to(device=device, dtype=torch.long)
    else:
        try:
            ids = torch.tensor([[operator.index(t) for t in prompt_ids]], dtype=torch.long, device=device)
        except TypeError:
            raise MoelabError("prompt_ids must be a list of integer token ids") from None
    if ids.shape[1] == 0:
        raise MoelabError("the prompt is empty; give at least one token id")
    if bool((ids < 0).any() | (ids >= vocab_size).any()):
        raise MoelabError(f"prompt ids must be in [0, {vocab_size}), the model's vocabulary")
    return ids
