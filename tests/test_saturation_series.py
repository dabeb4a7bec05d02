"""`moelab analyze RUN --saturation`: saturation of every kept checkpoint against the final one."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAIN_MODEL

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.interp.metrics import Trace, saturation
from moelab.interp.saturation_series import saturation_series
from moelab.interp.trace import trace
from moelab.train.checkpoint import list_checkpoints
from moelab.train.trainer import prepare_run, train

MAX_TOKENS = 600


@pytest.fixture(scope="module")
def run_dir(two_domain_data, tmp_path_factory) -> Path:
    """A real 6-step run saving every 2 steps and keeping 3 checkpoints: step 2, 4 and 6."""
    tmp = tmp_path_factory.mktemp("satrun")
    config_file = tmp / "cfg.yaml"
    config_file.write_text("{}\n")
    overrides = [
        *TINY_TRAIN_MODEL,
        f"data.path={two_domain_data / 'tokens'}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.steps=6",
        "train.save_every=2",
        "train.keep_last=3",
    ]
    config, out = prepare_run(config_file, overrides, tmp / "run", False)
    train(config, out, progress=False)
    return out


def test_cli_writes_json_and_plot_that_match_hand_made_traces(run_dir, tmp_path, capsys):
    ckpts = list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000004", "step-0000006"]
    assert main(["analyze", str(run_dir), "--saturation", "--max-tokens", str(MAX_TOKENS)]) == 0
    printed = capsys.readouterr().out
    assert "saturation vs step 6" in printed and "saturation.json" in printed
    result = json.loads((run_dir / "saturation.json").read_text())
    assert (run_dir / "saturation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["steps"] == [2, 4, 6] and result["reference_step"] == 6
    assert result["n_tokens"] == MAX_TOKENS
    assert len(result["top1"]) == len(result["topk"]) == 3
    assert all(len(row) == 2 for row in result["top1"] + result["topk"])  # one value per MoE layer
    assert result["top1"][-1] == [1.0, 1.0] and result["topk"][-1] == [1.0, 1.0]
    assert not list(run_dir.glob(".saturation-*"))  # the temporary traces are gone

    data = result["data"]  # the run's data.path, as the command found it
    by_hand = {
        c.name: Trace.open(trace(c, tmp_path / c.name, data=data, max_tokens=MAX_TOKENS, progress=False))
        for c in (ckpts[0], ckpts[-1])
    }
    expected = saturation(by_hand["step-0000002"], by_hand["step-0000006"])
    np.testing.assert_array_equal(result["top1"][0], expected["top1"])
    np.testing.assert_array_equal(result["topk"][0], expected["topk"])
    assert all(0.0 <= x <= 1.0 for row in result["top1"] + result["topk"] for x in row)

    assert main(["analyze", str(run_dir), "--saturation", "--max-tokens", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_tokens"] == 64


def test_fewer_than_two_checkpoints_is_a_one_line_error(run_dir, tmp_path, capsys):
    single = tmp_path / "single"
    shutil.copytree(run_dir, single, ignore=shutil.ignore_patterns("saturation.*"))
    for ckpt in list_checkpoints(single)[:-1]:
        shutil.rmtree(ckpt)
    with pytest.raises(MoelabError, match="train.keep_last"):
        saturation_series(single)
    assert main(["analyze", str(single), "--saturation"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keep_last" in err
    assert not (single / "saturation.json").exists()


def test_saturation_flags_need_saturation(tmp_path, capsys):
    assert main(["analyze", str(tmp_path), "--max-tokens", "10"]) == 2
    assert "--saturation" in capsys.readouterr().err


def test_report_shows_the_saturation_curve_when_present(run_dir, tmp_path):
    from moelab.interp.report import build_report

    assert main(["analyze", str(run_dir), "--saturation", "--max-tokens", "64"]) == 0
    html = build_report([run_dir], tmp_path / "report.html").read_text()
    assert "Router saturation over checkpoints" in html and "top-1 vs step 6" in html
