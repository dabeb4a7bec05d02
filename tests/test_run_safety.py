"""A run directory belongs to one run and resume continues what was trained (the run lock, against
real concurrent and killed processes, is tested in test_faults.py): the model file a resumed experiment
is built from, the validation a kill skipped, refused changes on resume, one checkpoint rule for every
command, no directory left by failed checks, sequence lengths within the model's positions, and
SIGTERM's resume command printed once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_TRAIN_MODEL

from moelab.checkpoint import resolve_checkpoint
from moelab.cli import main
from moelab.errors import MoelabError
from moelab.train.checkpoint import latest_checkpoint
from moelab.train.trainer import prepare_run, train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="signals and file locks")


@pytest.fixture(scope="module")
def data_dir(two_domain_data) -> Path:
    return two_domain_data / "tokens"


def overrides(data_dir: Path, **train_kw) -> list[str]:
    base = [
        *TINY_TRAIN_MODEL,
        f"data.path={data_dir}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.save_every=0",
    ]
    return base + [f"train.{k}={v}" for k, v in train_kw.items()]


def config_file(tmp: Path) -> Path:
    path = tmp / "cfg.yaml"
    path.write_text("{}\n")
    return path


def run_in_process(tmp: Path, data_dir: Path, out: Path, resume=False, extra=(), **train_kw) -> dict:
    config, run_dir = prepare_run(config_file(tmp), [*overrides(data_dir, **train_kw), *extra], out, resume)
    return train(config, run_dir, resume=resume, progress=False)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_argv(config, out: Path, sets: list[str], *flags: str) -> list[str]:
    argv = [sys.executable, "-m", "moelab.cli", "train", str(config), "--out", str(out), "--no-progress"]
    return argv + [a for o in sets for a in ("--set", o)] + list(flags)


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, n: int = 2, timeout: float = 90) -> None:
    """Until metrics.jsonl holds n lines (the run holds its directory by then)."""
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no training steps in {run_dir}: {proc.communicate()}")


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("moelab: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- 5: the trained model file


def test_resume_builds_the_model_file_its_checkpoint_carries(tmp_path, data_dir, capsys):
    experiments = tmp_path / "experiments"
    assert (
        main(["new", "exp", "--dir", str(experiments), "--config", str(ROOT / "configs/tiny-cpu.yaml")]) == 0
    )
    exp = experiments / "exp"
    original = (exp / "model.py").read_text()
    sets = overrides(
        data_dir, save_every=1, decay_steps=10, log_every=1
    )  # the schedule does not depend on train.steps
    for name, steps in (("straight", 3), ("run", 2)):
        config, run_dir = prepare_run(exp, [*sets, f"train.steps={steps}"], tmp_path / name, False)
        train(config, run_dir, progress=False)
    run_dir = tmp_path / "run"
    # edit the experiment after the run started: the logits double, so any step trained with it differs
    edited = original.replace(
        "self.head_output(input_ids, self.norm(x),", "self.head_output(input_ids, 2.0 * self.norm(x),"
    )
    assert edited != original
    (exp / "model.py").write_text(edited)

    resume = train_argv(run_dir / "config.yaml", run_dir, ["train.steps=3"], "--resume")
    done = subprocess.run(resume, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "differs" in line]
    assert len(notes) == 1 and str(exp / "model.py") in notes[0] and "--take-edited-model" in notes[0]
    loss = {r["step"]: r["loss"] for r in records(run_dir) if r["type"] == "train"}
    straight = {r["step"]: r["loss"] for r in records(tmp_path / "straight") if r["type"] == "train"}
    assert loss == straight  # step 3 trained the original model, exactly as in one go
    assert (latest_checkpoint(run_dir) / "model.py").read_text() == original

    # an explicit choice trains the edited file from here on
    take = train_argv(run_dir / "config.yaml", run_dir, ["train.steps=4"], "--resume", "--take-edited-model")
    done = subprocess.run(take, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (latest_checkpoint(run_dir) / "model.py").read_text() == edited

    # a moved experiments/ changes nothing for the run: resume and params read the checkpoint's copy
    experiments.rename(tmp_path / "moved")
    again = train_argv(run_dir / "config.yaml", run_dir, ["train.steps=5"], "--resume")
    done = subprocess.run(again, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert latest_checkpoint(run_dir).name == "step-0000005"
    capsys.readouterr()
    assert main(["params", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] > 0


# ----------------------------------------------------------------------------- 6, 7: resume


class Killed(BaseException):
    """A process killed at this point (nothing after it runs)."""


def test_resume_runs_the_final_validation_a_kill_skipped(tmp_path, data_dir, monkeypatch):
    import moelab.train.trainer as trainer_mod

    def killed(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(trainer_mod, "evaluate", killed)
        with pytest.raises(Killed):
            run_in_process(tmp_path, data_dir, tmp_path / "r", steps=2)
    run_dir = tmp_path / "r"
    assert latest_checkpoint(run_dir).name == "step-0000002"
    assert not [r for r in records(run_dir) if r["type"] == "val"]
    run_in_process(tmp_path, data_dir, run_dir, resume=True, steps=2)
    vals = [r for r in records(run_dir) if r["type"] == "val"]
    assert [r["step"] for r in vals] == [2] and vals[0]["loss"] > 0
    run_in_process(tmp_path, data_dir, run_dir, resume=True, steps=2)  # done: nothing is added
    assert [r["step"] for r in records(run_dir) if r["type"] == "val"] == [2]


def test_resume_refuses_model_changes_and_fewer_steps_than_trained(tmp_path, data_dir):
    run_dir = tmp_path / "r"
    run_in_process(tmp_path, data_dir, run_dir, steps=2)
    saved, metrics = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(MoelabError, match=r"cannot change the model: model\.top_k is 2 .* asked 1"):
        run_in_process(tmp_path, data_dir, run_dir, resume=True, extra=["model.top_k=1"], steps=3)
    with pytest.raises(MoelabError, match=r"train\.steps=1 is below step 2"):
        run_in_process(tmp_path, data_dir, run_dir, resume=True, steps=1)
    assert (run_dir / "config.yaml").read_text() == saved
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    run_in_process(tmp_path, data_dir, run_dir, resume=True, steps=3)  # the same model values pass
    assert latest_checkpoint(run_dir).name == "step-0000003"


# ----------------------------------------------------------------------------- 8: one checkpoint rule


def test_every_command_takes_the_newest_complete_checkpoint(tmp_path, data_dir, capsys):
    run_dir = tmp_path / "r"
    run_in_process(tmp_path, data_dir, run_dir, steps=3, save_every=1, keep_last=5)
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").unlink()
    shutil.copytree(ckpts / "step-0000003", ckpts / ".step-0000009.tmp-x1")  # a temporary, never a candidate
    shutil.copytree(ckpts / "step-0000003", ckpts / "step-0000008")
    (ckpts / "step-0000008" / "config.yaml").unlink()  # incomplete
    newest = ckpts / "step-0000003"
    assert resolve_checkpoint(run_dir) == newest == latest_checkpoint(run_dir)
    (ckpts / "latest").write_text("step-0000001\n")  # a pointer left behind by a kill is not followed
    assert resolve_checkpoint(run_dir) == newest == latest_checkpoint(run_dir)
    (ckpts / "latest").unlink()
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--data", str(data_dir), "--batches", "1", "--batch-size", "2"]) == 0
    assert "step-0000003" in capsys.readouterr().out
    assert main(["generate", str(run_dir), "--prompt-ids", "5,6", "--max-new-tokens", "2"]) == 0
    assert main(["convert", "to-hf", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()


# ----------------------------------------------------------------------------- 11, 12: checks first


def test_train_that_fails_its_checks_leaves_no_directory(tmp_path, data_dir, capsys):
    out = tmp_path / "new" / "run"
    argv = ["train", str(config_file(tmp_path)), "--out", str(out), "--no-progress"]
    sets = overrides(data_dir, steps=1)
    for bad in ("model.eos_token_id=5", "data.seq_len=64"):  # a data check, a length check
        assert main(argv + [a for o in [*sets, bad] for a in ("--set", o)]) == 2
        one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "new").exists()


def test_sequence_lengths_stay_within_the_model_positions(tmp_path, data_dir, capsys):
    with pytest.raises(MoelabError, match=r"data\.seq_len=64 is longer than model\.max_seq_len=32"):
        run_in_process(tmp_path, data_dir, tmp_path / "long", extra=["data.seq_len=64"], steps=1)
    run_in_process(tmp_path, data_dir, tmp_path / "r", steps=1)
    capsys.readouterr()
    evaluate = ["eval", str(tmp_path / "r"), "--data", str(data_dir), "--batches", "1", "--batch-size", "2"]
    assert main([*evaluate, "--seq-len", "100000"]) == 2
    assert "--seq-len 100000 is longer than the 32 positions" in one_error_line(capsys.readouterr().err)
    assert main([*evaluate, "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 2 * 32

    from moelab.hf import config_from_hf

    hf = {"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
          "max_position_embeddings": 128, "pad_token_id": 1, "eos_token_id": 0}  # fmt: skip
    config = config_from_hf(hf)
    assert config.model.max_seq_len == 128 and config.data.seq_len == 128


# ----------------------------------------------------------------------------- 19: SIGTERM


def test_sigterm_prints_the_resume_command_once(tmp_path, data_dir):
    run_dir = tmp_path / "sig"
    proc = start(train_argv(config_file(tmp_path), run_dir, overrides(data_dir, steps=100000)), tmp_path)
    wait_for_steps(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (out + err).count("--resume") == 1, out + err
    assert f"moelab train {run_dir / 'config.yaml'} --out {run_dir} --resume" in out


@pytest.mark.dist
def test_two_ranks_share_the_lock_and_print_the_resume_command_once(tmp_path, data_dir):
    """torchrun, 2 ranks: only rank 0 locks (the job trains), SIGTERM to rank 1 stops both, and the resume
    command appears once (before: once per rank plus the launcher's line)."""
    run_dir = tmp_path / "two"
    argv = train_argv(config_file(tmp_path), run_dir, overrides(data_dir, steps=100000), "--nproc", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_steps(run_dir, proc, n=3)

    def children(pid: int) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in found.split())

    torchrun = children(proc.pid)
    ranks = children(torchrun[0]) if torchrun else []
    if len(ranks) != 2:
        proc.kill()
    assert len(ranks) == 2, (torchrun, ranks)
    os.kill(ranks[-1], signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert out.count("--resume") == 1, out
