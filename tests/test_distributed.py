"""Training with several processes (2 gloo ranks via torchrun) equals one process on the same global batch.

Reference: one process, same config, same global micro-batch (batch_size 4, grad_accum 2), 5 steps.
Tolerance: 1e-5 relative on fp32 losses and gradient norms. The ranks see the same tokens and weights;
only the order of floating-point sums differs (gradients averaged over ranks, expert rows regrouped by
all-to-all), which moves fp32 results by a few ulps per step. The balancing biases move by exactly
±lflb_rate from counts that are sums of integers, so they are compared exactly.
`moe.load_balance_scope: global_batch` makes the total loss (load balance included) comparable too.

Run as a module by torchrun (`python -m torch.distributed.run ... -m test_distributed DIR`), this file is
also the worker of the expert-parallel dispatcher test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_MODEL

from moelab.config import load_config
from moelab.errors import ConfigError, MoelabError

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
MODEL = TINY_TRAIN_MODEL  # for the two-domain data of conftest.py
STEPS = 5
RTOL = 1e-5


def _overrides(data: Path, *extra: str) -> list[str]:
    return [
        *MODEL,
        f"data.path={data / 'tokens'}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.grad_accum=2",
        f"train.steps={STEPS}",
        "train.warmup_steps=2",
        "train.decay_steps=10",  # the schedule does not depend on train.steps (resume runs one more)
        "train.device=cpu",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "moe.lflb=true",
        "moe.load_balance_scope=global_batch",
        *extra,
    ]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(out: Path, overrides: list[str], nproc: int = 0, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "moelab.cli", "train", str(CONFIG), "--out", str(out), "--no-progress"]
    cmd += [a for o in overrides for a in ("--set", o)]
    cmd += ["--nproc", str(nproc)] if nproc else []
    cmd += ["--resume"] if resume else []
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _steps(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["type"] == "train"}


@pytest.fixture(scope="module")
def reference(two_domain_data, tmp_path_factory):
    """One process, STEPS + 1 steps: the losses, biases and the step after the checkpoint to compare with."""
    out = tmp_path_factory.mktemp("dist") / "one"
    _train(out, _overrides(two_domain_data, f"train.steps={STEPS + 1}"))
    return _steps(out)


def _assert_same_run(run: Path, reference: dict[int, dict]) -> None:
    got = _steps(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        a, b = got[step], reference[step]
        for key in (
            "loss",
            "ce",
            "load_balance",
            "router_z",
            "grad_norm",
            "grad_norm_experts",
            "grad_norm_rest",
        ):
            assert a[key] == pytest.approx(b[key], rel=RTOL), (step, key)
        assert a["layers"]["counts"] == b["layers"]["counts"], step  # all ranks' tokens, summed
        assert a["layers"]["bias_range"] == b["layers"]["bias_range"], step  # biases moved identically
        assert a["tokens"] == b["tokens"]


def _assert_resumes_in_one_process(run: Path, data: Path, reference: dict[int, dict]) -> None:
    """The checkpoint written by the 2 ranks continues in one process to the reference's next step."""
    import moelab

    model = moelab.load(run)  # whole experts, one process
    assert model.count_parameters()["total"] > 0
    one = ["parallel.ep=1", "parallel.data_parallel=ddp"]  # the saved config says how the 2 ranks ran
    _train(run, _overrides(data, f"train.steps={STEPS + 1}", *one), resume=True)
    after = _steps(run)[STEPS + 1]
    assert after["loss"] == pytest.approx(reference[STEPS + 1]["loss"], rel=RTOL)
    assert after["layers"]["bias_range"] == reference[STEPS + 1]["layers"]["bias_range"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(["parallel.data_parallel=ddp"], id="ddp"),
        pytest.param(["parallel.ep=2"], id="ep2"),
        pytest.param(["parallel.data_parallel=fsdp"], id="fsdp"),
    ],
)
def test_two_ranks_equal_one_process(mode, reference, two_domain_data, tmp_path):
    run = tmp_path / "two"
    _train(run, _overrides(two_domain_data, *mode), nproc=2)
    _assert_same_run(run, reference)
    _assert_resumes_in_one_process(run, two_domain_data, reference)


@pytest.mark.dist
def test_sigterm_on_one_rank_stops_both(two_domain_data, tmp_path):
    """SIGTERM to rank 1 alone: both ranks save one checkpoint after the same step and exit cleanly."""
    import signal
    import time

    run = tmp_path / "sig"
    cmd = [sys.executable, "-m", "moelab.cli", "train", str(CONFIG), "--out", str(run), "--no-progress"]
    cmd += [a for o in _overrides(two_domain_data, "train.steps=100000") for a in ("--set", o)]
    launcher = subprocess.Popen([*cmd, "--nproc", "2"], env=_env(), stdout=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 60
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)

    def children(pid: int) -> list[int]:
        found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in found.split())

    torchrun = children(launcher.pid)
    ranks = children(torchrun[0]) if torchrun else []
    if len(ranks) != 2:
        launcher.kill()
    assert len(ranks) == 2, (torchrun, ranks)
    os.kill(ranks[-1], signal.SIGTERM)  # one worker only
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, out
    assert "stopped by SIGTERM" in out
    last = max(_steps(run))
    assert (run / "checkpoints" / f"step-{last:07d}").is_dir()


# ----------------------------------------------------------------------------- the EP dispatcher itself


def _ep_worker(out_dir: str) -> None:
    """Each rank routes its own tokens through 2-way expert parallelism and also runs the local
    dispatcher on both ranks' tokens with all experts; both write what must agree."""
    import torch.distributed as dist

    from moelab.moe.expert_parallel import ExpertParallelDispatcher, shard_experts
    from moelab.moe.experts import LocalDispatcher, RoutedExperts

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    E, D, T, k = 4, 16, 6, 2

    def experts():
        torch.manual_seed(1)
        m = RoutedExperts(E, D, 8)
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
        m.set_output_norm("learned", 1e-6)
        with torch.no_grad():
            m.output_norm.weight.uniform_(0.5, 1.5)
        return m

    xs = [torch.randn(T, D) for _ in range(2)]  # rank r's tokens: xs[r]
    ids = [torch.randint(0, E, (T, k)) for _ in range(2)]
    ids[0][0, 1] = -1  # a slot without expert
    ids[1][:, 0] = 3  # uneven loads: rank 1 sends most rows to expert 3's owner
    ws = [torch.rand(T, k) for _ in range(2)]

    def run(module, dispatcher, x, i, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        out, y = dispatcher(module, x, i, w, per_slot=True)
        ((out * out.detach().cos()).sum() + (y * 0.5).sum()).backward()
        return out, y, x.grad, w.grad

    ref = experts()  # every expert, every token, local kernel
    r_out, r_y, r_gx, r_gw = run(ref, LocalDispatcher("sorted"), torch.cat(xs), torch.cat(ids), torch.cat(ws))
    ep = experts()
    shard_experts(ep, 2, rank)
    out, y, gx, gw = run(
        ep, ExpertParallelDispatcher("sorted", dist.group.WORLD, 2, rank), xs[rank], ids[rank], ws[rank]
    )
    part = slice(rank * T, (rank + 1) * T)
    grads = {n: p.grad for n, p in ep.named_parameters()}  # via all-to-all: both ranks' tokens
    half = slice(rank * E // 2, (rank + 1) * E // 2)
    torch.save(
        {
            "out": (out, r_out[part]),
            "y": (y, r_y[part]),
            "x_grad": (gx, r_gx[part]),
            "weight_grad": (gw, r_gw[part]),
            **{f"param {n}": (g, dict(ref.named_parameters())[n].grad[half]) for n, g in grads.items()},
        },
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


@pytest.mark.dist
def test_expert_parallel_dispatcher_matches_local(tmp_path):
    """Outputs, per-slot outputs and the gradients of x, the mixing weights and every expert parameter
    (sharded) equal the local dispatcher's on all tokens: 1e-5 relative (fp32, different sum order)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*cmd, "-m", "test_distributed", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        for name, (got, want) in torch.load(tmp_path / f"rank{rank}.pt").items():
            assert got.abs().sum() > 0, name
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")


# ----------------------------------------------------------------------------- errors


def test_parallel_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="parallel.ep=3 must divide model.n_experts=4"):
        load_config(CONFIG, [*MODEL, "parallel.ep=3"])
    with pytest.raises(ConfigError, match="parallel.ep=0 must be >= 1"):
        load_config(CONFIG, [*MODEL, "parallel.ep=0"])
    with pytest.raises(ConfigError, match="data_parallel"):
        load_config(CONFIG, [*MODEL, "parallel.data_parallel=zero"])
    with pytest.raises(ConfigError, match="load_balance_scope"):
        load_config(CONFIG, [*MODEL, "moe.load_balance_scope=step"])


def test_world_size_errors(monkeypatch):
    from moelab.train.distributed import init_distributed

    config = load_config(CONFIG, [*MODEL, "parallel.ep=2"])
    with pytest.raises(MoelabError, match="parallel.ep=2 needs ep processes"):
        init_distributed(config)  # one process
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MoelabError, match="parallel.ep=2 must divide the number of processes 3"):
        init_distributed(config)
    config = load_config(CONFIG, [*MODEL, "train.batch_size=5"])
    with pytest.raises(MoelabError, match="train.batch_size=5 must be divisible by the 3 processes"):
        init_distributed(config)


if __name__ == "__main__":
    _ep_worker(sys.argv[1])
