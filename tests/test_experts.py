"""RoutedExperts: mixed widths against a per-token brute force, dispatchers, parameter names and counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.cli import main
from moelab.moe.dispatch import PATHS
from moelab.moe.experts import LocalDispatcher, RoutedExperts, expert_hidden_widths, set_dispatcher

ROOT = Path(__file__).resolve().parents[1]


def brute_force(x, topk_ids, topk_weights, experts: RoutedExperts):
    """out[t] = Σ_slot w · down_e(silu(gate_e x) · up_e x), each expert's own width, one token at a time."""
    per_expert = []  # (gate_up (D, 2I_e), down (I_e, D)) for every expert, in order
    for group in experts.groups():
        per_expert += list(zip(group.gate_up, group.down))
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for s in range(topk_ids.shape[1]):
            gate_up, down = per_expert[int(topk_ids[t, s])]
            width = down.shape[0]
            gate, up = x[t] @ gate_up[:, :width], x[t] @ gate_up[:, width:]
            acc = acc + topk_weights[t, s] * ((gate * torch.sigmoid(gate) * up) @ down)
        rows.append(acc)
    return torch.stack(rows)


def mixed_experts(widths=(0.25, 0.5, 1.0, 2.0), E=8, D=16, I=16, seed=0):
    torch.manual_seed(seed)
    experts = RoutedExperts(E, D, I, widths)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def routing_case(T, E, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices  # distinct experts per token
    return torch.randn(T, 16, generator=g), ids, torch.rand(T, k, generator=g)


def test_hidden_widths_are_int_of_ratio_times_d_expert_in_equal_groups():
    assert expert_hidden_widths(8, 640, [0.3, 0.7, 1.0, 2.0]) == [192, 192, 448, 448, 640, 640, 1280, 1280]
    assert expert_hidden_widths(3, 10, []) == [10, 10, 10]
    with pytest.raises(ValueError, match="equal width groups"):
        expert_hidden_widths(6, 10, [0.5, 1.0, 2.0, 4.0])


def test_parameter_names_keep_the_experts_marker_and_the_equal_width_names():
    equal = moelab.build(moelab.load_config(None, tiny_model_overrides()))
    mixed = moelab.build(moelab.load_config(None, tiny_model_overrides("model.expert_widths=[0.5, 1.0]")))
    equal_names = {n for n, _ in equal.named_parameters() if ".experts." in n}
    assert equal_names == {f"blocks.{i}.mlp.experts.{w}" for i in (0, 1) for w in ("gate_up", "down")}
    shapes = {n: tuple(p.shape) for n, p in mixed.named_parameters() if ".experts." in n}
    assert shapes["blocks.0.mlp.experts.gate_up_0"] == (4, 64, 32)  # 4 experts of width int(0.5·32) = 16
    assert shapes["blocks.0.mlp.experts.down_0"] == (4, 16, 64)
    assert shapes["blocks.0.mlp.experts.gate_up_1"] == (4, 64, 64)
    assert shapes["blocks.0.mlp.experts.down_1"] == (4, 32, 64)
    assert len(shapes) == 8


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("widths", [(0.25, 0.5, 1.0, 2.0), (1.0, 0.5), (0.3, 0.7)])
def test_mixed_widths_match_brute_force_values_and_gradients(kernel, widths):
    experts = mixed_experts(widths)
    x, ids, w = routing_case(12, 8, 3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    upstream = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    grads = {}
    for name, fn in (("ref", lambda: brute_force(x, ids, w, experts)), ("fast", None)):
        experts.zero_grad()
        x.grad = w.grad = None
        set_dispatcher(experts, LocalDispatcher(kernel))
        out = fn() if fn else experts(x, ids, w)
        (out * upstream).sum().backward()
        grads[name] = (
            out.detach(),
            x.grad.clone(),
            w.grad.clone(),
            [p.grad.clone() for p in experts.parameters()],
        )
    (ref, gx, gw, gp), (fast, fx, fw, fp) = grads["ref"], grads["fast"]
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fx, gx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fw, gw, atol=1e-5, rtol=1e-5)
    for a, b in zip(fp, gp, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mixed_widths_grouped_runs_one_grouped_mm_pair_per_width_and_syncs_once(monkeypatch):
    experts = mixed_experts((0.5, 1.0, 2.0, 4.0), E=8, D=16, I=16)  # widths 8, 16, 32, 64: all aligned
    set_dispatcher(experts, LocalDispatcher("grouped"))
    x, ids, w = routing_case(20, 8, 2)
    calls, syncs = [], []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: syncs.append(1) or real_tolist(self))
    out = experts(x, ids, w)
    assert len(calls) == 2 * 4  # gate_up and down per width group
    assert len(syncs) == 1  # the row count of each width group
    torch.testing.assert_close(out, brute_force(x, ids, w, experts), atol=1e-5, rtol=1e-5)


def test_set_dispatcher_swaps_every_layer_and_a_custom_dispatcher_runs():
    model = moelab.build(moelab.load_config(None, tiny_model_overrides("moe.dispatch=loop")))
    assert {repr(m.dispatcher) for m in model.modules() if isinstance(m, RoutedExperts)} == {
        "LocalDispatcher('loop')"
    }
    seen = []

    def recording(experts, x, ids, weights):  # any callable with the dispatcher signature
        seen.append(ids.shape)
        return LocalDispatcher("sorted")(experts, x, ids, weights)

    x = torch.randint(2, 128, (2, 5))
    before = model(x).logits
    assert set_dispatcher(model, recording) == 2
    torch.testing.assert_close(model(x).logits, before, atol=1e-6, rtol=1e-6)
    assert seen == [(10, 2), (10, 2)]
    with pytest.raises(ValueError, match="unknown dispatch kernel"):
        LocalDispatcher("fast")


def hand_active(V, D, L, E, k, widths_hidden, qk_norm=True):
    """Active parameters: embeddings, attention, norms, routers, lm_head, k × mean expert size per layer."""
    attn = 4 * D * D + (2 * D if qk_norm else 0)
    per_layer = attn + 2 * D + E * D + k * sum(3 * D * h for h in widths_hidden) / len(widths_hidden)
    return round(V * D + L * per_layer + D + V * D)


def test_count_parameters_of_mixed_widths_by_hand():
    cfg = moelab.load_config(None, tiny_model_overrides("model.expert_widths=[0.3, 0.7, 1.0, 2.0]"))
    counts = moelab.build(cfg).count_parameters()
    hidden = [int(r * 32) for r in (0.3, 0.7, 1.0, 2.0) for _ in range(2)]  # 9, 22, 32, 64
    routed = sum(3 * 64 * h for h in hidden)
    total_dense = 128 * 64 * 2 + 2 * (4 * 64 * 64 + 2 * 64 + 2 * 64 + 8 * 64) + 64
    assert counts["total"] == total_dense + 2 * routed
    assert counts["active"] == hand_active(128, 64, 2, 8, 2, hidden)


def test_moelab_params_counts_a_mixed_width_config(capsys):
    import yaml

    path = ROOT / "configs" / "tiny-cpu-mixed-widths.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["model"]["expert_widths"] == [0.3, 0.7, 1.0, 2.0]
    assert main(["params", str(path), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    m = config["model"]
    hidden = [int(r * m["d_expert"]) for r in m["expert_widths"] for _ in range(m["n_experts"] // 4)]
    assert counts["active"] == hand_active(
        m["vocab_size"], m["d_model"], m["n_layers"], m["n_experts"], m["top_k"], hidden
    )


# ----------------------------------------------------------------------------- output norm, per-slot outputs


def brute_force_slots(x, topk_ids, experts: RoutedExperts, eps=1e-5):
    """y[t, s]: expert e's own-width output for token t, RMS-normalised by hand (· weight[e] if learned)."""
    per_expert = []
    for group in experts.groups():
        per_expert += list(zip(group.gate_up, group.down))
    weight = experts.output_norm.weight if experts.output_norm is not None else None
    rows = []
    for t in range(x.shape[0]):
        row = []
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            gate_up, down = per_expert[e]
            width = down.shape[0]
            gate, up = x[t] @ gate_up[:, :width], x[t] @ gate_up[:, width:]
            y = (gate * torch.sigmoid(gate) * up) @ down
            if experts.output_norm is not None:
                y = y / torch.sqrt((y * y).mean() + eps)
                y = y * weight[e] if weight is not None else y
            row.append(y)
        rows.append(torch.stack(row))
    return torch.stack(rows)  # (T, k, D)


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize("norm", ["frozen", "learned"])
def test_mixed_widths_with_output_norm_match_brute_force_values_and_gradients(kernel, norm):
    experts = mixed_experts((0.25, 0.5, 1.0, 2.0))
    experts.set_output_norm(norm, 1e-5)
    if norm == "learned":
        with torch.no_grad():
            experts.output_norm.weight.uniform_(0.5, 1.5)
    set_dispatcher(experts, LocalDispatcher(kernel))
    x, ids, w = routing_case(12, 8, 3)
    x.requires_grad_(True)
    w.requires_grad_(True)
    upstream = torch.randn(12, 16, generator=torch.Generator().manual_seed(5))
    results = []
    for fast in (False, True):
        experts.zero_grad()
        x.grad = w.grad = None
        out = experts(x, ids, w) if fast else (w[..., None] * brute_force_slots(x, ids, experts)).sum(1)
        (out * upstream).sum().backward()
        results.append(
            [out.detach(), x.grad.clone(), w.grad.clone()] + [p.grad.clone() for p in experts.parameters()]
        )
    assert len(results[0]) == 3 + 8 + (1 if norm == "learned" else 0)  # 4 width groups × 2, the norm
    assert results[0][0].abs().max() > 0.1
    for a, b in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", PATHS)
def test_routing_info_call_records_per_token_orthogonality_only_when_switched_on(kernel):
    from moelab.moe.losses import expert_output_orthogonality_per_token
    from moelab.moe.routing import RoutingInfo

    experts = mixed_experts((0.5, 1.0))
    set_dispatcher(experts, LocalDispatcher(kernel))
    x, ids, w = routing_case(10, 8, 3)
    ids[::3, 2] = -1
    routing = RoutingInfo(torch.zeros(10, 8), ids, w)
    plain = experts(x, ids, w)
    torch.testing.assert_close(experts(x, routing), plain)  # same output from the RoutingInfo
    assert routing.extra == {}  # off: nothing computed
    experts.output_orthogonality = True
    torch.testing.assert_close(experts(x, routing), plain, atol=1e-6, rtol=1e-6)
    got = routing.extra["expert_output_orthogonality"]  # (T,)
    y = brute_force_slots(x, ids.clamp(min=0), experts)
    torch.testing.assert_close(got, expert_output_orthogonality_per_token(y, ids >= 0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts(x, ids, w), plain)  # the tensor call never records


def test_output_norm_parameters_are_expert_parameters_and_count_as_active_per_slot():
    frozen = moelab.build(moelab.load_config(None, tiny_model_overrides("moe.expert_output_norm=frozen")))
    plain = moelab.build(moelab.load_config(None, tiny_model_overrides()))
    assert frozen.count_parameters() == plain.count_parameters()  # frozen: no parameter
    cfg = moelab.load_config(
        None,
        tiny_model_overrides("model.expert_widths=[0.3, 0.7, 1.0, 2.0]", "moe.expert_output_norm=learned"),
    )
    model = moelab.build(cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "output_norm" in n}
    assert shapes == {f"blocks.{i}.mlp.experts.output_norm.weight": (8, 64) for i in (0, 1)}
    assert all(torch.equal(model.get_parameter(n), torch.ones(8, 64)) for n in shapes)  # starts at 1
    model.reset_parameters()
    assert all(torch.equal(model.get_parameter(n), torch.ones(8, 64)) for n in shapes)  # and re-inits to 1
    counts = model.count_parameters()
    hidden = [int(r * 32) for r in (0.3, 0.7, 1.0, 2.0) for _ in range(2)]
    routed = sum(3 * 64 * h for h in hidden) + 8 * 64  # + the (E, D) norm weight
    total_dense = 128 * 64 * 2 + 2 * (4 * 64 * 64 + 2 * 64 + 2 * 64 + 8 * 64) + 64
    assert counts["total"] == total_dense + 2 * routed
    # a token uses the norm rows of its top_k = 2 experts: 2 · 64 more per layer than without the norm
    assert counts["active"] == hand_active(128, 64, 2, 8, 2, hidden) + 2 * 2 * 64
    with torch.device("meta"):  # built without memory (as checkpoints load): the norm is on meta too
        meta = moelab.build(cfg)
    assert meta.blocks[0].mlp.experts.output_norm.weight.is_meta
    assert meta.count_parameters() == counts
