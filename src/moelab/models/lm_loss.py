"""Next-token cross-entropy through the lm_head without materialising the (tokens × vocab) logits.

The plain path, `F.cross_entropy((hidden @ W.T).float(), labels)`, keeps the logits in the compute
dtype and their fp32 copy alive for backward, and backward adds an fp32 softmax of the same size: at
vocab 50,304 that is ~0.6 MB per token, more than a small MoE's activations. `chunked_cross_entropy`
computes the same loss and the same gradients one chunk of tokens at a time and keeps only the
per-token log-sum-exp (T,) for backward, recomputing each chunk's logits there (one extra (c, D) × (D, V)
matrix product per chunk: the price of not storing them).

Numerics follow the plain path under autocast: the logits are a matrix product in the compute dtype
(bf16 under bf16 autocast, else the inputs' dtype), log-sum-exp and softmax are in fp32, and the
logit gradient is cast back to the compute dtype before its two matrix products. The only difference
is the order of summation of the lm_head weight gradient (chunk by chunk, accumulated in fp32).

Shapes: T tokens, D hidden width, V vocabulary, c tokens per chunk.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: the autocast dtype when autocast is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype):
        # hidden (T, D), weight (V, D), labels (T,) -> mean ce over labels != -100, a 0-dim fp32 tensor
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            valid = labels != IGNORE_INDEX  # (T,)
            safe = labels.masked_fill(~valid, 0)  # (T,) a gatherable index for ignored tokens
            lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)  # (T,)
            target = torch.empty_like(lse)  # (T,) the label's logit
            for s in range(0, h.shape[0], chunk):
                logits = (h[s : s + chunk] @ w.T).float()  # (c, V), the only (·, V) tensors alive
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                target[s : s + chunk] = logits.gather(1, safe[s : s + chunk, None]).squeeze(1)
                del logits
            n_valid = valid.sum()
            loss = ((lse - target) * valid).sum() / n_valid
        ctx.save_for_backward(hidden, weight, safe, valid, lse, n_valid)
        ctx.chunk, ctx.dtype = chunk, dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, valid, lse, n_valid = ctx.saved_tensors
        need_h, need_w, chunk = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
            scale = (grad_loss.float() / n_valid) * valid  # (T,) d loss / d (token's ce)
            grad_h = torch.empty_like(h) if need_h else None  # (T, D) compute dtype, as the plain path
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                hc = h[s : s + chunk]  # (c, D)
                # d ce / d logits = softmax - onehot(label), recomputed from the saved log-sum-exp
                g = (hc @ w.T).float()  # (c, V) fp32; in place from here: one (c, V) buffer
                g.sub_(lse[s : s + chunk, None]).exp_()
                g[torch.arange(g.shape[0], device=g.device), safe[s : s + chunk]] -= 1.0
                g = g.mul_(scale[s : s + chunk, None]).to(ctx.dtype)  # (c, V) as the plain path's cast
                if need_h:
                    grad_h[s : s + chunk] = g @ w
                if need_w:
                    grad_w += (g.T @ hc).float()  # (V, D)
                del g
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,  # (T, D) final hidden state (after the last norm)
    weight: torch.Tensor,  # (V, D) the lm_head weight
    labels: torch.Tensor,  # (T,) next-token targets; -100 = ignore
    chunk: int,  # tokens per chunk: the (·, V) temporaries are (chunk, V) instead of (T, V)
) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=-100)` (mean over the
    non-ignored tokens), with the same gradients w.r.t. hidden and weight, computed `chunk` tokens at a
    time. Under autocast the matrix products run in the autocast dtype, as nn.Linear's would."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, _compute_dtype(hidden))
