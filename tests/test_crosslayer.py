"""Cross-layer routing (models/crosslayer.py) against hand computations: the routing-state update, the
router on shared + offset weights, the offset penalty, parameter counts and config checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_overrides

import moelab
from moelab.errors import ConfigError

Z = 8


def build(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    config = moelab.load_config(
        None, tiny_model_overrides("model.arch=crosslayer", f"model.routing_dim={Z}", *extra)
    )
    model = moelab.build(config).eval()
    with torch.no_grad():
        for router in model.routers():
            router.weight.normal_(0.0, 0.3)  # non-zero offsets, so shared + offset is tested
        model.shared_gate.weight.normal_(0.0, 0.5)
    return model


def rms(v, eps=1e-5):
    return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)


def normalised_hidden_states(model, ids):
    """x̂ of every block (the post-attention RMSNorm output), captured with hooks."""
    seen = []
    handles = [b.mlp_norm.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    out = model(ids)
    for h in handles:
        h.remove()
    return out, seen


@pytest.mark.parametrize("update", ["gated", "linear"])
@pytest.mark.parametrize("mix", ["sum", "alpha"])
def test_routing_state_and_router_logits_by_hand(update, mix):
    model = build(f"model.routing_update={update}", f"model.routing_mix={mix}")
    thetas = []
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            if block.routing_update.theta is not None:
                block.routing_update.theta.fill_(0.4 * (i + 1) - 0.6)  # α ≠ ½, and different per layer
                thetas.append(block.routing_update.theta.item())
    ids = torch.randint(2, 128, (2, 7))
    out, xhat = normalised_hidden_states(model, ids)
    r = model.embed.weight[ids][..., 64:].reshape(14, Z)  # r₀: the last Z columns of the embedding
    for layer, (block, h) in enumerate(zip(model.blocks, xhat)):
        up = block.routing_update
        h = h.reshape(14, 64)
        u = h @ up.a.weight.T
        if update == "gated":
            gate = h @ up.b.weight.T
            u = u * gate * torch.sigmoid(gate)
        if mix == "sum":
            r = r + u
        else:
            alpha = 0.5 + 0.5 * torch.tanh(torch.tensor(thetas[layer]))
            r = (1 - alpha) * r + alpha * u
        r = rms(r) * up.norm.weight
        info = out.routing[layer]
        torch.testing.assert_close(info.extra["routing_state"], r, atol=1e-5, rtol=1e-5)
        logits = r @ model.shared_gate.weight.T + r @ model.routers()[layer].weight.T
        torch.testing.assert_close(info.router_logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_updates", [True, False])
def test_dense_first_layers_update_the_state_only_when_asked(dense_updates):
    flag = str(dense_updates).lower()
    model = build(
        "model.n_layers=1", "model.n_dense_layers=1", "model.d_dense=48", f"model.routing_dense_layers={flag}"
    )
    assert (model.blocks[0].routing_update is not None) == dense_updates
    ids = torch.randint(2, 128, (1, 5))
    out, xhat = normalised_hidden_states(model, ids)
    r = model.embed.weight[ids][..., 64:].reshape(5, Z)
    for block, h in zip(model.blocks, xhat):
        if block.routing_update is not None:
            up, h = block.routing_update, h.reshape(5, 64)
            gate = h @ up.b.weight.T
            r = rms(r + (h @ up.a.weight.T) * gate * torch.sigmoid(gate)) * up.norm.weight
    assert len(out.routing) == 1  # one MoE layer after the dense one
    torch.testing.assert_close(out.routing[0].extra["routing_state"], r, atol=1e-5, rtol=1e-5)


def test_offsets_start_at_zero_so_every_layer_starts_from_the_shared_router():
    torch.manual_seed(0)
    model = moelab.build(moelab.load_config(None, tiny_model_overrides("model.arch=crosslayer")))
    assert all(torch.equal(r.weight, torch.zeros_like(r.weight)) for r in model.routers())
    ids = torch.randint(2, 128, (1, 6))
    out = model(ids, labels=ids)
    for info in out.routing:
        torch.testing.assert_close(
            info.router_logits, info.extra["routing_state"] @ model.shared_gate.weight.T
        )
    assert out.losses["router_offset"].item() == 0.0


@pytest.mark.parametrize(("penalty", "expected"), [("mean", 2.5 / 16 + 4.0 / 16), ("sum", 2.5 + 4.0)])
def test_offset_penalty_by_hand_and_weighted_by_its_coefficient(penalty, expected):
    model = build(
        f"model.router_offset_penalty={penalty}", "model.router_offset_coef=0.3", "model.n_experts=2"
    )
    model.config.model.n_experts = 2
    with torch.no_grad():
        model.routers()[0].weight.zero_()[0, :2] = torch.tensor([1.0, 1.5])  # squares sum to 3.25
        model.routers()[0].weight[1, 0] = -0.0  # (E, Z) = (2, 8): 16 entries
        model.routers()[0].weight.copy_(
            torch.tensor([[1.0, 1.5] + [0.0] * 6, [0.0] * 8]) * (2.5 / 3.25) ** 0.5
        )
        model.routers()[1].weight.fill_(0.5)  # 16 entries of 0.25: sum 4
    ids = torch.randint(2, 128, (1, 6))
    out = model(ids, labels=ids)
    assert out.losses["router_offset"].item() == pytest.approx(expected, rel=1e-6)
    by_hand = out.losses["ce"] + 0.01 * out.losses["load_balance"] + 0.001 * out.losses["router_z"]
    torch.testing.assert_close(out.loss, by_hand + 0.3 * out.losses["router_offset"])


def test_parameter_count_by_hand():
    model = build("model.n_dense_layers=1", "model.d_dense=48")
    V, D, L, E, k, I = 128, 64, 2, 8, 2, 32
    attn = 4 * D * D + 2 * D
    update = 2 * D * Z + Z  # a, b and the Z-wide norm
    moe_layer = attn + 2 * D + update + E * Z + E * 3 * D * I  # + offset router and experts
    dense_layer = attn + 2 * D + update + 3 * D * 48
    total = V * (D + Z) + E * Z + dense_layer + L * moe_layer + D + V * D
    assert model.count_parameters() == {"total": total, "active": total - L * (E - k) * 3 * D * I}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.routing_dim=0", "model.routing_dim=0 must be > 0"),
        ("model.routing_mix=gamma", "model.routing_mix='gamma' is not allowed; choose one of sum, alpha"),
        ("model.router_offset_coef=-1", "model.router_offset_coef=-1.0 must be a finite number >= 0"),
        ("model.routing_dimm=4", "did you mean model.routing_dim?"),
    ],
)
def test_config_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        moelab.load_config(None, tiny_model_overrides("model.arch=crosslayer", override))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_research_config_test_52_is_test_51_plus_the_routing_state():
    """test-52 = test-51 + embedding columns V·Z, the shared gate E·Z, a gated update (2·D·Z + a Z-wide
    norm) in each of the 19 layers (the dense one too), and per MoE layer an E·Z offset in place of the
    E·D router: all active parameters."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "research"
    counts = {}
    for name in ("test-51", "test-52"):
        config = moelab.load_config(root / f"{name}.yaml")
        with torch.device("meta"):
            counts[name] = moelab.build(config).count_parameters()
    V, D, E, Z, layers, moe_layers = 50304, 768, 64, 32, 19, 18
    extra = V * Z + E * Z + layers * (2 * D * Z + Z) + moe_layers * (E * Z - E * D)
    assert counts["test-52"]["total"] - counts["test-51"]["total"] == extra
    assert counts["test-52"]["active"] - counts["test-51"]["active"] == extra
    # test-51 by hand: embeddings + lm_head 2·V·D, attention 4·D² + 2·D and norms 2·D per layer, the dense
    # SwiGLU 3·D·3840, per MoE layer router E·D + 64 experts 3·D·640 + 2 shared 3·D·1280, final norm D
    per_layer = 4 * D * D + 2 * D + 2 * D
    moe = per_layer + E * D + E * 3 * D * 640 + 3 * D * 1280
    total = 2 * V * D + per_layer + 3 * D * 3840 + moe_layers * moe + D
    active = total - moe_layers * (E - 4) * 3 * D * 640
    assert (
        counts["test-51"]
        == {"total": total, "active": active}
        == {"total": 1_883_662_080, "active": 291_137_280}
    )


def test_moelab_new_from_crosslayer_writes_its_own_fields(tmp_path):
    from pathlib import Path

    import yaml

    from moelab.experiments import new_experiment

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
    out = new_experiment("state", "crosslayer", config, tmp_path)
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved["arch"] == "model.py" and saved["routing_dim"] == 32 and saved["router_offset_coef"] == 0.1
    assert (out / "model.py").read_text().startswith('"""Cross-layer routing')
    assert type(moelab.load_config(out).model).__name__ == "CrossLayerConfig"


def test_research_configs_on_the_test_43_base_count_by_hand():
    """test-45 (alpha mix) and test-49 (alpha + widths 0.3/0.7/1.0/2.0 of d_expert 640 = 192, 448, 640,
    1280: the same mean width, hence the same counts)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "research"
    V, D, Z, L, E, k, I = 50304, 768, 16, 14, 48, 4, 640
    update = 2 * D * Z + Z + 1  # a, b, the Z-wide norm and θ (alpha mix)
    layer = 4 * D * D + 2 * D + 2 * D + update + E * Z + E * 3 * D * I + 3 * D * I  # + 1 shared expert
    total = V * (D + Z) + E * Z + L * layer + D + V * D
    expected = {"total": total, "active": total - L * (E - k) * 3 * D * I}
    for name in ("test-45", "test-49"):
        config = moelab.load_config(root / f"{name}.yaml")
        assert config.model.routing_mix == "alpha" and config.model.routing_dim == Z
        with torch.device("meta"):
            assert moelab.build(config).count_parameters() == expected, name
    assert moelab.load_config(root / "test-49.yaml").moe.load_balance_coef == 0.002


def test_trace_records_effective_router_similarity_and_analyze_reports_it(two_domain_data, tmp_path):
    from moelab.interp import metrics
    from moelab.interp.trace import trace
    from moelab.interp.trace_file import Trace

    tokenizer = two_domain_data / "tok" / "tokenizer.json"
    tokens = two_domain_data / "tokens"
    model = build("model.vocab_size=320", "model.eos_token_id=0", "model.pad_token_id=1")
    moelab.save_checkpoint(model, tmp_path / "cl", tokenizer=tokenizer)
    out = trace(tmp_path / "cl", tmp_path / "t", data=tokens, max_tokens=64, progress=False)
    rows = [model.shared_gate.weight + r.weight for r in model.routers()]  # effective routers, (E, Z)
    by_hand = [
        [sum(F.cosine_similarity(a[e], b[e], dim=0).item() for e in range(8)) / 8 for b in rows] for a in rows
    ]
    recorded = Trace.open(out).meta["router_similarity"]
    np.testing.assert_allclose(recorded, by_hand, atol=1e-6)
    assert 0.2 < recorded[0][1] < 0.999  # offsets make the layers differ, the shared gate keeps them alike
    result = metrics.analyze(Trace.open(out))
    np.testing.assert_allclose(result["router_similarity"], by_hand, atol=1e-6)
    assert "Effective-router similarity" in metrics.summary_table(result)

    plain = moelab.build(
        moelab.load_config(None, tiny_model_overrides("model.vocab_size=320", "model.eos_token_id=0"))
    )
    moelab.save_checkpoint(plain, tmp_path / "olmoe", tokenizer=tokenizer)
    plain_trace = trace(tmp_path / "olmoe", tmp_path / "t2", data=tokens, max_tokens=64, progress=False)
    assert "router_similarity" not in metrics.analyze(Trace.open(plain_trace))
