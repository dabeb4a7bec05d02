"""Specialization regularisers (moe/losses.py): router orthogonality, top-k gap, orthogonal router init,
by hand and inside both built-in architectures."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.errors import ConfigError
from moelab.moe.losses import router_orthogonality, topk_gap_loss


def test_router_orthogonality_by_hand():
    # rows [1, 0] and [1, 1]/√2: Ŵ Ŵᵀ − I = [[0, 1/√2], [1/√2, 0]], Frobenius norm 1, / (E·√D) = 1/(2·√2)
    skewed = torch.tensor([[3.0, 0.0], [2.0, 2.0]])  # row lengths do not matter (rows are normalised)
    assert router_orthogonality([skewed]).item() == pytest.approx(1 / (2 * math.sqrt(2)))
    orthogonal = torch.tensor([[0.0, -5.0], [0.5, 0.0]])
    assert router_orthogonality([orthogonal]).item() == pytest.approx(0.0, abs=1e-7)
    assert router_orthogonality([skewed, orthogonal]).item() == pytest.approx(1 / (4 * math.sqrt(2)))


def test_topk_gap_by_hand_with_cap_and_padding():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33]])
    logits = probs.log()
    # top-1 gaps: 0.3 (capped at 0.1), 0.05, and a padding token that must not count
    want = (-math.log(0.1 + 1e-8) - math.log(0.05 + 1e-8)) / 2
    got = topk_gap_loss([logits], top_k=1, cap=0.1, valid=torch.tensor([1, 1, 0]))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # top-2 gap (p_(2) − p_(3)): 0.2, 0.4, 0.0 (uncapped with cap 1); two layers average
    want2 = -(math.log(0.2 + 1e-8) + math.log(0.4 + 1e-8) + math.log(1e-8)) / 3
    got2 = topk_gap_loss([logits, logits], top_k=2, cap=1.0)
    assert got2.item() == pytest.approx(want2, rel=1e-4)


@pytest.mark.parametrize("arch", ["olmoe", "crosslayer"])
def test_terms_appear_only_when_switched_on_and_are_weighted(arch):
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    off = moelab.build(moelab.load_config(None, tiny_model_overrides(f"model.arch={arch}")))
    assert not {"router_orthogonality", "topk_gap"} & set(off(ids, labels=ids).losses)
    on = tiny_model_overrides(
        f"model.arch={arch}", "moe.router_orthogonality_coef=0.5", "moe.topk_gap_coef=0.25"
    )
    torch.manual_seed(0)
    model = moelab.build(moelab.load_config(None, on))
    with torch.no_grad():
        for router in model.routers():
            router.weight.normal_(0, 0.3)  # for crosslayer: non-zero offsets on top of the shared gate
    out = model(ids, labels=ids)
    if arch == "olmoe":
        weights = [r.weight for r in model.routers()]
    else:  # the effective router of each layer, shared gate + offset
        weights = [model.shared_gate.weight + r.weight for r in model.routers()]
    torch.testing.assert_close(out.losses["router_orthogonality"], router_orthogonality(weights))
    torch.testing.assert_close(
        out.losses["topk_gap"], topk_gap_loss([r.router_logits for r in out.routing], 2, 0.1)
    )
    losses = out.losses
    rest = (
        losses["ce"] + 0.01 * losses["load_balance"] + 0.001 * losses["router_z"]
    )  # the default coefficients
    if arch == "crosslayer":
        rest = rest + 0.1 * out.losses["router_offset"]
    by_hand = rest + 0.5 * out.losses["router_orthogonality"] + 0.25 * out.losses["topk_gap"]
    torch.testing.assert_close(out.loss, by_hand)
    out.loss.backward()
    assert model.routers()[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["olmoe", "crosslayer"])
def test_orthogonal_router_init(arch):
    torch.manual_seed(0)
    model = moelab.build(
        moelab.load_config(None, tiny_model_overrides(f"model.arch={arch}", "moe.router_init=orthogonal"))
    )
    weights = [r.weight for r in model.routers()] if arch == "olmoe" else [model.shared_gate.weight]
    for w in weights:  # (E, D_in) with E <= D_in: orthonormal rows
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-5, rtol=0)
    assert router_orthogonality(weights).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["moe.topk_gap_coef=0.1", "model.top_k=8"], "needs model.top_k < model.n_experts"),
        (
            ["moe.router_orthogonality_coef=-1"],
            "moe.router_orthogonality_coef=-1.0 must be a finite number >= 0",
        ),
        (["moe.topk_gap_cap=0"], "moe.topk_gap_cap=0.0 must be a finite number > 0"),
        (["moe.router_init=identity"], "moe.router_init='identity' is not allowed"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        moelab.load_config(None, tiny_model_overrides(*overrides))
    assert message in str(e.value)
