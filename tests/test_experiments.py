"""`moelab new`: an experiment's own model file is what gets built, trained and saved."""

import json

import torch

import moelab
from moelab.cli import main
from moelab.config import load_config
from moelab.models import build


def test_new_experiment_builds_from_its_own_copy_and_checkpoints_carry_it(tmp_path, capsys):
    assert main(["new", "probe", "--from", "olmoe", "--dir", str(tmp_path)]) == 0
    exp = tmp_path / "probe"
    assert (exp / "model.py").is_file() and (exp / "config.yaml").is_file()
    # Edit the copy: scale the final hidden state, hence the (bias-free) logits. The edited file, not the
    # built-in one, must be used.
    src = (exp / "model.py").read_text()
    edited = src.replace(
        "self.head_output(input_ids, self.norm(x),", "self.head_output(input_ids, 2.0 * self.norm(x),"
    )
    assert edited != src
    (exp / "model.py").write_text(edited)

    config = load_config(
        exp,
        [
            "model.vocab_size=64",
            "model.d_model=32",
            "model.n_heads=2",
            "model.n_layers=1",
            "model.d_expert=16",
            "model.n_experts=4",
            "model.top_k=1",
            "model.max_seq_len=16",
        ],
    )
    torch.manual_seed(0)
    model = build(config, base_dir=exp).eval()
    base = moelab.build(load_config(config, ["model.arch=olmoe"])).eval()
    base.load_state_dict(model.state_dict())
    x = torch.randint(2, 64, (1, 8))
    torch.testing.assert_close(model(x).logits, 2.0 * base(x).logits)

    ckpt = moelab.save_checkpoint(model, tmp_path / "ckpt", config)
    assert (ckpt / "model.py").read_text() == edited
    torch.testing.assert_close(moelab.load(ckpt)(x).logits, model(x).logits)


def test_new_refuses_existing_dir_and_unknown_base(tmp_path, capsys):
    assert main(["new", "a", "--dir", str(tmp_path)]) == 0
    assert main(["new", "a", "--dir", str(tmp_path)]) == 2
    assert main(["new", "b", "--from", "nope", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("moelab: error:") for line in err)


def test_new_with_a_missing_config_is_an_error_and_params_reads_experiment_dirs(tmp_path, capsys):
    assert main(["new", "x", "--config", str(tmp_path / "missing.yaml"), "--dir", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["new", "y", "--dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["params", str(tmp_path / "y"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0
