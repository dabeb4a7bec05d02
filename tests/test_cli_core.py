"""The `moelab` command's core behaviour: `params`, one-line errors with exit code 2, --help examples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moelab.cli import main

ROOT = Path(__file__).resolve().parents[1]
OLMOE_YAML = str(ROOT / "configs" / "olmoe-1b-7b.yaml")


def test_params_json_gives_olmoe_counts(capsys):
    assert main(["params", OLMOE_YAML, "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"total": 6_919_161_856, "active": 1_282_017_280}


def test_params_text_and_overrides(capsys):
    assert main(["params", OLMOE_YAML]) == 0
    out = capsys.readouterr().out
    assert "6,919,161,856" in out and "1,282,017,280" in out
    # --set changes what is counted: top_k=1 leaves 1 of 64 experts active.
    # routed = 16 layers · 64 experts · 3 · 2048 · 1024 = 6,442,450,944; inactive = routed · 63/64
    assert main(["params", OLMOE_YAML, "--set", "model.top_k=1", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts == {"total": 6_919_161_856, "active": 6_919_161_856 - 6_442_450_944 * 63 // 64}


def test_params_accepts_a_directory_holding_config_yaml(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(Path(OLMOE_YAML).read_text())
    assert main(["params", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 6_919_161_856


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("moelab: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.top_k=65"], "model.top_k=65"),
        (["model.n_expert=4"], "did you mean model.n_experts?"),
        (["moe.dispatch=fast"], "moe.dispatch='fast'"),
        (["model.top_k"], "model.top_k"),
    ],
)
def test_bad_set_is_one_error_line_and_exit_2(overrides, needle, capsys):
    args = ["params", OLMOE_YAML, "--json"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    assert needle in _error_line(capsys)


def test_missing_config_file_is_one_error_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["params", str(missing)]) == 2
    assert str(missing) in _error_line(capsys)


def test_params_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        main(["params", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out
    assert "moelab params configs/olmoe-1b-7b.yaml --json" in out
    assert "--set" in out and "--json" in out


def test_top_level_help_lists_params_and_examples(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "params" in out and "examples:" in out


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["params"])  # the config argument is missing
    assert info.value.code == 2
    assert "config" in capsys.readouterr().err


def test_installed_command_exits_2_with_one_line():
    # The real process: exit status 2, one stderr line, nothing on stdout (no traceback, no log noise).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "moelab.cli", "params", OLMOE_YAML, "--set", "model.d_model=100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moelab: error: model.d_model=100")
