"""The OLMoE model: output contract, attention paths, causality, padding, init, parameter counts,
checkpoints and the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_overrides

import moelab
from moelab.errors import MoelabError
from moelab.models.olmoe import MoEOutput

TINY = tiny_model_overrides()
PAD = 1  # default pad_token_id


def build(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    return moelab.build(moelab.load_config(None, [*TINY, *extra]))


def same_weights(*extra: str, like: torch.nn.Module):
    model = build(*extra, seed=99)
    model.load_state_dict(like.state_dict())
    return model


def random_ids(B, N, seed=0):
    return torch.randint(3, 128, (B, N), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny():
    return build().eval()


# ----------------------------------------------------------------------------- output contract


def test_output_contract_shapes_and_dtypes():
    model = build("model.n_dense_layers=1", "model.d_dense=48", "model.n_shared_experts=1")
    B, N = 2, 5
    T = B * N
    out = model(random_ids(B, N), labels=random_ids(B, N, seed=1))
    assert isinstance(out, MoEOutput)
    assert out.logits.shape == (B, N, 128)
    assert len(model.blocks) == 3 and len(out.routing) == 2  # the dense layer routes nothing
    for r in out.routing:
        assert isinstance(r, moelab.RoutingInfo)
        assert r.router_logits.shape == (T, 8) and r.router_logits.dtype == torch.float32
        assert r.topk_ids.shape == (T, 2) and r.topk_ids.dtype == torch.long
        assert r.topk_weights.shape == (T, 2) and r.topk_weights.dtype == torch.float32
        assert ((r.topk_ids >= 0) & (r.topk_ids < 8)).all()
        assert isinstance(r.extra, dict)
    assert out.expert_counts.shape == (2, 8)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.losses) == {"ce", "load_balance", "router_z"}
    assert all(v.ndim == 0 for v in out.losses.values())
    # A fresh model predicts roughly uniformly: CE near ln V.
    assert abs(out.losses["ce"].item() - math.log(128)) < 0.5


def test_dispatch_paths_give_the_same_outputs():
    ref_model = build("moe.dispatch=loop").eval()
    ids = random_ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask)
        for path in ("sorted", "grouped"):
            out = same_weights(f"moe.dispatch={path}", like=ref_model).eval()(ids, attention_mask=mask)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
            for r, r0 in zip(out.routing, ref.routing, strict=True):
                assert r.router_logits.shape == r0.router_logits.shape
                assert torch.equal(r.topk_ids, r0.topk_ids)
                torch.testing.assert_close(r.topk_weights, r0.topk_weights)
            assert torch.equal(out.expert_counts, ref.expert_counts)


# ----------------------------------------------------------------------------- attention


def test_sdpa_and_eager_attention_agree_with_and_without_padding():
    sdpa = build("model.attention=sdpa").eval()
    eager = same_weights("model.attention=eager", like=sdpa).eval()
    ids = random_ids(3, 9)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    with torch.no_grad():
        for m in (None, mask):
            a, b = sdpa(ids, attention_mask=m), eager(ids, attention_mask=m)
            torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(a.logits).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_causality(attention):
    model = build(f"model.attention={attention}").eval()
    ids = random_ids(2, 10)
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 17) % 125 + 3
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().amax(dim=(0, 2)).min() > 1e-4  # later positions do see it


def test_right_padded_batch_matches_unpadded_sequences(tiny):
    short, full = random_ids(1, 5, seed=3), random_ids(1, 8, seed=4)
    batch = torch.cat([torch.cat([short, torch.full((1, 3), PAD)], dim=1), full])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    with torch.no_grad():
        out = tiny(batch, attention_mask=mask)
        alone_short, alone_full = tiny(short), tiny(full)
    torch.testing.assert_close(out.logits[0, :5], alone_short.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1], alone_full.logits[0], atol=1e-5, rtol=1e-5)
    # Routing of the real tokens is unchanged, so are the padding-free balancing losses.
    real = mask.reshape(-1).bool()
    for r, rs, rf in zip(out.routing, alone_short.routing, alone_full.routing, strict=True):
        torch.testing.assert_close(r.router_logits[real], torch.cat([rs.router_logits, rf.router_logits]))


def test_left_padding_needs_position_ids_and_then_matches(tiny):
    # The model numbers positions 0..N-1 whatever the mask says, so a left-padded sequence matches
    # the unpadded one when its positions are given explicitly (and the padded keys are masked).
    seq = random_ids(1, 6, seed=5)
    n_pad = 3
    padded = torch.cat([torch.full((1, n_pad), PAD), seq], dim=1)
    mask = torch.tensor([[0] * n_pad + [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = tiny(seq).logits[0]
        got = tiny(padded, attention_mask=mask, position_ids=positions).logits[0, n_pad:]
        unmasked = tiny(padded, position_ids=positions).logits[0, n_pad:]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-3  # without the mask the padding is attended to


def test_padding_is_excluded_from_losses_and_counts(tiny):
    short, full = random_ids(1, 5, seed=3), random_ids(1, 8, seed=4)
    batch = torch.cat([torch.cat([short, torch.full((1, 3), PAD)], dim=1), full])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    labels = batch.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        out = tiny(batch, attention_mask=mask, labels=labels)
        rs, rf = tiny(short).routing, tiny(full).routing
    real_logits = [torch.cat([a.router_logits, b.router_logits]) for a, b in zip(rs, rf, strict=True)]
    expected_lb = moelab.moe.losses.load_balance_loss(real_logits, 2, kind="per_layer")
    expected_z = moelab.moe.losses.router_z_loss(real_logits)
    torch.testing.assert_close(out.losses["load_balance"], expected_lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.losses["router_z"], expected_z, atol=1e-5, rtol=1e-5)
    assert out.expert_counts.sum().item() == 2 * 13 * 2  # 2 layers × 13 real tokens × k


# ----------------------------------------------------------------------------- init


def test_padding_embedding_row_is_zero_and_norms_are_one():
    model = build("model.pad_token_id=5")
    assert torch.equal(model.embed.weight[5], torch.zeros(64))
    assert model.embed.weight[4].abs().sum() > 0
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    assert torch.equal(model.moe_layers[0].router.balance_bias, torch.zeros(8))
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()  # untied


def test_init_std_normal_and_truncated():
    std = 0.05
    normal = build(f"model.init_std={std}", "model.init=normal")
    trunc = build(f"model.init_std={std}", "model.init=truncated_normal")
    for model, expected_std in ((normal, std), (trunc, std * 0.98658)):  # std of N(0,1) cut at ±3: 0.98658
        for name in ("blocks.0.mlp.experts.gate_up", "lm_head.weight", "blocks.1.attn.q_proj.weight"):
            w = dict(model.named_parameters())[name].detach()
            assert abs(w.mean().item()) < 0.1 * std, name
            assert w.std().item() == pytest.approx(expected_std, rel=0.04), name
    w_trunc = trunc.blocks[0].mlp.experts.gate_up.detach()  # 8·64·64 = 32,768 values
    assert w_trunc.abs().max().item() <= 3 * std
    w_normal = normal.blocks[0].mlp.experts.gate_up.detach()
    assert (w_normal.abs() > 3 * std).sum().item() > 20  # ~88 expected: the plain normal is not cut
    router = trunc.moe_layers[0].router.weight.detach()
    assert router.abs().max().item() <= 3 * std and router.std().item() > 0.5 * std


# ----------------------------------------------------------------------------- parameter counts


def hand_count(V, D, L_moe, L_dense, d_dense, I, E, k, S, qk_norm=True):
    """Parameters of the architecture, from its definition."""
    attn = 4 * D * D + (2 * D if qk_norm else 0)  # q, k, v, o (no bias) + q_norm, k_norm
    block_norms = 2 * D
    moe = E * D + E * 3 * D * I + 3 * D * (S * I)  # router + routed SwiGLU experts + shared
    dense = 3 * D * d_dense
    total = 2 * V * D + D + (L_moe + L_dense) * (attn + block_norms) + L_moe * moe + L_dense * dense
    routed = L_moe * E * 3 * D * I
    return total, total - routed * (E - k) // E


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["model.n_shared_experts=2"],
        ["model.n_dense_layers=2", "model.d_dense=96"],
        ["model.n_dense_layers=1", "model.d_dense=80", "model.n_shared_experts=1", "model.qk_norm=false"],
    ],
)
def test_count_parameters_matches_hand_formula_and_model_runs(extra):
    model = build(*extra)
    m = model.config.model
    total, active = hand_count(
        128, 64, 2, m.n_dense_layers, m.d_dense, 32, 8, 2, m.n_shared_experts, qk_norm=m.qk_norm
    )
    assert model.count_parameters() == {"total": total, "active": active}
    out = model(random_ids(2, 4), labels=random_ids(2, 4, seed=1))
    out.loss.backward()
    assert len(out.routing) == 2
    if m.n_shared_experts:
        shared = model.moe_layers[0].shared
        assert shared.gate_up.shape == (64, 2 * 32 * m.n_shared_experts)
        assert shared.gate_up.grad.abs().sum() > 0
    for b in model.blocks[: m.n_dense_layers]:
        assert b.mlp.gate_up.shape == (64, 2 * m.d_dense) and b.mlp.gate_up.grad.abs().sum() > 0


def test_olmoe_1b_7b_parameter_count_on_meta():
    config = moelab.load_config("configs/olmoe-1b-7b.yaml")
    with torch.device("meta"):
        model = moelab.build(config)
    total, active = hand_count(50304, 2048, 16, 0, 0, 1024, 64, 8, 0)
    assert (total, active) == (6_919_161_856, 1_282_017_280)
    assert model.count_parameters() == {"total": total, "active": active}


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = build("moe.lflb=true", "moe.dispatch=sorted").eval()
    counts = torch.tensor([[9.0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 9]])
    for _ in range(3):
        model.update_balance_biases(counts)
    bias = model.moe_layers[0].router.balance_bias.clone()
    assert bias[0] == pytest.approx(-0.003) and bias[1] == pytest.approx(0.003)
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = model(ids).logits
    path = moelab.save_checkpoint(model, tmp_path / "ckpt")
    assert (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left
    loaded = moelab.load(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded.moe_layers[0].router.balance_bias, bias)
    assert torch.equal(loaded.moe_layers[1].router.balance_bias, model.moe_layers[1].router.balance_bias)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    # saving over an existing checkpoint replaces it
    moelab.save_checkpoint(loaded, path)
    assert torch.equal(moelab.load(path)(ids).logits, ref)


def test_corrupt_or_mismatched_checkpoint_is_refused(tmp_path):
    model = build()
    path = moelab.save_checkpoint(model, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(MoelabError, match="corrupt"):
        moelab.load(path)
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MoelabError, match="corrupt"):
        moelab.load(path)
    weights.write_bytes(good)
    config = path / "config.yaml"
    config.write_text(config.read_text().replace("n_experts: 8", "n_experts: 4"))
    with pytest.raises(MoelabError, match="does not match"):
        moelab.load(path)
    with pytest.raises(MoelabError, match="nothing"):
        moelab.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match="not a checkpoint"):
        moelab.load(tmp_path / "empty")


# ----------------------------------------------------------------------------- loss


def test_loss_is_cross_entropy_plus_weighted_balancing_terms():
    model = build("moe.load_balance_coef=0.5", "moe.z_loss_coef=0.25")
    ids, labels = random_ids(2, 6), random_ids(2, 6, seed=7)
    labels[0, 0] = labels[1, 3] = labels[1, 5] = -100
    out = model(ids, labels=labels)
    # cross-entropy by hand over the 9 labelled positions
    logp = out.logits.detach().double().log_softmax(-1)
    picked = [-logp[b, n, labels[b, n]] for b in range(2) for n in range(6) if labels[b, n] != -100]
    ce = torch.stack(picked).mean()
    assert len(picked) == 9
    # balancing terms by hand from the returned (unbiased) router logits
    lb_layers, z_layers = [], []
    for r in out.routing:
        lg = r.router_logits.detach().double()
        probs = lg.softmax(-1)
        chosen = F.one_hot(probs.topk(2, dim=-1).indices, 8).sum(dim=1).double()  # (T, E) 0/1
        f = chosen.sum(0) / (12 * 2)
        P = probs.mean(0)
        lb_layers.append(8 * (f * P).sum())
        z_layers.append(lg.logsumexp(-1).square().mean())
    lb, z = torch.stack(lb_layers).mean(), torch.stack(z_layers).mean()
    assert out.losses["ce"].item() == pytest.approx(ce.item(), abs=1e-5)
    assert out.losses["load_balance"].item() == pytest.approx(lb.item(), abs=1e-5)
    assert out.losses["router_z"].item() == pytest.approx(z.item(), abs=1e-5)
    assert out.loss.item() == pytest.approx((ce + 0.5 * lb + 0.25 * z).item(), abs=1e-5)


def test_ignored_labels_do_not_affect_the_loss(tiny):
    ids = random_ids(1, 8)
    labels = random_ids(1, 8, seed=2)
    ignored = labels.clone()
    ignored[0, 2:5] = -100
    with torch.no_grad():
        logits = tiny(ids).logits[0].double()
        full = tiny(ids, labels=labels).losses["ce"]
        partial = tiny(ids, labels=ignored).losses["ce"]
    nll = -logits.log_softmax(-1)[torch.arange(8), labels[0]]  # (N,) per-position loss, by hand
    keep = [0, 1, 5, 6, 7]
    assert full.item() == pytest.approx(nll.mean().item(), abs=1e-5)
    assert partial.item() == pytest.approx(nll[keep].mean().item(), abs=1e-5)
    assert abs(partial.item() - full.item()) > 1e-4


def test_load_balance_none_drops_the_term():
    model = build("moe.load_balance=none", "moe.z_loss_coef=0")
    out = model(random_ids(1, 4), labels=random_ids(1, 4, seed=1))
    assert "load_balance" not in out.losses
    assert out.loss.item() == pytest.approx(out.losses["ce"].item(), abs=1e-7)


def test_the_padding_row_gets_no_gradient_as_in_transformers():
    model = build()
    pad = model.config.model.pad_token_id
    x = torch.tensor([[5, pad, 7, pad, 9]])
    model(x, labels=x).loss.backward()
    assert torch.equal(model.embed.weight.grad[pad], torch.zeros(64))
    assert model.embed.weight.grad[5].abs().sum() > 0
