"""parallelize(): dispatcher, activation checkpointing and compile applied from outside the model."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.errors import MoelabError
from moelab.moe.experts import RoutedExperts
from moelab.train.parallel import checkpoint_activations, parallelize

TINY = tiny_model_overrides("moe.lflb=true")


def twin_models(*extra: str):
    torch.manual_seed(0)
    plain = moelab.build(moelab.load_config(None, TINY + list(extra))).train()
    other = moelab.build(moelab.load_config(None, TINY + list(extra))).train()
    other.load_state_dict(plain.state_dict())
    return plain, other


def loss_and_grads(model, x):
    model.zero_grad()
    out = model(x, labels=x)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients():
    plain, ckpt = twin_models()
    config = moelab.load_config(None, TINY + ["train.activation_checkpointing=true"])
    names_before = list(ckpt.state_dict())
    parallelize(ckpt, config)
    assert list(ckpt.state_dict()) == names_before  # blocks changed in place, not wrapped
    calls = []
    for block in ckpt.blocks:
        # a pre-hook: recomputation stops early, once the last saved tensor is rebuilt (inside the MoE)
        block.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randint(2, 128, (2, 12))
    loss_a, grads_a = loss_and_grads(plain, x)
    loss_b, grads_b = loss_and_grads(ckpt, x)
    assert len(calls) == 2 * len(ckpt.blocks)  # each block ran again in backward
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(x)
    assert len(calls) == len(ckpt.blocks)  # no recomputation outside training


def test_checkpointing_twice_is_a_no_op_and_the_dispatcher_comes_from_the_config():
    model = moelab.build(moelab.load_config(None, TINY))
    block = checkpoint_activations(model.blocks[0])
    cls = type(block)
    assert checkpoint_activations(block) is block and type(block) is cls
    parallelize(model, moelab.load_config(None, TINY + ["moe.dispatch=sorted"]))
    kernels = {m.dispatcher.kernel for m in model.modules() if isinstance(m, RoutedExperts)}
    assert kernels == {"sorted"}


def test_a_model_without_blocks_is_refused_for_checkpointing():
    class Flat(torch.nn.Module):
        pass

    with pytest.raises(MoelabError, match="model.blocks"):
        parallelize(Flat(), moelab.load_config(None, TINY + ["train.activation_checkpointing=true"]))


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_fall_back_from_fp32_grouped_mm():
    """Under torch.compile grouped_mm runs only in bf16: fp32 models must fall back and stay exact."""
    eager, compiled = twin_models("moe.dispatch=grouped")
    parallelize(compiled, moelab.load_config(None, TINY + ["moe.dispatch=grouped", "train.compile=true"]))
    x = torch.randint(2, 128, (2, 16))
    loss_a, grads_a = loss_and_grads(eager, x)
    loss_b, grads_b = loss_and_grads(compiled, x)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    for name in ("blocks.1.mlp.experts.gate_up", "blocks.0.mlp.router.weight", "embed.weight"):
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4)
    assert torch.equal(compiled(x).routing[1].topk_ids, eager(x).routing[1].topk_ids)
