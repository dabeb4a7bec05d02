"""User mistakes give one line (`moelab: error: ...`, exit 2) that names the input and a way forward that
works; and the small CLI promises: --version, --no-progress, no bars off a terminal, decoded --prompt-ids,
no blank lines from `tokenizer train`, and `convert to-hf --drop-balance-bias`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_MODEL

import moelab
from moelab.cli import build_parser, main
from moelab.data.loader import TokenDataset
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import MoelabError
from moelab.generate import generate
from moelab.interp.interventions import ablation_report, format_report
from moelab.train.evaluate import ValLoader

SURROGATE = b"\xff".decode("utf-8", "surrogateescape")  # how Python hands a non-UTF-8 argv byte over


def error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moelab: error: "), captured.err
    return lines[0]


def tiny(lflb: bool = False, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model for the two-domain data of conftest.py (vocabulary 320, eos 0, pad 1)."""
    torch.manual_seed(seed)
    config = moelab.load_config(None, [*TINY_TRAIN_MODEL, f"moe.lflb={str(lflb).lower()}", "data.seq_len=16"])
    return moelab.build(config).eval()


@pytest.fixture(scope="module")
def ckpt(two_domain_data, tmp_path_factory) -> Path:
    """A checkpoint saved with the two-domain data's tokenizer."""
    out = tmp_path_factory.mktemp("errors") / "ckpt"
    return moelab.save_checkpoint(tiny(), out, tokenizer=two_domain_data / "tok" / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A transformers OLMoE folder (what `convert to-hf` writes)."""
    from moelab.convert import convert_to_hf

    root = tmp_path_factory.mktemp("hf")
    return convert_to_hf(moelab.save_checkpoint(tiny(), root / "ckpt"), root / "hf")


# ----------------------------------------------------------------------------- 9: non-UTF-8 input


def test_config_with_non_utf8_bytes_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"model:\n  arch: olmoe  # caf\xe9\n")
    assert main(["params", str(bad)]) == 2
    line = error_line(capsys)
    assert str(bad) in line and "UTF-8" in line and "0xe9" in line


def test_saturation_on_a_run_whose_config_is_not_utf8_is_one_line(ckpt, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    from moelab.train.checkpoint import STATE

    for step in (1, 2):
        shutil.copytree(ckpt, run / "checkpoints" / f"step-{step:07d}")
        (run / "checkpoints" / f"step-{step:07d}" / STATE).write_bytes(b"")  # never read here
    (run / "config.yaml").write_bytes(b"data:\n  path: caf\xe9\n")
    assert main(["analyze", str(run), "--saturation"]) == 2
    line = error_line(capsys)
    assert str(run / "config.yaml") in line and "--data" in line


def test_prompt_with_non_utf8_bytes_is_one_line(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", f"to be {SURROGATE}", "--max-new-tokens", "2"]) == 2
    line = error_line(capsys)
    assert "--prompt" in line and "UTF-8" in line and "--prompt-ids" in line


def test_latest_pointer_with_non_utf8_bytes_is_not_read(ckpt, tmp_path, capsys):
    """Every command takes a run's newest complete checkpoint; a damaged pointer changes nothing."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "checkpoints" / "step-0000001")
    (run / "checkpoints" / "latest").write_bytes(b"step-\xff\n")
    (run / "metrics.jsonl").write_text("")
    assert main(["generate", str(run), "--prompt-ids", "3,4", "--max-new-tokens", "1", "--json"]) == 0
    expected = generate(moelab.load(ckpt), [3, 4], 1, eos_token_id=0)
    assert json.loads(capsys.readouterr().out)["ids"] == expected
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert str(run / "checkpoints" / "step-0000001") in page and "tokens are shown as ids" not in page


# ----------------------------------------------------------------------------- 10: empty configs


@pytest.mark.parametrize("text", ["", "\n", "# nothing but a comment\n"])
def test_empty_config_is_refused_not_olmoe_defaults(text, tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert main(["params", str(empty), "--json"]) == 2
    line = error_line(capsys)
    assert str(empty) in line and "empty" in line
    assert main(["train", str(empty), "--out", str(tmp_path / "run")]) == 2
    assert "empty" in error_line(capsys)


def test_non_mapping_config_is_refused_and_explicit_empty_mapping_is_kept(tmp_path, capsys):
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert main(["params", str(listing)]) == 2
    assert "mapping" in error_line(capsys)
    explicit = tmp_path / "defaults.yaml"
    explicit.write_text("{}\n")  # every default, asked for on purpose
    assert main(["params", str(explicit), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 6_919_161_856


# ----------------------------------------------------------------------------- 13: NaN and zero std


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_non_finite_or_negative_temperature(value, ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt-ids", "3,4", "--temperature", value]) == 2
    assert "temperature" in error_line(capsys)
    with pytest.raises(MoelabError, match="temperature"):
        generate(tiny(), [3, 4], 2, temperature=float(value))


def test_ablate_says_the_std_is_zero_instead_of_dividing_by_it(two_domain_data):
    """Identical experts behind a uniform router: removing any of them changes nothing but rounding, so
    the random ablations' std is ~0 and a z-score would be noise over noise."""
    model = tiny()
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.router.weight.zero_()
            for p in moe.experts.parameters():
                p.copy_(p[:1].expand_as(p))
    val = ValLoader(TokenDataset(two_domain_data / "tokens", "val"), 16, 2)
    report = ablation_report(model, val, remove={0: [1], 1: [2]}, n_random=3, max_batches=2)
    assert report["random"]["std_delta"] < 1e-6 and report["random"]["z"] is None
    text = format_report(report)
    assert "std is zero" in text and "standard deviations from" not in text
    # a crafted report whose std is tiny but not exactly 0 reads the same
    report["random"].update(std_delta=3e-9, z=-18.8)
    text = format_report(report)
    assert "std is zero" in text and "-18.8" not in text


# ----------------------------------------------------------------------------- 14: the way forward


def test_analyze_a_run_directory_suggests_a_trace_that_would_be_accepted(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    assert main(["analyze", str(run)]) == 2
    line = error_line(capsys)
    assert f"--out {run}`" not in line and f"--out {run / 'trace'}" in line and "--saturation" in line
    (run / "trace").mkdir()
    (run / "trace" / "meta.json").write_text("{}")  # the run has a trace: that is what to analyze
    assert main(["analyze", str(run)]) == 2
    assert f"its trace is {run / 'trace'}: analyze that" in error_line(capsys)


def test_analyze_a_file_says_it_is_a_file(tmp_path, capsys):
    f = tmp_path / "trace.json"
    f.write_text("{}")
    assert main(["analyze", str(f)]) == 2
    line = error_line(capsys)
    assert "is a file" in line and "does not exist" not in line


def test_report_refuses_data_and_trace_directories(two_domain_data, ckpt, tmp_path, capsys):
    tokens = two_domain_data / "tokens"
    assert main(["report", str(tokens), "--out", str(tmp_path / "r.html")]) == 2
    line = error_line(capsys)
    assert "data directory" in line and "train --out" not in line
    trace = tmp_path / "trace"
    assert main(["trace", str(ckpt), "--data", str(tokens), "--max-tokens", "40", "--out", str(trace)]) == 0
    capsys.readouterr()
    assert main(["report", str(trace)]) == 2
    assert f"--trace {trace}" in error_line(capsys)
    assert not (trace / "report.html").exists() and not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("command", ["eval", "generate", "ablate"])
def test_commands_given_a_transformers_folder_point_to_convert(command, hf_folder, two_domain_data, capsys):
    args = {
        "eval": ["--data", str(two_domain_data / "tokens")],
        "generate": ["--prompt-ids", "3,4"],
        "ablate": ["--data", str(two_domain_data / "tokens"), "--experts", "0:1"],
    }[command]
    assert main([command, str(hf_folder), *args]) == 2
    line = error_line(capsys)
    assert f"moelab convert from-hf {hf_folder}" in line and "config.yaml" not in line


# ----------------------------------------------------------------------------- 15: to-hf and the bias


@pytest.fixture(scope="module")
def biased(two_domain_data, tmp_path_factory) -> Path:
    """A loss-free-balancing checkpoint with a bias large enough to change routing, whose config points
    at the two-domain tokens by absolute path."""
    model = tiny(lflb=True, seed=1)
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.router.balance_bias.copy_(torch.tensor([0.2, -0.2, 0.1, -0.1]))
    model.config.data.path = str(two_domain_data / "tokens")
    out = tmp_path_factory.mktemp("biased") / "ckpt"
    return moelab.save_checkpoint(model, out, tokenizer=two_domain_data / "tok" / "tokenizer.json")


def brute_force_changes(model, ids: torch.Tensor, seq_len: int) -> tuple[int, list[int]]:
    """Tokens whose top-k set differs with and without the bias: one window at a time, set by set."""
    windows = [ids[i : i + seq_len] for i in range(0, ids.numel() - seq_len + 1, seq_len)]
    saved = [moe.router.balance_bias.clone() for moe in model.moe_layers]
    runs = []
    for zero in (False, True):
        with torch.no_grad():
            for moe, b in zip(model.moe_layers, saved):
                moe.router.balance_bias.copy_(torch.zeros_like(b) if zero else b)
            runs.append([model(w[None]).routing for w in windows])
    per_layer = [0] * len(model.moe_layers)
    changed = 0
    for a, b in zip(*runs):
        for t in range(seq_len):
            diff = [set(a[l].topk_ids[t].tolist()) != set(b[l].topk_ids[t].tolist()) for l in range(len(a))]
            changed += any(diff)
            per_layer = [n + d for n, d in zip(per_layer, diff)]
    return changed, per_layer


def test_to_hf_refuses_the_bias_and_names_the_opt_in(biased, tmp_path, capsys):
    assert main(["convert", "to-hf", str(biased), "--out", str(tmp_path / "hf")]) == 2
    line = error_line(capsys)
    assert "balance_bias" in line and "--drop-balance-bias" in line
    assert not (tmp_path / "hf").exists()


def test_to_hf_drop_balance_bias_exports_and_counts_changed_routing(
    biased, two_domain_data, tmp_path, capsys
):
    from safetensors.torch import load_file

    from moelab.convert import balance_bias_effect

    out = tmp_path / "hf"
    assert main(["convert", "to-hf", str(biased), "--out", str(out), "--drop-balance-bias"]) == 0
    printed = capsys.readouterr().out
    hf = load_file(str(out / "model.safetensors"))
    mine = load_file(str(biased / "model.safetensors"))
    assert torch.equal(hf["model.layers.0.mlp.gate.weight"], mine["blocks.0.mlp.router.weight"])
    assert not any("bias" in k for k in hf)

    effect = balance_bias_effect(biased)
    model = moelab.load(biased)
    val = TokenDataset(two_domain_data / "tokens", "val")
    ids = val.view(0, min(4096, val.n_tokens)).long()
    changed, per_layer = brute_force_changes(model, ids, 16)
    assert effect["n_tokens"] == ids.numel() // 16 * 16
    assert (effect["changed"], effect["per_layer"]) == (changed, per_layer) and changed > 0
    assert f"{changed:,} of {effect['n_tokens']:,} sampled tokens" in printed
    assert "validation data" in printed and str(two_domain_data / "tokens") in printed


def test_to_hf_drop_balance_bias_falls_back_to_random_ids_and_says_so(biased, tmp_path, capsys):
    import shutil

    moved = tmp_path / "ckpt"
    shutil.copytree(biased, moved)
    config = moelab.load_config(moved / "config.yaml")
    text = (moved / "config.yaml").read_text().replace(config.data.path, str(tmp_path / "gone"))
    (moved / "config.yaml").write_text(text)
    assert main(["convert", "to-hf", str(moved), "--out", str(tmp_path / "hf"), "--drop-balance-bias"]) == 0
    printed = capsys.readouterr().out
    assert "random token ids" in printed and str(tmp_path / "gone") in printed


# ----------------------------------------------------------------------------- 19: small CLI promises


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moelab {moelab.__version__}"


LONG_COMMANDS = [
    ["train", "c.yaml"],
    ["trace", "run", "--data", "d", "--out", "t"],
    ["lens", "run", "--data", "d"],
    ["analyze", "t"],
    ["ablate", "run", "--data", "d", "--experts", "0:1"],
    ["report", "run"],
    ["data", "corpus", "--out", "c"],
    ["data", "download", "fineweb-edu", "--out", "f", "--samples", "1"],
    ["data", "tokenize", "x.jsonl", "--tokenizer", "tok", "--out", "t"],
    ["tokenizer", "train", "x.jsonl", "--vocab-size", "300", "--out", "tok"],
]


@pytest.mark.parametrize("argv", LONG_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_long_command_takes_no_progress(argv, monkeypatch):
    from moelab.cli import show_progress

    args = build_parser().parse_args([*argv, "--no-progress"])
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    assert args.no_progress and not show_progress(args)
    assert show_progress(build_parser().parse_args(argv))  # a terminal, no flag: bars


def test_no_progress_bar_when_stderr_is_not_a_terminal(ckpt, two_domain_data, tmp_path, capsys):
    tokens = str(two_domain_data / "tokens")
    assert (
        main(["trace", str(ckpt), "--data", tokens, "--max-tokens", "64", "--out", str(tmp_path / "t")]) == 0
    )
    assert (
        main(["lens", str(ckpt), "--data", tokens, "--max-tokens", "64", "--out", str(tmp_path / "l.json")])
        == 0
    )
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err and "tok/s" not in err, err


def test_generate_prompt_ids_decodes_with_the_checkpoints_tokenizer(ckpt, two_domain_data, capsys):
    assert main(["generate", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(two_domain_data / "tok")
    assert out["text"] == tok.decode(out["prompt_ids"] + out["ids"]) and out["prompt_ids"] == [5, 6, 7]
    assert main(["generate", str(ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == out["text"]


def test_tokenizer_train_prints_no_blank_lines(two_domain_data, tmp_path, capfd):
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", str(two_domain_data / "train.jsonl"), "--vocab-size", "300",
                 "--out", str(out)]) == 0  # fmt: skip
    stdout = capfd.readouterr().out
    lines = stdout.splitlines()
    assert lines and all(line.strip() for line in lines), repr(stdout)
    assert lines[-1] == f"wrote {out / 'tokenizer.json'}"


def test_report_and_lens_never_replace_a_file_they_did_not_write(tmp_path, capsys):
    """--out naming somebody's file is refused and the file is untouched; their own files are replaced."""
    from moelab.io import refuse_foreign_file

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for signature, command in (
        ("moelab report", "moelab report"),
        ('"format": "moelab-lens/1"', "moelab lens"),
    ):
        with pytest.raises(MoelabError, match="was not written by"):
            refuse_foreign_file(notes, signature, command)
    assert notes.read_text() == "my notes"
    own = tmp_path / "lens.json"
    own.write_text('{\n "format": "moelab-lens/1",\n "n_tokens": 3\n}')
    refuse_foreign_file(own, '"format": "moelab-lens/1"', "moelab lens")  # its own file: accepted
    refuse_foreign_file(tmp_path / "new.html", "moelab report", "moelab report")  # absent: accepted
    with pytest.raises(MoelabError, match="is a directory"):
        refuse_foreign_file(tmp_path, "moelab report", "moelab report")
