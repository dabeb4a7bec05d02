"""Dispatch paths: loop, sorted and grouped against a per-token brute-force SwiGLU, values and gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model_overrides

import moelab
from moelab.moe import dispatch
from moelab.moe.dispatch import run_experts

PATHS = ("loop", "sorted", "grouped")


def dense_reference(x, topk_ids, topk_weights, gate_up, down):
    """Per token, per slot: out[t] += w · down(silu(gate x) * (up x)), written out with no batching."""
    d_expert = down.shape[1]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            gate = x[t] @ gate_up[e][:, :d_expert]
            up = x[t] @ gate_up[e][:, d_expert:]
            hidden = gate * torch.sigmoid(gate) * up
            acc = acc + topk_weights[t, s] * (hidden @ down[e])
        rows.append(acc)
    return torch.stack(rows)


def make_case(T, D, I, E, k, seed=0, unused=()):
    """Random inputs; `unused` experts receive no token. Every (token, slot) id is distinct per token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in unused])
    scores = torch.rand(T, len(allowed), generator=g)
    topk_ids = allowed[scores.topk(k, dim=-1).indices]  # (T, k) distinct experts per token
    return dict(
        x=torch.randn(T, D, generator=g),
        topk_ids=topk_ids,
        topk_weights=torch.rand(T, k, generator=g),
        gate_up=torch.randn(E, D, 2 * I, generator=g) / D**0.5,
        down=torch.randn(E, I, D, generator=g) / I**0.5,
    )


def forward_backward(case, path, fn=None):
    """Output and gradients wrt x, gate_up, down and topk_weights, for a fixed random upstream gradient."""
    leaves = {n: case[n].clone().requires_grad_(True) for n in ("x", "topk_weights", "gate_up", "down")}
    args = (leaves["x"], case["topk_ids"], leaves["topk_weights"], leaves["gate_up"], leaves["down"])
    out = fn(*args) if fn is not None else run_experts(*args, path=path)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    (out * upstream).sum().backward()
    return out.detach(), {n: t.grad for n, t in leaves.items()}


CASES = {
    # name: (T, D, I, E, k, unused experts)
    "top2": (11, 16, 8, 6, 2, ()),
    "zero_token_experts": (9, 16, 8, 6, 2, (0, 3, 5)),
    "top1": (13, 16, 4, 5, 1, (2,)),
    "top_k_equals_E": (7, 8, 8, 4, 4, ()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_paths_match_brute_force_values_and_gradients(name):
    T, D, I, E, k, unused = CASES[name]
    case = make_case(T, D, I, E, k, unused=unused)
    ref_out, ref_grads = forward_backward(case, None, fn=dense_reference)
    assert ref_out.abs().max() > 0.1  # a non-trivial case
    for path in PATHS:
        out, grads = forward_backward(case, path)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=f"{path} output")
        for n, g in grads.items():
            assert g is not None, f"{path}: no gradient for {n}"
            torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-5, msg=f"{path} grad {n}")
        # Experts that got no token get an exactly zero weight gradient.
        for e in unused:
            assert torch.equal(grads["gate_up"][e], torch.zeros_like(grads["gate_up"][e]))
            assert torch.equal(grads["down"][e], torch.zeros_like(grads["down"][e]))
        # The mixing weights are differentiable (this is how the router learns).
        assert grads["topk_weights"].abs().max() > 0


def test_grouped_really_runs_grouped_mm_on_aligned_shapes(monkeypatch):
    calls = []
    real = torch.nn.functional.grouped_mm

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    case = make_case(*CASES["top2"][:5])
    run_experts(**case, path="grouped")
    assert len(calls) == 2  # gate_up and down


@pytest.mark.parametrize(
    ("D", "I"),
    [
        (6, 8),  # d_model * 4 bytes = 24
        (16, 6),  # d_expert * 4 bytes = 24 (2 * d_expert = 48 is aligned, d_expert is not)
        (12, 2),  # d_expert * 4 bytes = 8
    ],
)
def test_grouped_falls_back_to_sorted_on_unaligned_strides(D, I):
    case = make_case(10, D, I, 4, 2, seed=3)
    ref_out, ref_grads = forward_backward(case, None, fn=dense_reference)
    out, grads = forward_backward(case, "grouped")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)
    # grouped_mm's kernels need every row stride (D, 2I and I elements) to be a multiple of 16 bytes.
    usable = dispatch.grouped_mm_usable(case["x"], case["gate_up"], case["down"])
    assert not usable, f"grouped_mm reported usable for d_model={D}, d_expert={I} (fp32)"


def test_unknown_path_is_refused():
    case = make_case(4, 16, 8, 4, 2)
    with pytest.raises(ValueError, match="unknown dispatch path"):
        run_experts(**case, path="fast")


def test_grouped_hot_path_has_no_host_sync(monkeypatch):
    case = make_case(*CASES["zero_token_experts"][:5], unused=(0, 3, 5))
    leaves = {n: case[n].clone().requires_grad_(True) for n in ("x", "topk_weights", "gate_up", "down")}

    def sync(*args, **kw):
        raise AssertionError("host sync in the grouped dispatch path")

    monkeypatch.setattr(torch.Tensor, "item", sync)
    monkeypatch.setattr(torch.Tensor, "tolist", sync)
    out = run_experts(
        leaves["x"],
        case["topk_ids"],
        leaves["topk_weights"],
        leaves["gate_up"],
        leaves["down"],
        path="grouped",
    )
    out.square().sum().backward()
    monkeypatch.undo()
    ref = dense_reference(case["x"], case["topk_ids"], case["topk_weights"], case["gate_up"], case["down"])
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=1e-5)


def test_bf16_paths_agree_with_fp32_reference():
    case = make_case(12, 16, 8, 4, 2, seed=5)
    ref = dense_reference(**case)
    for path in PATHS:
        bf = {n: (v.bfloat16() if v.is_floating_point() else v) for n, v in case.items()}
        out = run_experts(**bf, path=path)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2, msg=path)


# only the cross-entropy reaches the router, so its gradient must flow through the experts' mixing
TINY = tiny_model_overrides("moe.load_balance=none", "moe.z_loss_coef=0")


def test_model_router_gradient_is_nonzero_and_equal_across_paths():
    torch.manual_seed(0)
    models = {p: moelab.build(moelab.load_config(None, [*TINY, f"moe.dispatch={p}"])) for p in PATHS}
    state = models["loop"].state_dict()
    for m in models.values():
        m.load_state_dict(state)
    ids = torch.randint(3, 128, (2, 10))
    labels = torch.randint(3, 128, (2, 10))
    grads, losses = {}, {}
    for p, m in models.items():
        out = m(ids, labels=labels)
        assert set(out.losses) == {"ce", "router_z"}
        out.loss.backward()
        losses[p] = out.loss.detach()
        grads[p] = [moe.router.weight.grad.clone() for moe in m.moe_layers]
    for g in grads["loop"]:
        assert g.abs().max() > 1e-6
    for p in ("sorted", "grouped"):
        torch.testing.assert_close(losses[p], losses["loop"], atol=1e-5, rtol=1e-5)
        for g, ref in zip(grads[p], grads["loop"]):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4, msg=p)


def test_autocast_bf16_runs_every_path_in_bf16_and_they_agree():
    """Under autocast (how GPUs train) the experts run in the autocast dtype, grouped_mm included."""
    case = make_case(T=64, D=32, I=16, E=4, k=2, seed=3)
    reference, _ = forward_backward(case, None, fn=dense_reference)
    outputs = {}
    for path in ("loop", "sorted", "grouped"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = forward_backward(case, path)
        assert out.dtype == torch.bfloat16
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        outputs[path] = out.float()
    for path, out in outputs.items():
        torch.testing.assert_close(out, reference, atol=5e-2, rtol=5e-2, msg=path)
    torch.testing.assert_close(outputs["grouped"], outputs["sorted"], atol=2e-2, rtol=2e-2)


def test_model_trains_under_bf16_autocast():
    model = moelab.build(moelab.load_config(None, tiny_model_overrides())).train()
    x = torch.randint(2, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.routing[0].router_logits.dtype == torch.float32  # the contract: fp32 router logits
    assert model.moe_layers[0].experts.gate_up.grad is not None


def test_id_minus_one_means_no_expert_in_every_path():
    """Hierarchical models pad top-k ids with -1: that slot adds nothing, in all three paths."""
    case = make_case(T=32, D=32, I=16, E=4, k=2, seed=5)
    case["topk_ids"][::3, 1] = -1
    kept = case["topk_ids"] >= 0
    dense_case = {
        **case,
        "topk_ids": case["topk_ids"].clamp(min=0),
        "topk_weights": case["topk_weights"] * kept,
    }
    expected, _ = forward_backward(dense_case, None, fn=dense_reference)
    for path in ("loop", "sorted", "grouped"):
        out, grads = forward_backward(case, path)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=path)
        assert (grads["topk_weights"][~kept] == 0).all()


# ----------------------------------------------------------------------------- per-slot outputs, output norm


def slot_reference(x, topk_ids, topk_weights, gate_up, down, norm_weight=None, eps=1e-5, norm=False):
    """Per token, per slot, no batching: y[t, s] = norm_e(expert_e(x[t])) (0 for id -1) and
    out[t] = Σ_s w[t, s] · y[t, s]; norm_e = y / sqrt(mean(y²) + eps) (· norm_weight[e])."""
    I = down.shape[1]
    outs, slots = [], []
    for t in range(x.shape[0]):
        acc, row = torch.zeros_like(x[t]), []
        for s in range(topk_ids.shape[1]):
            e = int(topk_ids[t, s])
            if e < 0:
                row.append(torch.zeros_like(x[t]))
                continue
            gate, up = x[t] @ gate_up[e][:, :I], x[t] @ gate_up[e][:, I:]
            y = (gate * torch.sigmoid(gate) * up) @ down[e]
            if norm:
                y = y / torch.sqrt((y * y).mean() + eps)
                if norm_weight is not None:
                    y = y * norm_weight[e]
            row.append(y)
            acc = acc + topk_weights[t, s] * y
        outs.append(acc)
        slots.append(torch.stack(row))
    return torch.stack(outs), torch.stack(slots)


def slots_forward_backward(case, fn, norm_weight=None):
    """(out, y) and the gradients of Σ out·u + Σ y·v (random u, v) wrt x, weights, experts, norm."""
    names = ("x", "topk_weights", "gate_up", "down")
    leaves = {n: case[n].clone().requires_grad_(True) for n in names}
    if norm_weight is not None:
        leaves["norm"] = torch.nn.Parameter(norm_weight.clone())  # a leaf a norm module can hold
    out, y = fn(leaves)
    g = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=g)).sum().add(
        (y * torch.randn(y.shape, generator=g)).sum()
    ).backward()
    return out.detach(), y.detach(), {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("norm", ["none", "frozen", "learned"])
@pytest.mark.parametrize("name", ["top2", "zero_token_experts", "top_k_equals_E"])
def test_per_slot_outputs_and_output_norm_match_a_per_token_loop(name, norm):
    from moelab.moe.experts import ExpertOutputNorm

    T, D, I, E, k, unused = CASES[name]
    case = make_case(T, D, I, E, k, seed=4, unused=unused)
    case["topk_ids"][1::4, -1] = -1  # some slots have no expert
    weight = 1 + 0.5 * torch.randn(E, D, generator=torch.Generator().manual_seed(9))
    norm_weight = weight if norm == "learned" else None

    def reference(v):
        args = (v["x"], case["topk_ids"], v["topk_weights"], v["gate_up"], v["down"])
        return slot_reference(*args, norm_weight=v.get("norm"), eps=1e-5, norm=norm != "none")

    ref_out, ref_y, ref_grads = slots_forward_backward(case, reference, norm_weight)
    assert ref_y.abs().max() > 0.1
    assert torch.equal(ref_y[1::4, -1], torch.zeros_like(ref_y[1::4, -1]))
    module = None if norm == "none" else ExpertOutputNorm(E, D, 1e-5, learned=norm == "learned")
    for path in PATHS:

        def kernel(v, path=path):
            if norm == "learned":
                module.weight = v["norm"]  # this call's leaf, so its gradient is compared
            args = (v["x"], case["topk_ids"], v["topk_weights"], v["gate_up"], v["down"])
            return run_experts(*args, path=path, norm=module, per_slot=True)

        out, y, grads = slots_forward_backward(case, kernel, norm_weight)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5, msg=f"{path} output")
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5, msg=f"{path} per-slot")
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=f"{path} grad {n}")
        # without per_slot the kernel returns only the mixed output, the same
        with torch.no_grad():
            torch.testing.assert_close(run_experts(**case, path=path, norm=module), out, atol=1e-5, rtol=1e-5)


def test_grouped_per_slot_and_norm_add_no_host_sync(monkeypatch):
    from moelab.moe.experts import ExpertOutputNorm

    case = make_case(*CASES["zero_token_experts"][:5], unused=(0, 3, 5))
    norm = ExpertOutputNorm(6, 16, 1e-5, learned=True)

    def sync(*args, **kw):
        raise AssertionError("host sync in the grouped dispatch path")

    monkeypatch.setattr(torch.Tensor, "item", sync)
    monkeypatch.setattr(torch.Tensor, "tolist", sync)
    out, y = run_experts(**case, path="grouped", norm=norm, per_slot=True)
    (out.sum() + y.square().sum()).backward()
    monkeypatch.undo()
    ref_out, ref_y = slot_reference(**case, norm_weight=norm.weight.detach(), norm=True)
    torch.testing.assert_close(y.detach(), ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.detach(), ref_out, atol=1e-5, rtol=1e-5)


def test_output_norm_under_autocast_runs_in_bf16_in_every_path():
    from moelab.moe.experts import ExpertOutputNorm

    case = make_case(T=32, D=32, I=16, E=4, k=2, seed=2)
    norm = ExpertOutputNorm(4, 32, 1e-5, learned=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref_out, ref_y = slot_reference(**case, norm_weight=norm.weight.detach(), norm=True)
    for path in PATHS:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, y = run_experts(**case, path=path, norm=norm, per_slot=True)
        assert out.dtype == y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref_y, atol=5e-2, rtol=5e-2, msg=path)
        torch.testing.assert_close(out.float(), ref_out, atol=5e-2, rtol=5e-2, msg=path)
