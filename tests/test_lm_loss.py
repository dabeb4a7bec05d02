"""Chunked lm_head cross-entropy (models/lm_loss.py) against the plain path it replaces:
`F.cross_entropy((hidden @ W.T).float(), labels, ignore_index=-100)`, on the loss and on the gradients
w.r.t. hidden and W; then through every architecture's out.loss, and through the trainer.

Tolerances. fp32: both paths do the same fp32 arithmetic per token; only the order of summation of the
W gradient (chunk by chunk vs one matrix product) and the matmul blocking differ, so they agree to a
few fp32 ulps (rtol 1e-5, atol 1e-6 on values of order 1e-2 .. 1). bf16 autocast: the logits and the
logit gradient are bf16 (8 bits of mantissa, relative step 2^-8 ≈ 4e-3) in both paths, and a chunk's
matrix product may round a few logits one bf16 step differently from the whole product; the W gradient
is summed over chunks in fp32 instead of in one bf16 result. So the loss agrees to ~1e-3 relative
and gradients to ~2 bf16 steps of their largest entry (atol 1e-2 · max|g|).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_TRAIN_MODEL, tiny_model_overrides

import moelab
from moelab.models import ARCHITECTURES
from moelab.models.lm_loss import chunked_cross_entropy
from moelab.train.trainer import prepare_run, train


def inputs(T=37, D=16, V=53, seed=0, ignore=0.2):
    """hidden (T, D), W (V, D), labels (T,) with about `ignore` of them -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D**0.5
    labels = torch.randint(0, V, (T,), generator=g)
    labels[torch.rand(T, generator=g) < ignore] = -100
    return hidden, weight, labels


def loss_and_grads(fn, hidden, weight, labels, autocast=False):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(h, w, labels)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def plain(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 8, 10, 37, 100])  # 37 tokens: uneven last chunk, one chunk, > T
def test_fp32_loss_and_gradients_match_the_plain_path(chunk):
    hidden, weight, labels = inputs()
    assert (labels == -100).any() and (labels != -100).any()
    ref = loss_and_grads(plain, hidden, weight, labels)
    got = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, chunk), hidden, weight, labels)
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_ignored_tokens_get_zero_gradient_and_do_not_count_in_the_mean():
    hidden, weight, labels = inputs(ignore=0.5)
    _, gh, _ = loss_and_grads(lambda h, w, y: chunked_cross_entropy(h, w, y, 6), hidden, weight, labels)
    assert (gh[labels == -100] == 0).all() and (gh[labels != -100].abs().sum(-1) > 0).all()
    # the mean over the kept tokens alone, by hand from log_softmax
    kept = labels != -100
    logp = F.log_softmax(hidden[kept] @ weight.T, -1)
    by_hand = -logp.gather(1, labels[kept, None]).mean()
    torch.testing.assert_close(chunked_cross_entropy(hidden, weight, labels, 6), by_hand)


@pytest.mark.parametrize("chunk", [8, 37])
def test_bf16_autocast_matches_the_plain_path(chunk):
    hidden, weight, labels = inputs(T=64, D=32, V=101)
    ref = loss_and_grads(plain, hidden, weight, labels, autocast=True)
    got = loss_and_grads(
        lambda h, w, y: chunked_cross_entropy(h, w, y, chunk), hidden, weight, labels, autocast=True
    )
    assert got[0].dtype == torch.float32  # log-sum-exp in fp32, as the plain path's .float()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-3, atol=0)
    for r, g in zip(ref[1:], got[1:], strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0, atol=1e-2 * r.abs().max().item())


def test_backward_keeps_no_vocab_sized_tensor():
    """What autograd saves for backward: nothing with T·V elements (the plain path saves fp32 log-probs)."""
    T, D, V = 40, 8, 300  # V·T far above every input's size
    hidden, weight, labels = inputs(T=T, D=D, V=V)

    def saved_sizes(fn) -> list[int]:
        sizes = []
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn(h, w, labels)
        return sizes

    assert max(saved_sizes(plain)) >= T * V  # the check can see a (T, V) tensor
    assert max(saved_sizes(lambda h, w, y: chunked_cross_entropy(h, w, y, 8))) <= V * D


def test_refuses_a_non_positive_chunk():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(hidden, weight, labels, 0)


ARCH_OVERRIDES = {"hierarchical": ("model.tree_branches=2", "model.tree_depth=2", "model.n_experts=6")}


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_whole_model_loss_and_gradients_match(arch):
    """out.loss and every parameter's gradient with train.loss_chunk_tokens=7 (uneven: 2·9 tokens) equal
    the plain path's; in training out.logits is None, in eval mode the logits are there as before."""
    torch.manual_seed(0)
    overrides = tiny_model_overrides(f"model.arch={arch}", *ARCH_OVERRIDES.get(arch, ()))
    model = moelab.build(moelab.load_config(None, overrides)).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.model.vocab_size, (2, 9), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100

    def run(chunk):
        model.config.train.loss_chunk_tokens = chunk
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    ref, ref_grads = run(0)
    out, grads = run(7)
    assert ref.logits is not None and out.logits is None
    assert out.losses.keys() == ref.losses.keys()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["ce"], ref.losses["ce"], rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and "lm_head.weight" in grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert model.eval()(ids, labels=labels).logits.shape == (2, 9, model.config.model.vocab_size)


def test_trainer_runs_the_same_steps_with_the_chunked_loss(tmp_path, two_domain_data):
    """The trainer reads only out.losses in training; validation (eval mode) still gets logits."""

    def losses(name, chunk):
        (tmp_path / "cfg.yaml").write_text("{}\n")
        overrides = [
            *TINY_TRAIN_MODEL,
            f"data.path={two_domain_data / 'tokens'}",
            "data.seq_len=16",
            "train.batch_size=4",
            "train.steps=3",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.save_every=0",
            f"train.loss_chunk_tokens={chunk}",
        ]
        config, run_dir = prepare_run(tmp_path / "cfg.yaml", overrides, tmp_path / name, False)
        train(config, run_dir, progress=False)
        records = [json.loads(line) for line in Path(run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["type"] == "train"], [
            r["loss"] for r in records if r["type"] == "val"
        ]

    (train_ref, val_ref), (train_got, val_got) = losses("plain", 0), losses("chunked", 10)
    assert len(train_ref) == 3 and len(val_ref) >= 1
    assert train_got == pytest.approx(train_ref, rel=1e-5)
    assert val_got == pytest.approx(val_ref, rel=1e-5)
