"""Tree experts (models/hierarchical.py, moe/tree.py) against brute-force enumeration of every path
(tree_reference.py) and hand computations: the exact search, mixing weights, exclusion and forcing,
balancing (loss, z-loss, loss-free biases), widths, parameter counts, config checks, `moelab new`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_model_overrides
from tree_reference import reference_balance, reference_select

import moelab
from moelab.errors import ConfigError
from moelab.moe.tree import TreeRouter, topk_paths, tree_balance_loss, tree_experts, tree_z_loss

ROOT = Path(__file__).resolve().parents[1]
TREE = ("model.arch=hierarchical", "model.tree_branches=2", "model.tree_depth=2", "model.n_experts=6")


def router(b, depth, k, clamp=1.0) -> TreeRouter:
    return TreeRouter(4, b, depth, k, bias_clamp=clamp)


def logits_of(*node_probs) -> torch.Tensor:
    """One token's (1, E) logits whose node softmaxes are the given probabilities."""
    return torch.log(torch.tensor([p for probs in node_probs for p in probs]))[None]


# ----------------------------------------------------------------------------- the search


@pytest.mark.parametrize(
    ("b", "depth", "k"), [(2, 1, 1), (2, 3, 1), (2, 3, 3), (3, 2, 4), (3, 3, 5), (2, 4, 16), (4, 3, 6)]
)
def test_select_equals_brute_force_enumeration(b, depth, k):
    E = tree_experts(b, depth)
    g = torch.Generator().manual_seed(b * 100 + depth * 10 + k)
    logits = torch.randn(40, E, generator=g) * 2  # continuous: no ties
    r = router(b, depth, k)
    ids, weights = r.select(logits)
    want_ids, want_w = reference_select(logits, b, depth, k)
    assert ids.shape == (40, k * depth) and torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_w, atol=1e-5, rtol=1e-5)
    # with a balancing bias (selection only), an excluded expert, and a forced one
    r.balance_bias.copy_(torch.randn(E, generator=g) * 0.5)
    bias = r.balance_bias.tolist()
    for exclude, force in [((), None), ((1, E - 1), None), ((), E - 2), ((0,), min(b + 1, E - 1))]:
        ex = torch.tensor(exclude, dtype=torch.long)
        ids, weights = r.select(logits, exclude=ex, force=force)
        want_ids, want_w = reference_select(logits, b, depth, k, bias, exclude, force)
        assert torch.equal(ids, want_ids), (exclude, force)
        torch.testing.assert_close(weights.double(), want_w, atol=1e-5, rtol=1e-5)


def test_a_deep_tree_matches_brute_force_without_enumerating_paths():
    """3^6 = 729 leaves: the search keeps k prefixes per level, the reference scores all 729 paths."""
    b, depth, k = 3, 6, 4
    logits = torch.randn(6, tree_experts(b, depth), generator=torch.Generator().manual_seed(7))
    paths, scores = topk_paths(logits.view(6, -1, b).log_softmax(-1).view(6, -1), b, depth, k)
    assert paths.shape == (6, k, depth) and (scores[:, :-1] >= scores[:, 1:]).all()
    ids, weights = router(b, depth, k).select(logits)
    want_ids, want_w = reference_select(logits, b, depth, k)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights.double(), want_w, atol=1e-6, rtol=1e-5)


def test_the_best_path_can_start_below_the_best_first_branch():
    """Root (0.6, 0.4); under branch 0 (0.5, 0.5), under branch 1 (0.99, 0.01). A beam that keeps the best
    prefix (0.6) ends at 0.3; the best path is 0.4 · 0.99 = 0.396 through expert 1 then expert 4."""
    ids, weights = router(2, 2, 1).select(logits_of((0.6, 0.4), (0.5, 0.5), (0.99, 0.01)))
    assert ids.tolist() == [[1, 4]]
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.396]]))


def test_weights_sum_over_the_selected_paths_through_an_expert():
    """Root (0.9, 0.1), node 1 (0.7, 0.3): the top-2 paths are 0→2 (0.63) and 0→3 (0.27); expert 0 is on
    both, so its weight is 0.9 + 0.9; the fourth slot is empty."""
    ids, weights = router(2, 2, 2).select(logits_of((0.9, 0.1), (0.7, 0.3), (0.5, 0.5)))
    assert ids.tolist() == [[0, 2, 3, -1]]
    torch.testing.assert_close(weights, torch.tensor([[1.8, 0.63, 0.27, 0.0]]))


def test_exclude_and_force_by_hand():
    r, lg = router(2, 2, 2), logits_of((0.9, 0.1), (0.7, 0.3), (0.2, 0.8))
    # excluding expert 2 leaves 0→3 (0.27), 1→5 (0.08), 1→4 (0.02): the best two
    ids, w = r.select(lg, exclude=torch.tensor([2]))
    assert ids.tolist() == [[0, 3, 1, 5]]
    torch.testing.assert_close(w, torch.tensor([[0.9, 0.27, 0.1, 0.08]]))
    # forcing expert 4 (depth 2): every other depth-2 edge is closed, so the only path is 1→4; slot 0
    ids, w = r.select(lg, force=4)
    assert ids.tolist() == [[4, 1, -1, -1]]
    torch.testing.assert_close(w, torch.tensor([[0.02, 0.1, 0.0, 0.0]]))
    # forcing expert 1 (depth 1): both paths below it, expert 1 first
    ids, w = r.select(lg, force=1)
    assert ids.tolist() == [[1, 5, 4, -1]]
    torch.testing.assert_close(w, torch.tensor([[0.2, 0.08, 0.02, 0.0]]))
    # nothing left: both root edges excluded
    ids, w = r.select(lg, exclude=torch.tensor([0, 1]))
    assert ids.tolist() == [[-1] * 4] and w.abs().sum() == 0


def test_mixing_weights_carry_the_router_gradient():
    r = router(2, 2, 2)
    logits = torch.randn(3, 6, requires_grad=True)
    _, w = r.select(logits)
    w.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- balancing


def test_balance_loss_by_hand():
    """Token A: root (0.8, 0.2), node 1 (0.6, 0.4) → path 0→2. Token B: root (0.3, 0.7), node 2 (0.9, 0.1)
    → path 1→4. Root (both): f = (½, ½), P = (0.55, 0.45) → 1.0; node 1 (A): 2·0.6 = 1.2; node 2 (B):
    2·0.9 = 1.8. Weighted by tokens reaching: (2·1.0 + 1.2 + 1.8) / 4 = 1.25. A padding token changes
    nothing."""
    a = logits_of((0.8, 0.2), (0.6, 0.4), (0.5, 0.5))
    b = logits_of((0.3, 0.7), (0.1, 0.9), (0.9, 0.1))
    pad = logits_of((0.01, 0.99), (0.5, 0.5), (0.01, 0.99))
    logits = torch.cat([a, b, pad])
    valid = torch.tensor([1, 1, 0])
    assert tree_balance_loss([logits], 2, 2, 1, valid).item() == pytest.approx(1.25, rel=1e-6)
    assert tree_balance_loss([logits[:2]], 2, 2, 1, None).item() == pytest.approx(1.25, rel=1e-6)
    assert reference_balance(logits, 2, 2, 1, valid)[0] == pytest.approx(1.25)
    # per-node z-loss: shifting node n's logits by c_n makes its logsumexp c_n
    shifted = logits + torch.tensor([1.0, 1.0, 2.0, 2.0, -3.0, -3.0])
    assert tree_z_loss([shifted], 2, valid).item() == pytest.approx((1 + 4 + 9) / 3, rel=1e-6)


@pytest.mark.parametrize(("b", "depth", "k"), [(2, 3, 2), (3, 2, 3)])
def test_balance_losses_of_the_model_equal_brute_force(b, depth, k):
    E = tree_experts(b, depth)
    model = build(f"model.tree_branches={b}", f"model.tree_depth={depth}", f"model.n_experts={E}",
                  f"model.top_k={k}")  # fmt: skip
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    out = model(ids, attention_mask=mask, labels=ids)
    want = [reference_balance(r.router_logits.detach(), b, depth, k, mask) for r in out.routing]
    lb, z = (sum(w[i] for w in want) / len(want) for i in (0, 1))
    assert out.losses["load_balance"].item() == pytest.approx(lb, rel=1e-5)
    assert out.losses["router_z"].item() == pytest.approx(z, rel=1e-5)
    off = build("moe.load_balance=none", f"model.tree_branches={b}", f"model.tree_depth={depth}",
                f"model.n_experts={E}", f"model.top_k={k}")  # fmt: skip
    out = off(ids, attention_mask=mask, labels=ids)
    assert "load_balance" not in out.losses
    torch.testing.assert_close(out.loss, out.losses["ce"] + 0.001 * out.losses["router_z"])


def test_loss_free_balancing_moves_each_branch_toward_its_siblings():
    r = router(2, 2, 1, clamp=0.025)
    counts = torch.tensor([8.0, 2, 3, 3, 1, 5])  # sibling means 5, 3, 3
    r.update_balance_bias(counts, 0.01)
    assert torch.equal(r.balance_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0, 0.01, -0.01]))
    for _ in range(3):
        r.update_balance_bias(counts, 0.01)
    assert torch.allclose(r.balance_bias, torch.tensor([-0.025, 0.025, 0.0, 0.0, 0.025, -0.025]))  # clamped


def test_the_bias_changes_selection_but_not_weights():
    """One level: probabilities (0.6, 0.4); a bias of 1 on branch 1 makes its biased logit log 0.4 + 1 >
    log 0.6, so branch 1 is chosen, with its unbiased weight 0.4."""
    r = router(2, 1, 1)
    lg = logits_of((0.6, 0.4))
    assert r.select(lg)[0].tolist() == [[0]]
    r.balance_bias.copy_(torch.tensor([0.0, 1.0]))
    ids, w = r.select(lg)
    assert ids.tolist() == [[1]]
    torch.testing.assert_close(w, torch.tensor([[0.4]]))


def test_model_balancing_bias_update_uses_sibling_counts():
    model = build("moe.lflb=true", "moe.lflb_rate=0.5", "moe.lflb_bias_clamp=10")
    counts = torch.tensor([[4.0, 0, 1, 3, 0, 0], [1.0, 1, 2, 2, 7, 1]])  # (L, E)
    model.update_balance_biases(counts)
    want = 0.5 * torch.tensor([[-1.0, 1, 1, -1, 0, 0], [0.0, 0, 0, 0, -1, 1]])
    for r, w in zip(model.routers(), want):
        assert torch.equal(r.balance_bias, w)


# ----------------------------------------------------------------------------- the model


def build(*extra: str, seed: int = 0):
    torch.manual_seed(seed)
    model = moelab.build(moelab.load_config(None, tiny_model_overrides(*TREE, *extra))).eval()
    with torch.no_grad():
        for r in model.routers():
            r.weight.normal_(0.0, 0.3)
    return model


def test_experts_narrow_with_depth_in_one_group_per_depth():
    model = build("model.tree_depth=3", "model.n_experts=14")
    experts = model.moe_layers[0].experts
    assert experts.hidden == [16] * 2 + [8] * 4 + [4] * 8  # 32 // 2^d
    groups = experts.groups()
    assert [(g.first, tuple(g.gate_up.shape), tuple(g.down.shape)) for g in groups] == [
        (0, (2, 64, 32), (2, 16, 64)),
        (2, (4, 64, 16), (4, 8, 64)),
        (6, (8, 64, 8), (8, 4, 64)),
    ]


def test_layer_output_is_the_weighted_sum_of_the_experts_on_the_paths():
    """The MoE output by hand: each selected expert's SwiGLU on x̂, weighted, plus the shared expert."""
    model = build("model.n_shared_experts=1")
    moe = model.moe_layers[0]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    y, info = moe(x[None])
    want = moe.shared(x)
    for t in range(5):
        for e, w in zip(info.topk_ids[t].tolist(), info.topk_weights[t]):
            if e < 0:
                continue
            g = next(g for g in reversed(moe.experts.groups()) if g.first <= e)
            gate_up = x[t] @ g.gate_up[e - g.first]
            gate, up = gate_up.chunk(2)
            want[t] = want[t] + w * (torch.nn.functional.silu(gate) * up) @ g.down[e - g.first]
    torch.testing.assert_close(y[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3])
def test_parameter_counts_by_hand(k):
    """Widths 16 (2 experts) and 8 (4 experts); active: min(k, 2) depth-1 and min(k, 4) depth-2 experts."""
    model = build(f"model.top_k={k}", "model.n_shared_experts=1")
    V, D, L, E = 128, 64, 2, 6
    routed = 3 * D * (2 * 16 + 4 * 8)
    layer = 4 * D * D + 2 * D + 2 * D + E * D + routed + 3 * D * 32  # attention, norms, router, experts
    total = 2 * V * D + L * layer + D
    used = {2: 3 * D * (2 * 16 + 2 * 8), 3: 3 * D * (2 * 16 + 3 * 8)}[k]
    assert model.count_parameters() == {"total": total, "active": total - L * routed + L * used}


def test_research_config_hmoe_counts_by_hand():
    """hmoe: 16 layers, d_model 768, a 3-ary tree of depth 4 (3 + 9 + 27 + 81 = 120 experts of width
    3072 // 3^d = 1024, 341, 113, 37), top-2 paths, 1 shared expert of width 3072, vocabulary 50,304."""
    config = moelab.load_config(ROOT / "configs" / "research" / "hmoe.yaml")
    with torch.device("meta"):
        counts = moelab.build(config).count_parameters()
    V, D, L, E = 50304, 768, 16, 120
    routed = 3 * D * (3 * 1024 + 9 * 341 + 27 * 113 + 81 * 37)  # 3·D·12,189
    layer = 4 * D * D + 2 * D + 2 * D + E * D + routed + 3 * D * 3072
    total = 2 * V * D + L * layer + D
    used = 3 * D * (2 * 1024 + 2 * 341 + 2 * 113 + 2 * 37)  # top-2: two experts at every depth
    expected = {"total": total, "active": total - L * routed + L * used}
    assert counts == expected == {"total": 679_121_664, "active": 341_484_288}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.n_experts=8",), "set model.n_experts=6"),
        (("model.tree_branches=1",), "model.tree_branches=1 must be >= 2"),
        (("model.top_k=5",), "model.top_k=5 paths exceeds the tree's 4 leaves"),
        (("model.d_expert=3",), "deepest experts width 3//2^2 = 0; use d_expert >= 4"),
        (("model.expert_widths=[0.5,1.0]",), "do not apply to hierarchical"),
        (("model.tree_dept=2",), "did you mean model.tree_depth?"),
    ],
)
def test_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        moelab.load_config(None, tiny_model_overrides(*TREE, *overrides))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_hf_concat_balancing_is_refused_at_build():
    with pytest.raises(ConfigError, match="hf_concat is a flat-router convention"):
        build("moe.load_balance=hf_concat")


def test_global_batch_balancing_scope_is_refused_at_build():
    with pytest.raises(ConfigError, match="load_balance_scope=global_batch"):
        build("moe.load_balance_scope=global_batch")


@pytest.mark.parametrize("override", ["moe.topk_gap_coef=0.1", "moe.expert_size_penalty=0.1"])
def test_flat_router_regularisers_are_refused_at_build(override):
    with pytest.raises(ConfigError, match="is a flat-router regulariser"):
        build(override)


def test_moelab_new_from_hierarchical_with_its_default_config(tmp_path, monkeypatch):
    import yaml

    from moelab.cli import main

    monkeypatch.chdir(ROOT)  # the default config is found from the working directory, as on the CLI
    assert main(["new", "tree", "--from", "hierarchical", "--dir", str(tmp_path)]) == 0
    out = tmp_path / "tree"
    saved = yaml.safe_load((out / "config.yaml").read_text())["model"]
    assert saved["arch"] == "model.py" and (saved["tree_branches"], saved["tree_depth"]) == (2, 3)
    assert saved["n_experts"] == 14 == 2 + 4 + 8
    assert (out / "model.py").read_text().startswith('"""Hierarchical MoE')
    model = moelab.build(moelab.load_config(out), base_dir=out)
    assert type(model.config.model).__name__ == "HierarchicalConfig"
    assert model.moe_layers[0].experts.hidden == [128] * 2 + [64] * 4 + [32] * 8
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 8192)
