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
