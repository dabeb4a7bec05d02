"""The trainer: exact resume, clean stop on SIGTERM, non-finite steps, schedules, telemetry, eval."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_MODEL

from moelab.cli import main
from moelab.config import load_config
from moelab.errors import MoelabError
from moelab.train import optim, telemetry
from moelab.train.checkpoint import latest_checkpoint, list_checkpoints
from moelab.train.trainer import prepare_run, train


@pytest.fixture(scope="module")
def data_dir(two_domain_data) -> Path:
    """Tokenized train and val splits with two labelled domains (see conftest)."""
    return two_domain_data / "tokens"


def tiny_overrides(data_dir: Path, **train) -> list[str]:
    base = [
        *TINY_TRAIN_MODEL,
        "moe.lflb=true",
        "moe.lflb_rate=0.01",
        f"data.path={data_dir}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "train.warmup_steps=2",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.log_every=1",
        "train.save_every=0",
    ]
    return base + [f"train.{k}={v}" for k, v in train.items()]


def run(tmp: Path, data_dir: Path, name: str, resume=False, **train_kw) -> list[dict]:
    config_file = tmp / "cfg.yaml"
    config_file.write_text("{}\n")
    config, run_dir = prepare_run(config_file, tiny_overrides(data_dir, **train_kw), tmp / name, resume)
    train(config, run_dir, resume=resume, progress=False)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(records):
    return [(r["step"], r["loss"], r["ce"]) for r in records if r["type"] == "train"]


def test_resume_is_exact(tmp_path, data_dir):
    """2N steps in one go == N steps, stop, resume, N steps: identical per-step losses (fp32, CPU)."""
    straight = run(tmp_path, data_dir, "straight", steps=8, grad_accum=2)
    run(tmp_path, data_dir, "split", steps=8, grad_accum=2, save_every=4)
    run_dir = tmp_path / "split"
    ckpts = list_checkpoints(run_dir)
    assert [c.name for c in ckpts] == ["step-0000004", "step-0000008"]
    # Forget the second half: back to the step-4 checkpoint, as if the run had stopped there.
    shutil.rmtree(ckpts[-1])
    (run_dir / "checkpoints" / "latest").write_text("step-0000004\n")
    resumed = run(tmp_path, data_dir, "split", resume=True, steps=8, grad_accum=2, save_every=4)
    assert len(train_losses(straight)) == 8
    assert train_losses(resumed) == train_losses(straight)  # bit-identical, including steps 1-4 kept
    state = torch.load(run_dir / "checkpoints" / "step-0000008" / "train_state.pt", weights_only=True)
    assert state["step"] == 8 and state["tokens_seen"] == 8 * 2 * 4 * 16
    # the loss-free balancing biases moved, and the same way in both runs
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000008" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / "step-0000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.0.mlp.router.balance_bias"].abs().sum() > 0


def test_metrics_records_have_documented_keys(tmp_path, data_dir):
    records = run(tmp_path, data_dir, "keys", steps=3, eval_every=3)
    rec = [r for r in records if r["type"] == "train"][-1]
    for key in ["loss", "ce", "load_balance", "router_z", "lr", "load_balance_coef", "grad_norm",
                "grad_norm_experts", "grad_norm_rest", "tokens", "tokens_per_s", "step_time_s"]:  # fmt: skip
        assert key in rec, key
    layers = rec["layers"]
    assert len(layers["counts"]) == 2 and len(layers["counts"][0]) == 4
    assert sum(layers["counts"][0]) == 4 * 16 * 2  # every token at top-2
    counts = torch.tensor(layers["counts"], dtype=torch.float)
    assert layers["max_vio"] == pytest.approx((counts.max(1).values / counts.mean(1) - 1).tolist())
    assert all(0 <= h <= math.log(4) + 1e-6 for h in layers["router_entropy"])
    assert "routing_state_rms" not in layers and "model" not in rec  # olmoe has neither
    assert rec["grad_norm"] == pytest.approx(math.hypot(rec["grad_norm_experts"], rec["grad_norm_rest"]))
    val = [r for r in records if r["type"] == "val"]
    assert len(val) == 1 and set(val[0]["domain_loss"]) == {"drama", "science"}
    assert val[0]["perplexity"] == pytest.approx(math.exp(val[0]["loss"]))


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, data_dir, monkeypatch):
    import moelab.train.trainer as trainer_mod

    real_build = trainer_mod.build
    poison = {"steps": set()}

    def build_with_nan(config):
        model = real_build(config)
        forward = model.forward
        calls = {"n": 0}

        def patched(*a, **kw):
            out = forward(*a, **kw)
            calls["n"] += 1
            if calls["n"] in poison["steps"]:
                out.losses["ce"] = out.losses["ce"] * float("nan")  # the trainer weighs out.losses
            return out

        model.forward = patched
        return model

    monkeypatch.setattr(trainer_mod, "build", build_with_nan)
    poison["steps"] = {2, 3}
    records = run(tmp_path, data_dir, "nan", steps=5, save_every=1, keep_last=10)
    bad = [r for r in records if r["type"] == "nonfinite"]
    assert [r["step"] for r in bad] == [2, 3] and [r["streak"] for r in bad] == [1, 2]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 4, 5]
    # no periodic checkpoint is written during a non-finite streak
    names = [c.name for c in list_checkpoints(tmp_path / "nan")]
    assert names == ["step-0000001", "step-0000004", "step-0000005"]
    # skipped steps leave the weights untouched: the final checkpoint after steps 2-3 = the step-1 weights
    from safetensors.torch import load_file

    run(tmp_path, data_dir, "nan3", steps=3, save_every=1, keep_last=10)
    ckpt = tmp_path / "nan3" / "checkpoints"
    w1 = load_file(str(ckpt / "step-0000001" / "model.safetensors"))
    w3 = load_file(str(ckpt / "step-0000003" / "model.safetensors"))
    assert all(torch.equal(w1[k], w3[k]) for k in w1)

    poison["steps"] = set(range(3, 100))
    with pytest.raises(MoelabError, match=r"3 non-finite steps in a row.*step-0000002"):
        run(tmp_path, data_dir, "nan-stop", steps=20, save_every=1, max_nonfinite=3)


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, data_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("{}\n")
    run_dir = tmp_path / "sig"
    args = [sys.executable, "-m", "moelab.cli", "train", str(cfg), "--out", str(run_dir), "--no-progress"]
    for o in tiny_overrides(data_dir, steps=100000):
        args += ["--set", o]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "--resume" in out + err
    ckpts = list_checkpoints(run_dir)
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 3
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert max(r["step"] for r in lines) == step
    # resume for two more steps from the saved one
    config, _ = prepare_run(run_dir / "config.yaml", [f"train.steps={step + 2}"], run_dir, resume=True)
    train(config, run_dir, resume=True, progress=False)
    assert [c.name for c in list_checkpoints(run_dir)][-1] == f"step-{step + 2:07d}"


def test_refuses_to_overwrite_a_run_and_corrupt_state(tmp_path, data_dir):
    run(tmp_path, data_dir, "once", steps=1)
    with pytest.raises(MoelabError, match="--resume"):
        run(tmp_path, data_dir, "once", steps=1)
    state = tmp_path / "once" / "checkpoints" / "step-0000001" / "train_state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(MoelabError, match="corrupt"):
        run(tmp_path, data_dir, "once", resume=True, steps=2)


def test_lr_schedule_warmup_cosine_hold():
    tc = load_config(None, ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=4", "train.steps=14",
                            "train.decay_steps=8"]).train  # fmt: skip
    assert [optim.lr_at(s, tc) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert optim.lr_at(4, tc) == 1.0  # cosine starts at the peak
    assert optim.lr_at(8, tc) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert optim.lr_at(12, tc) == pytest.approx(0.1)
    assert optim.lr_at(13, tc) == pytest.approx(0.1)  # held, no restart
    assert optim.lr_at(1000, tc) == pytest.approx(0.1)


def test_load_balance_coef_decays_linearly_to_zero():
    assert optim.load_balance_coef_at(0, 0.005, 0) == 0.005
    assert optim.load_balance_coef_at(25_000, 0.005, 50_000) == pytest.approx(0.0025)
    assert optim.load_balance_coef_at(60_000, 0.005, 50_000) == 0.0


def test_clip_groups_split_routed_experts_from_the_rest():
    import moelab

    model = moelab.build(load_config(None, tiny_overrides(Path("."))[:10] + ["model.n_shared_experts=1"]))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    rest = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    assert any(".shared." in n for n, _ in model.named_parameters())
    norms = optim.clip_grad_groups(model, clip_experts=1.0, clip_rest=0.0)
    assert norms.tolist() == pytest.approx([math.sqrt(experts + rest), math.sqrt(experts), math.sqrt(rest)])
    clipped = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".experts." in n])
    assert clipped.norm().item() == pytest.approx(1.0, rel=1e-4)
    untouched = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if ".experts." not in n])
    assert torch.equal(untouched, torch.ones_like(untouched))


def test_weight_decay_groups():
    import moelab

    config = load_config(None, tiny_overrides(Path("."))[:10])
    model = moelab.build(config)
    opt = optim.build_optimizer(model, config.train, torch.device("cpu"))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "lm_head.weight" in names and "blocks.0.mlp.experts.gate_up" in names
    assert not any("norm" in n or "embed" in n for n in names)
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_telemetry_against_hand_values():
    counts = torch.tensor([[2.0, 2.0, 2.0, 2.0], [4.0, 2.0, 1.0, 1.0]])
    assert telemetry.max_violation(counts).tolist() == [0.0, 1.0]  # 4 / 2 - 1
    from moelab.moe.routing import RoutingInfo

    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]])
    r = RoutingInfo(logits, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    h_uniform = math.log(2)
    h_31 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    valid = torch.tensor([1, 1, 0])
    assert telemetry.router_entropy([r], valid).item() == pytest.approx((h_uniform + h_31) / 2, rel=1e-6)


def test_eval_cli_reports_loss_and_domains(tmp_path, data_dir, capsys):
    run(tmp_path, data_dir, "ev", steps=2)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ev"), "--data", str(data_dir), "--json", "--batch-size", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert set(result["domain_loss"]) == {"drama", "science"}
    assert len(result["max_vio_global"]) == 2
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data_dir)]) == 2
    assert capsys.readouterr().err.startswith("moelab: error:")


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_train_cli_prints_run_dir(tmp_path, data_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    argv = ["train", str(cfg), "--out", str(tmp_path / "cli"), "--no-progress"]
    for o in tiny_overrides(data_dir, steps=1):
        argv += ["--set", o]
    assert main(argv) == 0
    assert "done" in capsys.readouterr().out
    assert main(argv[:2] + ["--set", "train.stepz=3"]) == 2
    assert "did you mean train.steps" in capsys.readouterr().err


def test_refuses_data_whose_eos_differs_from_the_model(tmp_path, data_dir):
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("{}\n")
    overrides = tiny_overrides(data_dir, steps=1) + ["model.eos_token_id=5"]
    config, run_dir = prepare_run(config_file, overrides, tmp_path / "eos", False)
    with pytest.raises(MoelabError, match="eos id 0 but model.eos_token_id is 5"):
        train(config, run_dir, progress=False)


def test_tensorboard_logs_the_same_numbers_as_metrics_jsonl(tmp_path, data_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = run(tmp_path, data_dir, "tb", steps=3, tensorboard=True)
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "train/layers/max_vio/0" in events.Tags()["scalars"]


def test_resume_survives_a_torn_metrics_line_and_refuses_bad_overrides(tmp_path, data_dir):
    run(tmp_path, data_dir, "torn", steps=2)
    run_dir = tmp_path / "torn"
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"type": "train", "st')  # a process killed mid-write
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(MoelabError, match="optimizer state"):  # other decay groups: refused, one line
        config, _ = prepare_run(
            run_dir / "config.yaml", ["train.no_decay=[]", "train.steps=3"], run_dir, True
        )
        train(config, run_dir, resume=True, progress=False)
    assert (run_dir / "config.yaml").read_text() == saved  # the failed resume changed nothing
    records = run(tmp_path, data_dir, "torn", resume=True, steps=3)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3]


def test_a_validation_split_smaller_than_a_batch_is_refused_before_training(tmp_path, data_dir):
    with pytest.raises(MoelabError, match="fewer than batch_size"):
        run(tmp_path, data_dir, "bigbatch", steps=1, batch_size=200)
    assert not (tmp_path / "bigbatch" / "checkpoints").exists()


def test_crosslayer_telemetry_logs_routing_state_rms_and_alpha(tmp_path, data_dir):
    """The logged values equal what the saved model holds: α_l = ½ + ½·tanh(θ_l) after the last step, and
    the bias ranges (their columns sit next to the new routing-state column)."""
    from safetensors.torch import load_file

    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("{}\n")
    extra = ["model.arch=crosslayer", "model.routing_dim=8", "model.routing_mix=alpha"]
    config, run_dir = prepare_run(
        config_file, tiny_overrides(data_dir, steps=3) + extra, tmp_path / "cl", False
    )
    train(config, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["type"] == "train"][-1]
    weights = load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))
    thetas = torch.stack([weights[f"blocks.{i}.routing_update.theta"] for i in range(2)])
    assert last["model"]["routing_alpha"] == pytest.approx(
        (0.5 + 0.5 * torch.tanh(thetas)).tolist(), abs=1e-7
    )
    assert thetas.abs().min() > 0  # θ moved: the comparison is not of two initial values
    for i, (low, high) in enumerate(last["layers"]["bias_range"]):
        bias = weights[f"blocks.{i}.mlp.router.balance_bias"]
        assert (low, high) == pytest.approx((bias.min().item(), bias.max().item()), abs=1e-7)
    rms = last["layers"]["routing_state_rms"]
    assert len(rms) == 2 and all(0.9 < v < 1.1 for v in rms)  # RMSNorm output, norm weights near 1


def test_global_batch_scope_takes_f_from_every_micro_batch_of_the_step(tmp_path, data_dir):
    """One process, grad_accum 2: the logged load-balance term is E·Σ f_step·P_m, averaged over the two
    micro-batches, with f counted over both (by hand from the routers' logits), not f_m of each."""
    from moelab.data.loader import PackedLoader, TokenDataset
    from moelab.models import build

    config_file = tmp_path / "cfg.yaml"
    config_file.write_text("{}\n")
    overrides = tiny_overrides(data_dir, steps=1, grad_accum=2) + ["moe.load_balance_scope=global_batch"]
    config, run_dir = prepare_run(config_file, overrides, tmp_path / "g", False)
    torch.manual_seed(config.train.seed)  # as the trainer builds its model
    model = build(config)
    loader = PackedLoader(TokenDataset(data_dir, "train"), 16, 4, config.train.seed)
    batches = [next(loader), next(loader)]
    train(config, run_dir, progress=False)
    logged = next(json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines())

    E, k = 4, 2
    with torch.no_grad():
        probs = [  # per micro-batch: (L, T, E) router probabilities
            torch.stack(
                [r.router_logits.softmax(-1) for r in model(b["input_ids"], labels=b["labels"]).routing]
            )
            for b in batches
        ]
    counts = [torch.nn.functional.one_hot(p.topk(k, dim=-1).indices, E).sum((1, 2)).float() for p in probs]
    tokens = [p.shape[1] for p in probs]

    def loss(f, n, p):  # per_layer convention, averaged over layers
        return (E * (f / (n * k)) * p.mean(1)).sum(-1).mean()

    step_f, step_n = counts[0] + counts[1], sum(tokens)
    expected = sum(loss(step_f, step_n, p) for p in probs) / 2
    per_micro_batch = sum(loss(f, n, p) for f, n, p in zip(counts, tokens, probs)) / 2
    assert logged["load_balance"] == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - float(per_micro_batch)) > 1e-4  # the two scopes differ on this data
