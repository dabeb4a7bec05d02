"""The matched comparison (`make compare`, moelab/compare.py): its configs really are matched, and its
table's numbers equal hand computations and per-token loops."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_metrics import make_trace

import moelab
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


def test_summary_row_and_markdown_table_by_hand():
    ev = {
        "params": {"active": 3_152_000},
        "loss": 5.5,
        "domain_loss": {"drama": 5.0},
        "max_vio_global": [0.2, 0.4],
    }

    def layer(vocab, cont):
        return {
            "vocab_specialization": {"normalized": vocab},
            "expert_continuity_next": cont,
        }

    data = {
        "n_experts": 8,
        "top_k": 2,
        "layers": [layer(0.1, 0.5), layer(0.3, None)],  # the last layer has no next layer
        "paths": {"norm_entropy": 0.75, "cover_80": 1234},
    }
    ctx = {
        "tis": {"bank": [0.2, None], "bat": [0.4, 0.6]},
        "ics": {"bank": [1.0, 0.5], "bat": [float("nan"), 0.0]},
    }
    row = compare.summarise("olmoe", ev, {"data": data, "domain_lift": {"mean": 1.5}, "contextual": ctx})
    assert row["max_vio"] == pytest.approx(0.3)
    assert row["vocab"] == pytest.approx(0.2) and row["continuity"] == pytest.approx(0.5)
    assert row["tis"] == pytest.approx(0.4) and row["ics"] == pytest.approx(0.5)
    assert row["continuity_random"] == pytest.approx(1 - math.comb(6, 2) / math.comb(8, 2))  # 13/28
    table = compare.markdown_table([row]).splitlines()
    assert table[0].startswith("| run | active params | val loss | drama loss | MaxVio (0) |")
    assert table[2] == (
        "| olmoe | 3,152,000 | 5.500 | 5.000 | 0.300 | 1.50 | 0.200 | 0.400 | 0.500 | 0.500 (0.464) "
        "| 0.750 | 1,234 | – |"
    )


def test_an_unknown_run_name_is_one_line(capsys):
    assert compare.main(["--only", "olmoe,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown comparison run 'nope'" in err
