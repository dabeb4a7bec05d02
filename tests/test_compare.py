"""The matched comparison (`make compare`, moelab/compare.py): its configs really are matched, and its
table's numbers equal hand computations and per-token loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import make_trace

import moelab
import moelab.interp.trace_file
from moelab import compare

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    return moelab.load_config(ROOT / "configs" / "compare" / f"{name}.yaml")


def test_every_config_trains_the_same_tokens_of_the_same_data_at_matched_active_parameters():
    base = load("olmoe")
    with torch.device("meta"):
        base_active = moelab.build(base).count_parameters()["active"]
    archs = set()
    for name in compare.NAMES:
        config = load(name)
        archs.add(config.model.arch)
        assert config.data == base.data, name
        t, b = config.train, base.train
        assert (t.steps, t.batch_size, t.grad_accum, t.lr, t.seed) == (
            b.steps,
            b.batch_size,
            b.grad_accum,
            b.lr,
            b.seed,
        )
        m = config.model
        assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads) == (128 * 64, 128, 4, 4), name
        with torch.device("meta"):
            active = moelab.build(config).count_parameters()["active"]
        assert abs(active / base_active - 1) <= 0.05, (name, active, base_active)
    assert archs == {"olmoe", "crosslayer", "hierarchical"}
    assert load("mixed-widths").model.expert_widths and load("crosslayer-z8").model.routing_dim == 8
    assert load("crosslayer-z32").model.routing_dim == 32


def test_domain_lift_equals_a_per_token_loop():
    trace = make_trace(contextual=False)
    ids, domains = np.asarray(trace.topk_ids), np.asarray(trace.domains)
    L, T, _ = ids.shape
    E = trace.n_experts
    expected = []
    for layer in range(L):
        sets = [{int(e) for e in ids[layer, t] if e >= 0} for t in range(T)]
        overall = [sum(e in s for s in sets) / T for e in range(E)]
        lifts = []
        for d in sorted({int(d) for d in domains if d >= 0}):
            members = [s for s, dom in zip(sets, domains) if dom == d]
            shares = [sum(e in s for s in members) / len(members) for e in range(E)]
            lifts.append(max(shares[e] / overall[e] for e in range(E) if overall[e] > 0))
        expected.append(sum(lifts) / len(lifts))
    lift = compare.domain_lift(trace)
    np.testing.assert_allclose(lift["per_layer"], expected, rtol=1e-12)
    assert lift["mean"] == pytest.approx(sum(expected) / L)


def analysis(vocab, cont, lift, tis, load=None, tree=None):
    """A minimal analysis.json entry: two layers, one contextual word."""
    layers = [
        {"vocab_specialization": {"normalized": v}, "expert_continuity_next": c, "max_vio": m, "load": load}
        for v, c, m in zip(vocab, cont, (0.1, 0.3))
    ]
    data = {"layers": layers, "paths": {"norm_entropy": 0.75, "cover_80": 1234}}
    if tree:
        data["tree"] = tree
    ctx = {"tis": {"bank": tis}, "ics": {"bank": [1.0, float("nan")]}}
    return {"data": data, "domain_lift": {"mean": lift}, "contextual": ctx}


def test_summary_row_and_markdown_table_by_hand():
    ev = {"params": {"active": 3_152_000}, "loss": 5.5, "domain_loss": {"drama": 5.0}}
    run = analysis([0.1, 0.3], [0.5, None], 1.5, [0.2, None])  # the last layer has no next layer
    run["random"] = analysis([0.0, 0.1], [0.25, None], 1.0, [0.1, 0.3])
    row = compare.summarise("olmoe", ev, run)
    assert row["max_vio"] == pytest.approx(0.2) and row["vocab"] == pytest.approx(0.2)
    assert row["continuity"] == pytest.approx(0.5) and row["tis"] == pytest.approx(0.2)
    assert row["ics"] == pytest.approx(1.0) and row["random"]["tis"] == pytest.approx(0.2)
    table = compare.markdown_table([row]).splitlines()
    assert table[0].startswith("| run | active params | val loss | drama loss | MaxVio | domain lift |")
    assert table[2] == (
        "| olmoe | 3,152,000 | 5.500 | 5.000 | 0.200 | 1.50 (1.00) | 0.200 (0.050) | 0.200 (0.200) "
        "| 1.000 (1.000) | 0.500 (0.250) | 0.750 (0.750) | 1,234 (1,234) | – |"
    )


def test_tree_max_vio_is_taken_within_each_depth():
    # b = 2, depth 2: experts 0, 1 at depth 1 and 2..5 at depth 2
    load = [0.3, 0.2, 0.2, 0.1, 0.1, 0.1]
    paths = [{"top_share": 0.5}, {"top_share": 0.7}]
    tree = {"branches": 2, "depth": 2, "paths_per_token": 2, "paths": paths}
    numbers = compare.routing_numbers(analysis([0, 0], [0, 0], 1.0, [0, 0], load=load, tree=tree))
    depth1, depth2 = 0.3 / 0.25 - 1, 0.2 / 0.125 - 1  # max/mean − 1 within each depth
    assert numbers["max_vio"] == pytest.approx((depth1 + depth2) / 2)  # both layers alike
    assert numbers["tree_top10"] == pytest.approx(0.6)
    assert numbers["tree_top10_uniform"] == 1.0  # C(4, 2) = 6 leaf pairs: 10 paths cover them all
    wide = dict(tree, depth=3, paths=paths)  # C(8, 2) = 28 leaf pairs (load: only its length matters)
    load3 = [0.1] * 14
    assert (
        compare.routing_numbers(analysis([0, 0], [0, 0], 1, [0, 0], load3, wide))["tree_top10_uniform"]
        == 10 / 28
    )


def test_permuted_baseline_keeps_loads_and_sets_and_removes_domain_preference():
    rng = np.random.default_rng(0)
    T, E = 20_000, 6
    domains = rng.integers(0, 2, T)
    ids = np.stack([(domains * 3 + rng.integers(0, 3, T)), rng.integers(0, E, T)], axis=1)  # (T, 2)
    ids[:, 1] = np.where(ids[:, 1] == ids[:, 0], -1, ids[:, 1])
    trace = moelab.interp.trace_file.Trace.from_arrays(
        np.stack([ids, ids[::-1]]), domains=domains.astype(np.int16), domain_names=["a", "b"], n_experts=E
    )
    shuffled = compare.permuted(trace)
    original, dealt = np.asarray(trace.topk_ids), np.asarray(shuffled.topk_ids)
    for layer in range(2):  # the same multiset of expert sets per layer, in another order
        before, after = (sorted(map(tuple, a[layer].tolist())) for a in (original, dealt))
        assert before == after and not np.array_equal(original[layer], dealt[layer])
    assert compare.domain_lift(trace)["per_layer"][0] > 1.4  # experts 0-2 serve domain a only
    np.testing.assert_allclose(compare.domain_lift(shuffled)["per_layer"], [1.0, 1.0], atol=0.05)


def test_an_unknown_run_name_is_one_line(capsys):
    assert compare.main(["--only", "olmoe,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown comparison run 'nope'" in err
