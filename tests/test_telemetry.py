"""Load per expert-width group: widths read from a model, on-device shares, what the trainer logs."""

import json

import numpy as np
import pytest
import torch
from helpers import TINY_TRAIN_MODEL

import moelab
from moelab.train import telemetry
from moelab.train.trainer import prepare_run, train

BASE = TINY_TRAIN_MODEL


def test_expert_widths_are_read_from_the_model():
    mixed = moelab.build(moelab.load_config(None, [*BASE, "model.expert_widths=[0.5,1.0]"]))
    assert telemetry.expert_widths(mixed) == [[16, 16, 32, 32], [16, 16, 32, 32]]
    groups = telemetry.WidthGroups.of(mixed, "cpu")
    assert groups.widths == [16, 32] and groups.experts == [[2, 2], [2, 2]]
    assert groups.index.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    equal = moelab.build(moelab.load_config(None, BASE))
    assert telemetry.expert_widths(equal) is None and telemetry.WidthGroups.of(equal, "cpu") is None


def test_width_group_load_matches_a_loop():
    rng = np.random.default_rng(0)
    widths = [[8, 8, 16, 16, 32, 32], [32, 16, 8, 8, 16, 32], [8] * 6]
    counts = rng.integers(0, 50, size=(3, 6))
    counts[2] = 0  # a layer without assignments: shares 0, not NaN
    distinct = [8, 16, 32]
    index = torch.tensor([[distinct.index(w) for w in row] for row in widths])
    groups = telemetry.WidthGroups(distinct, index, [[row.count(w) for w in distinct] for row in widths])
    got = telemetry.width_group_load(torch.tensor(counts), groups)
    for layer in range(3):
        per = [sum(c for c, w in zip(counts[layer], widths[layer]) if w == g) for g in distinct]
        total = sum(per)
        want = [p / total if total else 0.0 for p in per]
        assert got[layer].tolist() == pytest.approx(want)


def test_trainer_logs_load_per_width_group(tmp_path, two_domain_data):
    """Each logged share equals the logged counts summed by width; the model-level values after it
    (cross-layer α) still land in their own entry."""
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("{}\n")
    extra = [
        "model.arch=crosslayer",
        "model.routing_dim=8",
        "model.routing_mix=alpha",
        "model.expert_widths=[0.5,1.0]",
        f"data.path={two_domain_data / 'tokens'}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.steps=2",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.log_every=1",
        "train.save_every=0",
    ]
    config, run_dir = prepare_run(config_file, BASE + extra, tmp_path / "run", False)
    train(config, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "train"]
    assert len(logged) == 2
    for rec in logged:
        assert rec["width_groups"] == {"widths": [16, 32], "experts": [[2, 2], [2, 2]]}
        for counts, shares in zip(rec["layers"]["counts"], rec["layers"]["width_load"]):
            total = sum(counts)
            assert shares == pytest.approx([sum(counts[:2]) / total, sum(counts[2:]) / total], abs=1e-6)
        alpha = rec["model"]["routing_alpha"]
        assert len(alpha) == 2 and all(0.0 < a < 1.0 for a in alpha)


def test_window_load_stats_match_numpy():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 40, size=(4, 7))
    counts[0, [1, 4]] = 0  # two dead experts
    counts[1] = [5, 0, 0, 0, 9, 0, 2]
    counts[2] = 0  # a layer without assignments: every expert dead, shares 0
    dead, pct = telemetry.window_load_stats(torch.tensor(counts))
    assert dead.tolist() == [float((row == 0).sum()) for row in counts]
    assert dead[1].item() == 4 and dead[2].item() == 7
    for layer, row in enumerate(counts):
        share = row / row.sum() if row.sum() else np.zeros(len(row))
        want = np.percentile(share, telemetry.LOAD_PERCENTILES, method="linear")
        assert pct[layer].tolist() == pytest.approx(want.tolist(), abs=1e-7)
    # by hand: layer 1 sorted shares 0,0,0,0,2/16,5/16,9/16; positions 0, 1.5, 3, 4.5, 6
    assert pct[1].tolist() == pytest.approx([0, 0, 0, (2 / 16 + 5 / 16) / 2, 9 / 16])


def test_trainer_logs_dead_experts_and_load_percentiles_over_the_window(
    tmp_path, two_domain_data, monkeypatch
):
    """Windows of two steps: layer 0 expert 3 never gets a token (dead in both windows); layer 1 expert 1
    gets none only on the logged steps (not dead: the window's first step used it). The logged values
    match numpy over the counts summed across each window."""
    from moelab.models import base

    real, returned = base.routing_counts, []

    def patched(routing, n_experts, valid):
        counts = real(routing, n_experts, valid).clone()
        counts[0, 3] = 0
        if len(returned) % 2 == 1:  # the second (logged) step of each window
            counts[1, 1] = 0
        returned.append(counts.detach().clone().numpy())
        return counts

    monkeypatch.setattr(base, "routing_counts", patched)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("{}\n")
    extra = [
        f"data.path={two_domain_data / 'tokens'}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.log_every=2",
        "train.save_every=0",
    ]
    config, run_dir = prepare_run(config_file, BASE + extra, tmp_path / "run", False)
    train(config, run_dir, progress=False)
    returned = returned[:4]  # one forward per step; the final validation's forwards come after
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in logged] == [2, 4]
    for w, rec in enumerate(logged):
        window = returned[2 * w] + returned[2 * w + 1]  # (L, E)
        layers = rec["layers"]
        assert layers["counts"] == returned[2 * w + 1].tolist()  # counts: the logged step alone
        assert layers["counts"][1][1] == 0 and window[1, 1] > 0
        assert layers["dead_experts"] == [int((row == 0).sum()) for row in window]
        assert layers["dead_experts"][0] >= 1 and window[0, 3] == 0
        for layer, row in enumerate(window):
            want = np.percentile(row / row.sum(), [0, 25, 50, 75, 100], method="linear")
            assert layers["load_pct"][layer] == pytest.approx(want.tolist(), abs=1e-6)
        assert layers["load_pct"][0][0] == 0.0
