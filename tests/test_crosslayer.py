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
from moelab.train.telemetry import model_telemetry

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
    1280: the same mean width, hence the same counts); test-47 (+ window) and test-50 (+ attention)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "research"
    V, D, Z, L, E, k, I = 50304, 768, 16, 14, 48, 4, 640
    update = 2 * D * Z + Z + 1  # a, b, the Z-wide norm and θ (alpha mix)
    layer = 4 * D * D + 2 * D + 2 * D + update + E * Z + E * 3 * D * I + 3 * D * I  # + 1 shared expert
    total = V * (D + Z) + E * Z + L * layer + D + V * D
    expected = {"total": total, "active": total - L * (E - k) * 3 * D * I}
    window = L * 1  # test-47: one φ per block
    attention = L * (4 * Z * Z + Z)  # test-50: q, k, v, o (Z×Z) and the Z-wide norm per block
    extra = {"test-45": 0, "test-49": 0, "test-47": window, "test-50": attention}
    for name, more in extra.items():
        config = moelab.load_config(root / f"{name}.yaml")
        assert config.model.routing_mix == "alpha" and config.model.routing_dim == Z
        with torch.device("meta"):
            counts = moelab.build(config).count_parameters()
        assert counts == {k: v + more for k, v in expected.items()}, name
    test_47 = moelab.load_config(root / "test-47.yaml").model
    assert (test_47.routing_window, test_47.routing_window_gamma_init) == (8, 1.0)
    assert moelab.load_config(root / "test-50.yaml").model.routing_attention_heads == 1
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


# ----------------------------------------------------------------------------- window and attention


def rope_by_hand(x, positions, theta=10000.0):
    """x: (N, d) rotated pairwise (i, i + d/2) by angle position · theta^(-2i/d)."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2).float() / d)  # (d/2,)
    angle = positions[:, None].float() * freq  # (N, d/2)
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def context_by_hand(r, update, ids, valid, positions, eos, W):
    """One sequence's window and attention steps by per-token loops. r: (N, Z) after the update's norm."""
    N = r.shape[0]
    docs = [sum(int(ids[j] == eos) for j in range(t)) for t in range(N)]  # a document starts after eos
    if W:
        gamma = 0.5 + 0.5 * torch.tanh(update.phi.detach())
        means = []
        for t in range(N):
            members = [j for j in range(max(0, t - W + 1), t + 1) if docs[j] == docs[t] and valid[j]]
            means.append(torch.stack([r[j] for j in members]).mean(0) if members else torch.zeros(Z))
        r = (1 - gamma) * r + gamma * torch.stack(means)
    other = None
    if update.attention is not None:
        att = update.attention
        H, dh = att.n_heads, att.head_dim
        q, k, v = (r @ p.weight.T for p in (att.q_proj, att.k_proj, att.v_proj))  # (N, Z)
        heads, others = [], []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            qh, kh = rope_by_hand(q[:, sl], positions), rope_by_hand(k[:, sl], positions)
            rows = []
            for t in range(N):
                keys = [j for j in range(t + 1) if valid[j] or j == t]
                p = torch.softmax(torch.stack([qh[t] @ kh[j] for j in keys]) / dh**0.5, dim=0)
                rows.append(sum(pj * v[j, sl] for pj, j in zip(p, keys)))
                others.append((h, t, 1 - p[keys.index(t)].item()))
            heads.append(torch.stack(rows))
        y = torch.cat(heads, dim=-1) @ att.o_proj.weight.T
        r = rms(r + y) * att.norm.weight
        real = [t for t in range(N) if valid[t]]
        other = sum(o for h, t, o in others if valid[t]) / (H * len(real))
    return r, other


@pytest.mark.parametrize("window,heads", [(3, 0), (0, 2), (3, 2)])
def test_window_and_routing_attention_by_hand(window, heads):
    eos = 5
    model = build(
        "model.routing_mix=alpha",
        f"model.routing_window={window}",
        "model.routing_window_gamma_init=0.7",
        f"model.routing_attention_heads={heads}",
        f"model.eos_token_id={eos}",
    )
    ids = torch.randint(6, 128, (2, 9))
    ids[0, 3] = ids[0, 6] = ids[1, 5] = eos  # three document boundaries
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    seen = []
    handles = [b.mlp_norm.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    out = model(ids, attention_mask=mask, position_ids=positions)
    for h in handles:
        h.remove()
    others = {}  # layer -> [(row's mean attention to others, row's real tokens)]
    for b in range(2):
        r = model.embed.weight[ids[b]][:, 64:]
        real = mask[b].bool()
        for layer, (block, xhat) in enumerate(zip(model.blocks, seen)):
            up, h = block.routing_update, xhat[b]
            u = (h @ up.a.weight.T) * F.silu(h @ up.b.weight.T)
            alpha = 0.5 + 0.5 * torch.tanh(up.theta.detach())
            r = rms((1 - alpha) * r + alpha * u) * up.norm.weight
            r, other = context_by_hand(r, up, ids[b], real, positions[b], eos, window)
            got = out.routing[layer].extra["routing_state"].view(2, 9, Z)[b]
            torch.testing.assert_close(got[real], r[real], atol=1e-5, rtol=1e-5)
            others.setdefault(layer, []).append((other, int(real.sum())))
    for layer, rows in others.items():
        recorded = out.routing[layer].extra.get("routing_attention_other")
        if not heads:
            assert recorded is None
            continue
        by_hand = sum(o * n for o, n in rows) / sum(n for _, n in rows)  # mean over all real queries
        assert abs(float(recorded) - by_hand) < 1e-5
        assert 0.0 < by_hand < 1.0
    telemetry = model_telemetry(model)  # what the trainer logs
    if window:
        expected = 0.5 + 0.5 * np.tanh(0.7)  # γ at init, every block
        np.testing.assert_allclose(telemetry["routing_window_gamma"], [expected] * 2, rtol=1e-6)
    if heads:
        recorded = [float(out.routing[layer].extra["routing_attention_other"]) for layer in others]
        np.testing.assert_allclose(telemetry["routing_attention_other"], recorded, rtol=1e-6)


def test_decoding_with_a_cache_keeps_documents_windows_and_routing_attention():
    """Token-by-token decoding (the cache holds past states, document ids and routing keys/values)
    reproduces the full forward pass, across a document boundary."""
    eos = 5
    model = build("model.routing_window=4", "model.routing_attention_heads=2", f"model.eos_token_id={eos}")
    ids = torch.randint(6, 128, (1, 10))
    ids[0, 4] = eos
    full = model(ids)
    cache = model.new_cache(1, 10)
    states = [[] for _ in full.routing]
    with torch.no_grad():
        for t in range(10):
            out = model(ids[:, t : t + 1], cache=cache)
            torch.testing.assert_close(out.logits[0, 0], full.logits[0, t], atol=1e-5, rtol=1e-5)
            for layer, info in enumerate(out.routing):
                states[layer].append(info.extra["routing_state"][0])
    for layer, info in enumerate(full.routing):
        torch.testing.assert_close(
            torch.stack(states[layer]), info.extra["routing_state"], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.routing_attention_heads=3", "must split into model.routing_attention_heads=3 heads"),
        ("model.routing_attention_heads=8", "heads of even width"),
        ("model.routing_window=-1", "must be >= 0"),
    ],
)
def test_routing_context_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        moelab.load_config(
            None, tiny_model_overrides("model.arch=crosslayer", f"model.routing_dim={Z}", override)
        )
