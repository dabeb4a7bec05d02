"""Specialization regularisers (moe/losses.py): router orthogonality, top-k gap, orthogonal router init,
expert-output orthogonality, per-expert output norm, expert-size penalty, by hand and inside both
built-in architectures."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.errors import ConfigError, MoelabError
from moelab.moe.experts import RoutedExperts
from moelab.moe.losses import (
    expert_output_orthogonality,
    expert_output_orthogonality_per_token,
    expert_size_loss,
    loss_coefficients,
    router_orthogonality,
    topk_gap_loss,
)


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
        (
            ["moe.expert_output_orthogonality_coef=-0.1"],
            "moe.expert_output_orthogonality_coef=-0.1 must be a finite number >= 0",
        ),
        (["moe.expert_output_orthogonality_coef=.nan"], "moe.expert_output_orthogonality_coef=nan must be"),
        (["moe.expert_size_penalty=-1"], "moe.expert_size_penalty=-1.0 must be a finite number >= 0"),
        (["moe.expert_size_penalty=.inf"], "moe.expert_size_penalty=inf must be a finite number >= 0"),
        (["moe.expert_output_norm=layer"], "moe.expert_output_norm='layer' is not allowed"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        moelab.load_config(None, tiny_model_overrides(*overrides))
    assert message in str(e.value)


# ----------------------------------------------------------------------------- expert-output orthogonality


def test_expert_output_orthogonality_per_token_by_hand():
    e1, e2, e3 = torch.eye(3)
    y = torch.stack(
        [
            torch.stack([2 * e1, 5 * e2, 0 * e3]),  # orthogonal (slot 3 is id -1): 0
            torch.stack([e1, 3 * e1, e2]),  # slot 3 is id -1; parallel: C − I = [[0, 1], [1, 0]], √2 / 2
            torch.stack([e1, -e1, e2]),  # slot 3 is id -1; antiparallel: the same, √2 / 2
            torch.stack([e1, e1 + e2, e2]),  # cos 1/√2, 1/√2, 0: ‖C − I‖_F = √(4 · ½) = √2, / 3
            torch.stack([e1, e2, 7 * e1]),  # one pair parallel: √2 / 3
            torch.stack([e1, e2, e3]),  # only slot 1 is real: no pair, 0
            torch.stack([e2, 2 * e2, 3 * e2]),  # all parallel: C − I has six ones, √6 / 3 = √(1 − 1/3)
        ]
    )
    real = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]]).bool()
    half, third = math.sqrt(2) / 2, math.sqrt(2) / 3
    want = torch.tensor([0.0, half, half, third, third, 0.0, math.sqrt(6) / 3])
    torch.testing.assert_close(expert_output_orthogonality_per_token(y, real), want)
    # the -1 slots are left out: counting slot 3 of token 1 (e2, orthogonal to both) changes k' to 3
    real[1, 2] = True
    assert expert_output_orthogonality_per_token(y, real)[1].item() == pytest.approx(math.sqrt(2) / 3)


def test_expert_output_orthogonality_gradient_is_finite_and_pushes_parallel_outputs_apart():
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.1], [1.0, -0.1]]], requires_grad=True)
    term = expert_output_orthogonality_per_token(y, torch.ones(2, 2, dtype=torch.bool))
    term.sum().backward()
    assert torch.isfinite(y.grad).all()
    assert torch.equal(y.grad[0], torch.zeros(2, 2))  # at the optimum: no gradient (and no NaN)
    # descending the gradient opens the angle between the near-parallel outputs of token 2
    assert y.grad[1, 0, 1] < 0 and y.grad[1, 1, 1] > 0


def test_expert_output_orthogonality_averages_real_tokens_then_layers():
    layer_a = torch.tensor([0.2, 0.4, 9.0])  # (T,) per-token terms; token 3 is padding
    layer_b = torch.tensor([0.6, 0.0, 9.0])
    got = expert_output_orthogonality([layer_a, layer_b], valid=torch.tensor([1, 1, 0]))
    assert got.item() == pytest.approx(((0.2 + 0.4) / 2 + (0.6 + 0.0) / 2) / 2)


# ----------------------------------------------------------------------------- expert-size penalty


def test_expert_size_by_hand_on_mixed_widths():
    # widths 0.5, 0.5, 1, 2 (I_e / d_expert); p = softmax(log p)
    widths = torch.tensor([0.5, 0.5, 1.0, 2.0])
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]])
    # token 1: 0.05 + 0.1 + 0.3 + 0.8 = 1.25; token 2: (0.5 + 0.5 + 1 + 2) / 4 = 1.0; token 3 padding
    got = expert_size_loss([probs.log()], widths, valid=torch.tensor([1, 1, 0]))
    assert got.item() == pytest.approx((1.25 + 1.0) / 2)
    # a second layer with token 3 real: 0.35 + 0.05 + 0.1 + 0.2 = 0.7; layers average
    both = expert_size_loss([probs.log(), probs.log()], widths)
    assert both.item() == pytest.approx((1.25 + 1.0 + 0.7) / 3)
    # equal widths: Σ p_e = 1 whatever the router does
    assert expert_size_loss([probs.log()], torch.ones(4)).item() == pytest.approx(1.0)


def test_expert_size_in_a_mixed_width_model_moves_the_router_toward_narrow_experts():
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    torch.manual_seed(0)
    overrides = tiny_model_overrides("model.expert_widths=[0.5, 1.0]", "moe.expert_size_penalty=0.2")
    model = moelab.build(moelab.load_config(None, overrides))
    out = model(ids, attention_mask=mask, labels=ids)
    widths = torch.tensor([16 / 32] * 4 + [32 / 32] * 4)  # int(0.5 · 32) / 32 and 32 / 32, 4 experts each
    valid = mask.reshape(-1).bool()
    by_hand = torch.stack([(r.router_logits.softmax(-1) @ widths)[valid].mean() for r in out.routing]).mean()
    torch.testing.assert_close(out.losses["expert_size"], by_hand)
    rest = out.losses["ce"] + 0.01 * out.losses["load_balance"] + 0.001 * out.losses["router_z"]
    torch.testing.assert_close(out.loss, rest + 0.2 * out.losses["expert_size"])
    # d/d logit_e = p_e (w_e − Σ_e' p_e' w_e') / (real tokens · layers): descending it moves each token's
    # probability from wider to narrower experts than its current average. The last layer's logits, as
    # the first layer's also reach the second layer's term through the hidden state.
    logits = out.routing[-1].router_logits
    (grad,) = torch.autograd.grad(out.losses["expert_size"], logits)
    p = logits.detach().softmax(-1)
    by_hand = p * (widths - (p @ widths)[:, None]) * valid[:, None] / (valid.sum() * 2)
    torch.testing.assert_close(grad, by_hand)
    assert (grad[valid][:, :4] < 0).all() and (grad[valid][:, 4:] > 0).all()
    equal = moelab.build(moelab.load_config(None, tiny_model_overrides("moe.expert_size_penalty=0.2")))
    assert equal(ids, labels=ids).losses["expert_size"].item() == pytest.approx(1.0)  # equal widths: constant


# ----------------------------------------------------------------------------- inside the models


def per_slot_by_hand(x, topk_ids, experts, eps):
    """(T, k, D) each slot's expert output, one token and one slot at a time (equal widths), normalised
    by hand with a learned output norm."""
    gate_up, down = experts.gate_up, experts.down
    I = down.shape[1]
    rows = []
    for t in range(x.shape[0]):
        row = []
        for e in topk_ids[t].tolist():
            gate, up = x[t] @ gate_up[e][:, :I], x[t] @ gate_up[e][:, I:]
            y = (gate * torch.sigmoid(gate) * up) @ down[e]
            if experts.output_norm is not None:
                y = experts.output_norm.weight[e] * y / torch.sqrt((y * y).mean() + eps)
            row.append(y)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def orthogonality_by_hand(y):
    """‖C − I‖_F / k of one token's (k, D) outputs, pair by pair."""
    k = y.shape[0]
    total = 0.0
    for i in range(k):
        for j in range(k):
            if i != j:
                total += (torch.dot(y[i], y[j]) / (y[i].norm() * y[j].norm())).item() ** 2
    return math.sqrt(total) / k


def capture_expert_inputs(model):
    seen = []
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.register_forward_pre_hook(
                lambda m, args: seen.append((m, args[0].detach(), args[1].topk_ids))
            )
    return seen


@pytest.mark.parametrize("arch", ["olmoe", "crosslayer"])
def test_new_terms_absent_when_off_and_weighted_when_on(arch):
    ids = torch.randint(2, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: excluded from the average
    off = moelab.build(moelab.load_config(None, tiny_model_overrides(f"model.arch={arch}")))
    assert not {"expert_output_orthogonality", "expert_size"} & set(off(ids, labels=ids).losses)
    assert not any(
        m.output_orthogonality or m.output_norm for m in off.modules() if isinstance(m, RoutedExperts)
    )
    on = tiny_model_overrides(
        f"model.arch={arch}",
        "moe.expert_output_orthogonality_coef=0.3",
        "moe.expert_output_norm=learned",
        "moe.expert_size_penalty=0.2",
    )
    torch.manual_seed(0)
    model = moelab.build(moelab.load_config(None, on))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "output_norm" in name:
                p.uniform_(0.5, 1.5)
    seen = capture_expert_inputs(model)
    out = model(ids, attention_mask=mask, labels=ids)
    assert len(seen) == 2
    valid = mask.reshape(-1).bool().tolist()
    per_layer = []
    for experts, x, topk_ids in seen:
        y = per_slot_by_hand(x, topk_ids, experts, eps=1e-5)
        terms = [orthogonality_by_hand(y[t]) for t in range(x.shape[0]) if valid[t]]
        per_layer.append(sum(terms) / len(terms))
    assert out.losses["expert_output_orthogonality"].item() == pytest.approx(sum(per_layer) / 2, rel=1e-4)
    coefs = loss_coefficients(model.config)
    assert (coefs["expert_output_orthogonality"], coefs["expert_size"]) == (0.3, 0.2)
    losses = out.losses
    rest = losses["ce"] + 0.01 * losses["load_balance"] + 0.001 * losses["router_z"]
    if arch == "crosslayer":
        rest = rest + 0.1 * losses["router_offset"]
    by_hand = rest + 0.3 * losses["expert_output_orthogonality"] + 0.2 * losses["expert_size"]
    torch.testing.assert_close(out.loss, by_hand)
    model.zero_grad()
    losses["expert_output_orthogonality"].backward()  # reaches the experts and their norm weights
    experts = seen[0][0]
    assert experts.gate_up.grad.abs().sum() > 0 and experts.output_norm.weight.grad.abs().sum() > 0


def test_expert_output_orthogonality_survives_activation_checkpointing():
    from moelab.train.parallel import parallelize

    overrides = tiny_model_overrides(
        "moe.expert_output_orthogonality_coef=0.5", "moe.expert_output_norm=learned"
    )
    torch.manual_seed(0)
    plain = moelab.build(moelab.load_config(None, overrides)).train()
    ckpt = moelab.build(moelab.load_config(None, overrides)).train()
    ckpt.load_state_dict(plain.state_dict())
    parallelize(ckpt, moelab.load_config(None, [*overrides, "train.activation_checkpointing=true"]))
    x = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    results = []
    for model in (plain, ckpt):
        model.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        results.append((out.losses["expert_output_orthogonality"].detach(), dict(model.named_parameters())))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, p in results[0][1].items():
        torch.testing.assert_close(results[1][1][name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_model_that_does_not_pass_its_routing_to_the_experts_is_told_how_to():
    model = moelab.build(
        moelab.load_config(None, tiny_model_overrides("moe.expert_output_orthogonality_coef=0.5"))
    )
    for moe in model.moe_layers:  # the pre-existing call form: ids and weights only
        moe.experts.forward = lambda x, r, _f=moe.experts.forward: _f(x, r.topk_ids, r.topk_weights)
    ids = torch.randint(2, 128, (1, 4))
    with pytest.raises(RuntimeError, match=r"call its experts with the RoutingInfo, experts\(x, routing\)"):
        model(ids, labels=ids)


def test_hf_conversion_refuses_an_expert_output_norm():
    from moelab.hf import check_exportable

    for norm in ("learned", "frozen"):
        config = moelab.load_config(None, tiny_model_overrides(f"moe.expert_output_norm={norm}"))
        with pytest.raises(
            MoelabError, match=f"moe.expert_output_norm={norm}: transformers' OLMoE has no"
        ) as e:
            check_exportable(config)
        assert "\n" not in str(e.value)
    check_exportable(moelab.load_config(None, tiny_model_overrides("moe.expert_output_orthogonality_coef=1")))
