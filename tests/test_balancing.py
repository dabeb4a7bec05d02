"""Balancing: load-balance losses, router z-loss, expert counts and loss-free balancing (LFLB).

Expected numbers are worked out by hand in the comments; logits are chosen as log-probabilities so
that the softmax gives round numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.moe.losses import load_balance_loss, router_z_loss
from moelab.moe.routing import TopKRouter, expert_counts

TINY = tiny_model_overrides()


def logits_of(probs: list[list[float]]) -> torch.Tensor:
    """Router logits whose softmax is exactly `probs` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


# 4 tokens, 3 experts. Top-1 picks: 0, 0, 1, 2.
TOP1_PROBS = [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6]]
# Top-2 picks: {0,1}, {1,2}, {2,0}, {1,0}  -> assignments per expert 3, 3, 2.
LAYER_A = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6], [0.4, 0.5, 0.1]]
# Top-2 picks: {0,1}, {1,2}, {2,0}, {0,1}  -> assignments per expert 3, 3, 2.
LAYER_B = [[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6], [0.6, 0.3, 0.1]]


def test_per_layer_top1_by_hand():
    # f = [2/4, 1/4, 1/4]; P = column means = [1.45/4, 1.2/4, 1.35/4] = [0.3625, 0.3, 0.3375]
    # loss = 3 * (0.5*0.3625 + 0.25*0.3 + 0.25*0.3375) = 3 * 0.340625 = 1.021875
    loss = load_balance_loss([logits_of(TOP1_PROBS)], top_k=1, kind="per_layer")
    assert loss.item() == pytest.approx(1.021875, abs=1e-6)


def test_per_layer_top2_two_layers_by_hand():
    # Layer A: f = [3/8, 3/8, 2/8], P = [1.3/4, 1.5/4, 1.2/4] = [0.325, 0.375, 0.3]
    #   3 * (0.375*0.325 + 0.375*0.375 + 0.25*0.3) = 3 * 0.3375 = 1.0125
    # Layer B: f = [3/8, 3/8, 2/8], P = [1.6/4, 1.3/4, 1.1/4] = [0.4, 0.325, 0.275]
    #   3 * (0.375*0.4 + 0.375*0.325 + 0.25*0.275) = 3 * 0.340625 = 1.021875
    # Mean over layers: (1.0125 + 1.021875) / 2 = 1.0171875
    a, b = logits_of(LAYER_A), logits_of(LAYER_B)
    assert load_balance_loss([a], 2).item() == pytest.approx(1.0125, abs=1e-6)
    assert load_balance_loss([b], 2).item() == pytest.approx(1.021875, abs=1e-6)
    assert load_balance_loss([a, b], 2, kind="per_layer").item() == pytest.approx(1.0171875, abs=1e-6)


def test_hf_concat_two_layers_by_hand():
    # All 8 rows together: assignments [6, 6, 4] / 8 rows = [0.75, 0.75, 0.5] (not divided by k)
    # P = [(1.3+1.6)/8, (1.5+1.3)/8, (1.2+1.1)/8] = [0.3625, 0.35, 0.2875]
    # loss = 3 * (0.75*0.3625 + 0.75*0.35 + 0.5*0.2875) = 3 * 0.678125 = 2.034375
    loss = load_balance_loss([logits_of(LAYER_A), logits_of(LAYER_B)], 2, kind="hf_concat")
    assert loss.item() == pytest.approx(2.034375, abs=1e-6)


def test_perfect_balance_gives_one_per_layer_and_top_k_hf_concat():
    # 4 tokens, 4 experts: token i prefers experts i and i+1 (mod 4) equally. Each expert gets 2 of the
    # 8 assignments (f = 1/4) and by symmetry every column of probabilities averages to P = 1/4.
    # per_layer: 4 * 4 * (1/4 * 1/4) = 1;  hf_concat: 4 * 4 * (2/4 * 1/4) = 2 = top_k.
    logits = torch.zeros(4, 4)
    for i in range(4):
        logits[i, i] = logits[i, (i + 1) % 4] = 3.0
    assert load_balance_loss([logits, logits], 2, kind="per_layer").item() == pytest.approx(1.0, abs=1e-6)
    assert load_balance_loss([logits, logits], 2, kind="hf_concat").item() == pytest.approx(2.0, abs=1e-6)
    # Top-1 on 3 tokens / 3 experts with a cyclic preference: also exactly balanced.
    cyc = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    assert load_balance_loss([cyc], 1).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balance_loss([cyc], 1, kind="hf_concat").item() == pytest.approx(1.0, abs=1e-6)


def test_all_tokens_on_one_expert_is_maximal():
    # Every token picks expert 0 with probability ~1: f = [1, 0, 0], P ~ [1, 0, 0] -> loss ~ E = 3.
    logits = torch.tensor([[30.0, 0.0, 0.0]] * 5)
    assert load_balance_loss([logits], 1).item() == pytest.approx(3.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["per_layer", "hf_concat"])
def test_padding_tokens_do_not_change_the_load_balance_loss(kind):
    real_a, real_b = logits_of(LAYER_A), logits_of(LAYER_B)
    extreme = torch.tensor([[100.0, 50.0, -100.0], [100.0, 50.0, -100.0]])
    # Padded tokens are rows 1 and 4 of 6.
    pad_a = torch.cat([real_a[:1], extreme[:1], real_a[1:], extreme[1:]])
    pad_b = torch.cat([real_b[:1], extreme[:1], real_b[1:], extreme[1:]])
    valid = torch.tensor([1, 0, 1, 1, 1, 0])
    expected = load_balance_loss([real_a, real_b], 2, kind=kind)
    got = load_balance_loss([pad_a, pad_b], 2, valid=valid, kind=kind)
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    # And it does matter when the mask is left out.
    unmasked = load_balance_loss([pad_a, pad_b], 2, kind=kind)
    assert abs(unmasked.item() - expected.item()) > 1e-2
    # A (B, N) mask works as well as a flat one.
    got_2d = load_balance_loss([pad_a, pad_b], 2, valid=valid.view(2, 3).bool(), kind=kind)
    assert got_2d.item() == pytest.approx(expected.item(), abs=1e-6)


def test_hf_concat_matches_transformers_load_balancing_loss(transformers):
    from transformers.models.olmoe import modeling_olmoe as modeling

    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(12, 8, generator=g) * 2 for _ in range(3)]
    mask = torch.ones(3, 4, dtype=torch.long)
    mask[0, :2] = 0
    mask[2, 3] = 0
    for attention_mask in (None, mask):
        ref = modeling.load_balancing_loss_func(tuple(layers), 8, 3, attention_mask)
        valid = None if attention_mask is None else attention_mask.reshape(-1)
        got = load_balance_loss(layers, 3, valid=valid, kind="hf_concat")
        torch.testing.assert_close(got, ref.float(), atol=1e-6, rtol=1e-6)


def test_router_z_loss_by_hand():
    # Row [0, 0, 0]: logsumexp = ln 3.  Row [ln 1, ln 2, ln 5]: logsumexp = ln(1 + 2 + 5) = ln 8.
    # Row [100, -100, -100] is padding.  z = (ln(3)^2 + ln(8)^2) / 2 = (1.2069490 + 4.3240771) / 2
    layer = torch.tensor([[0.0, 0.0, 0.0], [0.0, math.log(2), math.log(5)], [100.0, -100.0, -100.0]])
    valid = torch.tensor([True, True, False])
    expected = (math.log(3) ** 2 + math.log(8) ** 2) / 2
    assert expected == pytest.approx(2.7655131, abs=1e-6)
    assert router_z_loss([layer], valid).item() == pytest.approx(expected, rel=1e-6)
    # Averaged over layers: a second layer of constant logits c has logsumexp c + ln 3.
    second = torch.full((3, 3), 2.0)
    both = (expected + (2.0 + math.log(3)) ** 2) / 2
    assert router_z_loss([layer, second], valid).item() == pytest.approx(both, rel=1e-6)
    # Without a mask the padded row's logsumexp 100 dominates.
    assert router_z_loss([layer]).item() == pytest.approx((2 * expected + 100.0**2) / 3, rel=1e-6)


def test_expert_counts_match_a_python_count():
    g = torch.Generator().manual_seed(1)
    n_experts, T, k = 7, 50, 3
    ids = torch.randint(0, n_experts, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < 0.1] = -1  # "no expert" slots (hierarchical models)
    valid = torch.rand(T, generator=g) < 0.7
    expected = [0] * n_experts
    for t in range(T):
        if not valid[t]:
            continue
        for e in ids[t].tolist():
            if e >= 0:
                expected[e] += 1
    got = expert_counts(ids, n_experts, valid)
    assert got.dtype == torch.float32 and got.shape == (n_experts,)
    assert got.tolist() == expected
    unmasked = [sum(1 for e in ids.reshape(-1).tolist() if e == i) for i in range(n_experts)]
    assert expert_counts(ids, n_experts).tolist() == unmasked


def _router(n_experts=4, top_k=2, bias_on="scores", clamp=1.0, d_model=3) -> TopKRouter:
    router = TopKRouter(d_model, n_experts, top_k, bias_on=bias_on, bias_clamp=clamp)
    with torch.no_grad():
        router.weight.zero_()
    return router


def test_update_balance_bias_moves_by_exactly_rate():
    router = _router(n_experts=4)
    router.update_balance_bias(torch.tensor([1, 5, 3, 3]), rate=0.001)  # mean 3
    # under-loaded expert 0 up, over-loaded expert 1 down, experts at the mean unchanged
    assert torch.equal(router.balance_bias, torch.tensor([0.001, -0.001, 0.0, 0.0]))
    router.update_balance_bias(torch.tensor([1.0, 5.0, 3.0, 3.0]), rate=0.001)
    assert torch.equal(router.balance_bias, torch.tensor([0.001, -0.001, 0.0, 0.0]) * 2)
    assert router.balance_bias.dtype == torch.float32


def test_logit_bias_is_clamped_but_score_bias_is_not():
    counts = torch.tensor([0.0, 10.0, 5.0])  # mean 5: expert 0 under, 1 over
    logit_router = _router(n_experts=3, bias_on="logits", clamp=0.0025)
    score_router = _router(n_experts=3, bias_on="scores", clamp=0.0025)
    for _ in range(5):
        logit_router.update_balance_bias(counts, rate=0.001)
        score_router.update_balance_bias(counts, rate=0.001)
    torch.testing.assert_close(logit_router.balance_bias, torch.tensor([0.0025, -0.0025, 0.0]))
    torch.testing.assert_close(score_router.balance_bias, torch.tensor([0.005, -0.005, 0.0]))


@pytest.mark.parametrize("bias_on", ["scores", "logits"])
def test_bias_changes_selection_but_not_weights_or_logits(bias_on):
    torch.manual_seed(0)
    router = TopKRouter(6, 5, 2, bias_on=bias_on, bias_clamp=100.0)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(10, 6)
    before = router(x)
    with torch.no_grad():
        router.balance_bias.copy_(
            torch.tensor([0.0, 0.0, 0.0, 50.0, 0.0])
        )  # forces expert 3 into every top-2
    after = router(x)
    ref_logits = x @ router.weight.detach().T  # unbiased logits, by hand
    ref_probs = ref_logits.softmax(-1)
    torch.testing.assert_close(after.router_logits, ref_logits)
    torch.testing.assert_close(after.router_logits, before.router_logits)
    assert after.router_logits.dtype == torch.float32 and after.topk_ids.dtype == torch.long
    assert (after.topk_ids == 3).any(dim=1).all()
    assert not torch.equal(after.topk_ids, before.topk_ids)
    # the mixing weights are the unbiased probabilities of the experts that were picked
    picked = torch.stack([ref_probs[t, after.topk_ids[t]] for t in range(10)])
    torch.testing.assert_close(after.topk_weights, picked)
    # the rest of each selection is still the best unbiased expert other than 3
    masked = ref_probs.clone()
    masked[:, 3] = -1
    other = after.topk_ids[after.topk_ids != 3].view(10, 1)
    assert torch.equal(other.squeeze(1), masked.argmax(-1))


def test_zero_bias_selects_plain_top_k_in_both_variants():
    torch.manual_seed(0)
    x = torch.randn(20, 6)
    a, b = TopKRouter(6, 8, 3, bias_on="scores"), TopKRouter(6, 8, 3, bias_on="logits")
    with torch.no_grad():
        a.weight.normal_()
        b.weight.copy_(a.weight)
    ra, rb = a(x), b(x)
    ref = torch.topk((x @ a.weight.detach().T).softmax(-1), 3, dim=-1)
    assert torch.equal(ra.topk_ids, ref.indices) and torch.equal(rb.topk_ids, ref.indices)
    torch.testing.assert_close(ra.topk_weights, ref.values)


def test_norm_topk_prob_renormalises_the_unbiased_weights():
    torch.manual_seed(0)
    router = TopKRouter(6, 5, 2, norm_topk_prob=True)
    with torch.no_grad():
        router.weight.normal_()
        router.balance_bias[4] = 10.0
    x = torch.randn(7, 6)
    out = router(x)
    probs = (x @ router.weight.detach().T).softmax(-1)
    w = probs.gather(1, out.topk_ids)
    torch.testing.assert_close(out.topk_weights, w / w.sum(-1, keepdim=True))


def _tiny_model(*extra: str):
    torch.manual_seed(0)
    return moelab.build(moelab.load_config(None, [*TINY, *extra]))


def test_bias_is_saved_in_state_dict_and_used_in_eval_mode():
    model = _tiny_model("moe.lflb=true")
    keys = [k for k in model.state_dict() if k.endswith("balance_bias")]
    assert keys == ["blocks.0.mlp.router.balance_bias", "blocks.1.mlp.router.balance_bias"]
    ids = torch.randint(3, 128, (2, 8))
    model.eval()
    with torch.no_grad():
        plain = model(ids)
        model.moe_layers[1].router.balance_bias[5] = 10.0
        biased = model(ids)
    assert not (plain.routing[1].topk_ids == 5).all()
    assert (biased.routing[1].topk_ids == 5).any(dim=1).all()
    assert torch.equal(biased.routing[0].topk_ids, plain.routing[0].topk_ids)  # layer 0 untouched
    torch.testing.assert_close(biased.routing[1].router_logits, plain.routing[1].router_logits)
    state = model.state_dict()
    assert state["blocks.1.mlp.router.balance_bias"][5] == 10.0


def test_model_update_balance_biases_respects_the_lflb_switch():
    counts = torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 4], [1, 1, 1, 1, 1, 1, 1, 1]])  # (L, E)
    off = _tiny_model("moe.lflb=false")
    off.update_balance_biases(counts)
    for moe in off.moe_layers:
        assert torch.equal(moe.router.balance_bias, torch.zeros(8))
    on = _tiny_model("moe.lflb=true", "moe.lflb_rate=0.5")
    on.update_balance_biases(counts)
    # layer 0: mean 1 -> experts 0 and 7 over (-0.5), the others under (+0.5); layer 1 balanced
    expected0 = torch.tensor([-0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, -0.5])
    assert torch.equal(on.moe_layers[0].router.balance_bias, expected0)
    assert torch.equal(on.moe_layers[1].router.balance_bias, torch.zeros(8))


def test_model_expert_counts_exclude_padding():
    model = _tiny_model()
    ids = torch.randint(3, 128, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert out.expert_counts.shape == (2, 8)
    real = mask.reshape(-1).bool()
    for layer, r in enumerate(out.routing):
        expected = torch.bincount(r.topk_ids[real].reshape(-1), minlength=8).float()
        assert torch.equal(out.expert_counts[layer], expected)
        assert out.expert_counts[layer].sum().item() == real.sum().item() * 2
    with torch.no_grad():
        unmasked = model(ids)
    assert unmasked.expert_counts.sum().item() == 2 * 18 * 2


# ----------------------------------------------------------------------------- weighting in one place


def test_loss_coefficients_apply_the_schedule_and_the_architectures_own_coefficients():
    from pathlib import Path

    from moelab.config import load_config
    from moelab.moe.losses import loss_coefficients, weighted_loss

    arch = Path(__file__).parent / "archs" / "shared_router.py"
    cfg = load_config(
        None,
        [f"model.arch={arch}", "model.router_norm_coef=0.5", "moe.load_balance_coef=0.01"]
        + ["moe.z_loss_coef=0.002", "train.load_balance_decay_steps=100"],
    )
    assert loss_coefficients(cfg) == {
        "ce": 1.0,
        "load_balance": 0.01,
        "router_z": 0.002,
        "router_orthogonality": 0.0,
        "topk_gap": 0.0,
        "expert_output_orthogonality": 0.0,
        "expert_size": 0.0,
        "router_norm": 0.5,
    }
    assert loss_coefficients(cfg, step=25)["load_balance"] == pytest.approx(0.0075)
    assert loss_coefficients(cfg, step=200)["load_balance"] == 0.0
    terms = {"ce": torch.tensor(2.0), "load_balance": torch.tensor(1.5), "router_norm": torch.tensor(4.0)}
    assert weighted_loss(terms, loss_coefficients(cfg, 25)).item() == pytest.approx(2.0 + 0.0075 * 1.5 + 2.0)
    with pytest.raises(KeyError, match="router_offset_coef"):
        weighted_loss({"router_offset": torch.tensor(1.0)}, loss_coefficients(cfg))


def test_model_loss_is_the_weighted_sum_of_its_unweighted_terms():
    from moelab.moe.losses import loss_coefficients, weighted_loss

    model = _tiny_model("moe.load_balance_coef=0.3", "moe.z_loss_coef=0.07")
    x = torch.randint(2, 128, (2, 6))
    out = model(x, labels=x)
    by_hand = out.losses["ce"] + 0.3 * out.losses["load_balance"] + 0.07 * out.losses["router_z"]
    torch.testing.assert_close(out.loss, by_hand)
    torch.testing.assert_close(weighted_loss(out.losses, loss_coefficients(model.config)), out.loss)
