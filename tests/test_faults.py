"""Faults: SIGKILL during a checkpoint save, a prune, a trace and a tokenize; a full disk; outputs that
convert must not replace; one file mode for every output; two runs started at once in one directory.

Process-level faults run the real command (`python -m moelab.cli ...`) in a subprocess whose
sitecustomize makes it stop at the chosen point and signal the test, which then kills it with SIGKILL.
A full disk is a small tmpfs where one can be mounted (a user and mount namespace, `unshare -Urm`),
and patched writes raising ENOSPC everywhere.
"""

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_run_safety as runs
from helpers import tiny_model_overrides
from test_trainer import tiny_overrides

import moelab
from moelab import io
from moelab.cli import main
from moelab.interp.trace_file import Trace
from moelab.io import atomic_dir, tree_size
from moelab.train.checkpoint import list_checkpoints

# Loaded into the subprocess before the command: FAULT picks where it stops, announcing it in FLAG.
SITECUSTOMIZE = r"""
import os, sys, time


def _stop():
    open(os.environ["MOELAB_TEST_FLAG"], "w").close()
    time.sleep(300)  # until the test kills this process


_fault = os.environ.get("MOELAB_TEST_FAULT")
if _fault == "save":  # after train_state.pt of step 4 is written, before the checkpoint is renamed
    import torch

    _save = torch.save

    def _slow_save(obj, f, *args, **kwargs):
        _save(obj, f, *args, **kwargs)
        if isinstance(obj, dict) and obj.get("step") == 4:
            _stop()

    torch.save = _slow_save
elif _fault == "prune":  # half-way through deleting step-0000002
    import shutil

    _rmtree = shutil.rmtree

    def _slow_rmtree(path, *args, **kwargs):
        if "step-0000002" in os.path.basename(str(path)):
            os.unlink(os.path.join(path, "train_state.pt"))
            _stop()
        return _rmtree(path, *args, **kwargs)

    shutil.rmtree = _slow_rmtree
elif _fault == "trace":  # after the first batch went into the memory-mapped arrays
    from moelab.interp import trace

    _add = trace.TraceWriter.add

    def _slow_add(self, *args, **kwargs):
        n = _add(self, *args, **kwargs)
        _stop()
        return n

    trace.TraceWriter.add = _slow_add
elif _fault == "tokenize":  # after the first chunk of tokens is on disk
    from moelab.data import tokenize

    _write = tokenize._SplitWriter.add

    def _slow_write(self, *args, **kwargs):
        _write(self, *args, **kwargs)
        self.fh.flush()
        _stop()

    tokenize._SplitWriter.add = _slow_write
"""


@pytest.fixture(scope="module")
def data(two_domain_data) -> Path:
    return two_domain_data


def train_argv(config: Path, run_dir: Path, data: Path, *extra: str) -> list[str]:
    argv = ["train", str(config), "--out", str(run_dir), "--no-progress"]
    for o in [*tiny_overrides(data / "tokens", steps=6, save_every=2), *extra]:
        argv += ["--set", o]
    return argv


def empty_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.yaml").write_text("{}\n")
    return directory / "cfg.yaml"


def train_losses(run_dir: Path) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["ce"]) for r in map(json.loads, lines) if r["type"] == "train"]


def resume_argv(run_dir: Path) -> list[str]:
    return ["train", str(run_dir / "config.yaml"), "--out", str(run_dir), "--resume", "--no-progress"]


def temporaries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    """The reference: 6 steps in one go, checkpoints at 2, 4, 6."""
    root = tmp_path_factory.mktemp("straight")
    assert main(train_argv(empty_config(root), root / "run", data)) == 0
    return root / "run"


def kill_at_fault(tmp_path: Path, fault: str, argv: list[str], timeout: float = 120) -> int:
    """Run `moelab ARGV` until it reaches `fault`, SIGKILL it there; returns its pid."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    flag = tmp_path / f"{fault}.reached"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MOELAB_TEST_FAULT": fault,
        "MOELAB_TEST_FLAG": str(flag),
    }
    with open(tmp_path / f"{fault}.stderr", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moelab.cli", *argv], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        deadline = time.monotonic() + timeout
        while not flag.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"{fault} was not reached: {(tmp_path / f'{fault}.stderr').read_text()[-3000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    return proc.pid


# ----------------------------------------------------------------------------- SIGKILL


def test_kill_during_checkpoint_save_then_resume_is_exact_and_cleans_up(tmp_path, data, straight):
    run_dir = tmp_path / "run"
    pid = kill_at_fault(tmp_path, "save", train_argv(empty_config(tmp_path), run_dir, data))
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step-0000004" not in names  # nothing half-written carries the final name
    assert (ckpts / "latest").read_text().strip() == "step-0000002"
    stale = temporaries(ckpts)
    assert len(stale) == 1 and stale[0].startswith(f".step-0000004.tmp-{pid}@"), names
    # an old run killed while pruning (before prunes renamed first) left a step without its state
    half = ckpts / "step-0000001"
    half.mkdir()
    shutil.copy(ckpts / "step-0000002" / "model.safetensors", half)

    assert main(resume_argv(run_dir)) == 0
    assert temporaries(ckpts) == []  # the dead process's temporary is gone
    assert not half.exists()
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step-0000002", "step-0000004", "step-0000006"]
    assert train_losses(run_dir) == train_losses(straight)  # bit-identical to the uninterrupted run


def test_kill_while_pruning_leaves_no_half_deleted_checkpoint(tmp_path, data):
    run_dir = tmp_path / "run"
    argv = train_argv(empty_config(tmp_path), run_dir, data, "train.keep_last=1")
    kill_at_fault(tmp_path, "prune", argv)
    ckpts = run_dir / "checkpoints"
    # step-0000002 was being deleted: it is gone under its name (renamed first), step 4 is complete
    assert not (ckpts / "step-0000002").exists()
    assert (ckpts / "latest").read_text().strip() == "step-0000004"
    assert (ckpts / "step-0000004" / "train_state.pt").is_file()
    assert len(temporaries(ckpts)) == 1
    assert main(resume_argv(run_dir)) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000006"]


def test_kill_during_trace_leaves_no_trace_and_the_next_run_cleans_up(tmp_path, data, straight):
    out = tmp_path / "traces" / "val"
    argv = ["trace", str(straight), "--data", str(data / "tokens"), "--out", str(out), "--batch-size", "1"]
    pid = kill_at_fault(tmp_path, "trace", argv)
    assert not out.exists()
    stale = temporaries(out.parent)
    assert len(stale) == 1 and stale[0].startswith(f".val.tmp-{pid}@")
    assert main(argv) == 0
    assert temporaries(out.parent) == []
    assert Trace.open(out).n_tokens > 0


def test_kill_during_tokenize_leaves_no_output_and_the_next_run_cleans_up(tmp_path, data):
    out = tmp_path / "tokens"
    inputs = [str(data / "train.jsonl"), str(data / "val.jsonl")]
    argv = ["data", "tokenize", *inputs, "--tokenizer", str(data / "tok"), "--out", str(out)]
    kill_at_fault(tmp_path, "tokenize", argv)
    assert not out.exists()
    assert len(temporaries(tmp_path)) == 1
    assert main(argv) == 0
    assert temporaries(tmp_path) == []
    assert json.loads((out / "metadata.json").read_text())["splits"]["train"]["tokens"] > 0


def test_stale_temporaries_are_removed_only_for_dead_processes_of_this_host(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = io._HOST
        gone = tmp_path / f".a.tmp-{dead.pid}@{host}-abcd1234"
        kept = [
            tmp_path / f".b.tmp-{live.pid}@{host}-abcd1234",  # a live writer
            tmp_path / f".c.tmp-{dead.pid}@other-host-abcd1234",  # another machine's writer
            tmp_path / ".d.tmp-abcd1234",  # not named by a process: unknown, left alone
        ]
        for d in [gone, *kept]:
            d.mkdir()
            (d / "part.bin").write_bytes(b"x" * 100)
        # killed between the two renames of a replacement: the previous output comes back
        (tmp_path / f".e.old-{dead.pid}@{host}-abcd1234").mkdir()
        (tmp_path / f".e.old-{dead.pid}@{host}-abcd1234" / "meta.json").write_text("{}")
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        assert not gone.exists()
        assert all(d.is_dir() for d in kept)
        assert (tmp_path / "e" / "meta.json").is_file()
        assert (tmp_path / "out" / "x").is_file()
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------- full disk


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("moelab: error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_full_disk_during_checkpoint_save_is_one_line_and_resume_is_exact(
    tmp_path, data, straight, monkeypatch, capsys
):
    import moelab.checkpoint

    real, calls = moelab.checkpoint.save_file, []

    def save_file(state, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint: part of the file, then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, *args, **kwargs)

    monkeypatch.setattr(moelab.checkpoint, "save_file", save_file)
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(train_argv(empty_config(tmp_path), run_dir, data)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left" in line and str(run_dir / "checkpoints" / "step-0000004") in line
    assert "--resume" in line
    assert temporaries(run_dir / "checkpoints") == []
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-0000002"

    monkeypatch.setattr(moelab.checkpoint, "save_file", real)  # space was freed
    assert main(resume_argv(run_dir)) == 0
    assert train_losses(run_dir) == train_losses(straight)


def test_full_disk_during_tokenize_is_one_line_and_leaves_nothing(tmp_path, data, monkeypatch, capsys):
    from moelab.data import tokenize

    def full(self, tokens, *args):
        tokens.tofile(self.fh)  # some bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenize._SplitWriter, "add", full)
    out = tmp_path / "tokens"
    argv = ["data", "tokenize", str(data / "train.jsonl"), "--tokenizer", str(data / "tok"), "--out"]
    argv.append(str(out))
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "needs about" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_full_disk_anywhere_else_is_one_line(monkeypatch, capsys):
    """A write outside the atomic writers (e.g. an append to metrics.jsonl) ends in the same one line."""

    def load_config(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("moelab.config.load_config", load_config)
    assert main(["params", "configs/tiny-cpu.yaml"]) == 2
    assert "no space left" in one_error_line(capsys.readouterr().err)


def _tmpfs_available(probe_dir: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    cmd = f"mount -t tmpfs -o size=64k tmpfs {probe_dir}"
    return subprocess.run(["unshare", "-Urm", "sh", "-c", cmd], capture_output=True).returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """run(size, script): `script` (sh) in a private mount namespace where MNT is a tmpfs of `size`."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _tmpfs_available(mnt):
        pytest.skip("cannot mount a tmpfs here (needs unprivileged user and mount namespaces)")

    def run(size: str, script: str) -> subprocess.CompletedProcess:
        full = f"set -u; mount -t tmpfs -o size={size} tmpfs {mnt} || exit 99; {script}"
        done = subprocess.run(["unshare", "-Urm", "sh", "-c", full], capture_output=True, text=True)
        assert done.returncode != 99, done.stderr
        return done

    run.mnt = mnt
    return run


def moelab_sh(argv: list[str], name: str, log: Path) -> str:
    """A shell line running `moelab ARGV` with its stdout, stderr and exit status in LOG/NAME.*"""
    command = " ".join(map(shlex.quote, [sys.executable, "-m", "moelab.cli", *argv]))
    return f"{command} >{log}/{name}.out 2>{log}/{name}.err; echo $? >{log}/{name}.rc; "


def test_real_full_disk_trace_refuses_before_pre_sizing(tmp_path, data, straight, tmpfs):
    """48k: room to create the pre-sized files but not to fill them (that used to end in SIGBUS)."""
    log = tmp_path
    out = tmpfs.mnt / "trace"
    argv = ["trace", str(straight), "--data", str(data / "tokens"), "--out", str(out)]
    # a sparse file larger than the disk: reserving its blocks fails with ENOSPC, not SIGBUS later
    reserve = (
        "import errno, sys; from moelab.io import reserve\n"
        "open(sys.argv[1], 'wb').truncate(1 << 20)\n"
        "try:\n    reserve(sys.argv[1])\nexcept OSError as e:\n    print(e.errno == errno.ENOSPC)"
    )
    script = (
        moelab_sh(argv, "trace", log)
        + f"ls -A {tmpfs.mnt} >{log}/ls; "
        + f"{sys.executable} -c {shlex.quote(reserve)} {tmpfs.mnt}/sparse >{log}/reserve"
    )
    tmpfs("48k", script)
    assert (log / "trace.rc").read_text().strip() == "2"  # not SIGBUS
    line = one_error_line((log / "trace.err").read_text())
    assert "not enough space" in line and str(out) in line and "bytes" in line
    assert (log / "ls").read_text() == ""
    assert (log / "reserve").read_text().strip() == "True"


def test_real_full_disk_tokenize_is_one_line_and_leaves_nothing(tmp_path, data, tmpfs):
    log = tmp_path
    inputs = [str(data / "train.jsonl"), str(data / "val.jsonl")]
    argv = ["data", "tokenize", *inputs, "--tokenizer", str(data / "tok"), "--out", str(tmpfs.mnt / "tokens")]
    tmpfs("8k", moelab_sh(argv, "tokenize", log) + f"ls -A {tmpfs.mnt} >{log}/ls")
    assert (log / "tokenize.rc").read_text().strip() == "2"
    assert "no space left" in one_error_line((log / "tokenize.err").read_text())
    assert (log / "ls").read_text() == ""


def test_real_full_disk_train_then_resume_after_freeing_space_is_exact(tmp_path, data, straight, tmpfs):
    log = tmp_path
    run_dir = tmpfs.mnt / "run"
    ckpt = tree_size(straight / "checkpoints" / "step-0000002")
    size = (ckpt * 3 // 2 + (256 << 10)) // 4096 * 4096  # room for one checkpoint, not two
    script = (
        moelab_sh(train_argv(empty_config(tmp_path / "cfg"), run_dir, data), "train", log)
        + f"ls -A {run_dir}/checkpoints >{log}/ls; "
        + f"mount -o remount,size=64m {tmpfs.mnt}; "  # space freed
        + moelab_sh(resume_argv(run_dir), "resume", log)
        + f"cp {run_dir}/metrics.jsonl {log}/"
    )
    tmpfs(str(size), script)
    assert (log / "train.rc").read_text().strip() == "2", (log / "train.err").read_text()[-3000:]
    line = one_error_line((log / "train.err").read_text())
    assert "no space left" in line and "--resume" in line
    assert (log / "ls").read_text().split() == ["latest", "step-0000002"]
    assert (log / "resume.rc").read_text().strip() == "0", (log / "resume.err").read_text()[-3000:]
    assert train_losses(log) == train_losses(straight)


# ----------------------------------------------------------------------------- convert --out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "ckpt"
    model = moelab.build(moelab.load_config(None, tiny_model_overrides()))
    return moelab.save_checkpoint(model, path)


def test_convert_never_replaces_a_directory_it_did_not_write(tmp_path, ckpt, capsys):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def convert(*argv) -> int:
        capsys.readouterr()
        return main(["convert", *map(str, argv)])

    for force in ([], ["--force"]):
        assert convert("to-hf", run, "--out", run, *force) == 2  # its own input
        assert "moelab: error:" in capsys.readouterr().err
        notes = tmp_path / "notes"
        notes.mkdir(exist_ok=True)
        (notes / "todo.txt").write_text("keep me")
        assert convert("to-hf", run, "--out", notes, *force) == 2
        assert "not written by `moelab convert to-hf`" in capsys.readouterr().err
        assert (notes / "todo.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    hf = tmp_path / "hf"
    hf.mkdir()  # an empty directory is fine
    assert convert("to-hf", run, "--out", hf) == 0
    assert convert("to-hf", run, "--out", hf) == 2  # its own output: only with --force
    assert "--force" in capsys.readouterr().err
    assert convert("to-hf", run, "--out", hf, "--force") == 0
    assert json.loads((hf / "moelab-convert.json").read_text())["command"] == "to-hf"

    back = tmp_path / "back"
    assert convert("from-hf", hf, "--out", back) == 0
    assert convert("from-hf", hf, "--out", back, "--force") == 0
    assert convert("from-hf", hf, "--out", hf, "--force") == 2  # a to-hf output is not a from-hf one
    assert convert("from-hf", hf, "--out", run, "--force") == 2  # a moelab checkpoint it did not write
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (back / "my-notes.txt").write_text("mine")  # something convert does not write: never replaced
    assert convert("from-hf", hf, "--out", back, "--force") == 2
    assert "my-notes.txt" in capsys.readouterr().err
    assert (back / "my-notes.txt").read_text() == "mine"
    assert moelab.load(back).config.model.n_layers == 2


# ----------------------------------------------------------------------------- file modes


def test_every_output_file_gets_the_same_mode(tmp_path, ckpt, straight):
    old = os.umask(0o027)
    try:
        out = moelab.save_checkpoint(moelab.load(ckpt), tmp_path / "ckpt")
        assert main(["convert", "to-hf", str(out), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    files = [p for d in (out, tmp_path / "hf") for p in d.iterdir()]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o640" for p in files}
    checkpoint_files = [p for p in (straight / "checkpoints").rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in checkpoint_files} == {oct(0o666 & ~old)}


# ----------------------------------------------------------------------------- concurrent runs


@pytest.fixture(scope="module")
def tokens_dir(two_domain_data) -> Path:
    return two_domain_data / "tokens"


def test_two_runs_started_at_once_in_one_directory_refuse_the_second(tmp_path, tokens_dir):
    """Both started together: one trains, the other exits 2 naming the first's pid (before: both exit 0)."""
    run_dir = tmp_path / "shared"
    argv = runs.train_argv(runs.config_file(tmp_path), run_dir, runs.overrides(tokens_dir, steps=100000))
    procs = [runs.start(argv, tmp_path), runs.start(argv, tmp_path)]
    deadline = time.time() + 120
    while all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.1)
    loser = next((p for p in procs if p.poll() is not None), None)
    winner = next(p for p in procs if p is not loser)
    if loser is None:
        for p in procs:
            p.kill()
        raise AssertionError("neither run was refused")
    _, err = loser.communicate()
    assert loser.returncode == 2, err
    line = runs.one_error_line(err)
    assert f"pid {winner.pid}" in line and str(run_dir) in line
    runs.wait_for_steps(run_dir, winner)
    winner.send_signal(signal.SIGTERM)
    out, err = winner.communicate(timeout=60)
    assert winner.returncode == 0, err
    assert len(list_checkpoints(run_dir)) == 1


def test_a_sigkilled_run_releases_its_directory(tmp_path, tokens_dir):
    run_dir = tmp_path / "killed"
    cfg = runs.config_file(tmp_path)
    holder = runs.start(runs.train_argv(cfg, run_dir, runs.overrides(tokens_dir, steps=100000)), tmp_path)
    runs.wait_for_steps(run_dir, holder)
    one_step = runs.train_argv(cfg, run_dir, runs.overrides(tokens_dir, steps=1))
    second = subprocess.run(one_step, cwd=tmp_path, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr
    assert f"pid {holder.pid}" in runs.one_error_line(second.stderr)
    holder.kill()  # SIGKILL: no handler runs; the kernel drops the lock with the process
    holder.communicate()
    third = subprocess.run(one_step, cwd=tmp_path, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert [c.name for c in list_checkpoints(run_dir)] == ["step-0000001"]
