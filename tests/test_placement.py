"""Expert placement (moe/placement.py): same outputs and gradients as the local dispatcher, checkpoints
that load into unplaced models, and training losses unchanged."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN_MODEL, tiny_model_overrides

import moelab
from moelab.checkpoint import save_checkpoint
from moelab.config import load_config
from moelab.errors import ConfigError
from moelab.moe.dispatch import PATHS
from moelab.moe.experts import LocalDispatcher, RoutedExperts
from moelab.moe.placement import PlacedExperts, PlacementDispatcher, place_experts


def make_experts(widths=(0.5, 1.0), E=8, norm="none", seed=0) -> RoutedExperts:
    torch.manual_seed(seed)
    experts = RoutedExperts(E, 16, 16, widths)
    experts.set_output_norm(norm, 1e-5)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    return experts


def routing_case(T=12, E=8, k=3, seed=1):
    """Random distinct top-k ids with some slots set to -1 (no expert), and mixing weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).topk(k, dim=-1).indices
    ids[torch.rand(T, k, generator=g) < 0.2] = -1
    return torch.randn(T, 16, generator=g), ids, torch.rand(T, k, generator=g)


def run_with_grads(experts, x, ids, w, per_slot):
    """Output (and per-slot y) and the gradients w.r.t. x, w and every expert weight, by stacked name."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    res = experts.dispatcher(experts, x, ids, w, per_slot=per_slot)
    out, y = res if per_slot else (res, None)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    if per_slot:
        loss = loss + (y * torch.randn(y.shape, generator=g)).sum()
    loss.backward()
    return out.detach(), y, x.grad, w.grad, expert_grads(experts)


def expert_grads(experts) -> dict[str, torch.Tensor]:
    """Gradient of every expert weight under the stacked (unplaced) names, rows in expert order."""
    if not isinstance(experts, PlacedExperts):
        return {n: p.grad for n, p in experts.named_parameters()}
    grads = {}
    for name, param in experts.named_parameters():  # shards.{s}.{stacked name}
        s, stacked = name.split(".", 2)[1:]
        shard = experts.shards[int(s)]
        rows = shard.experts if stacked == "output_norm.weight" else shard.rows[_gate_up_name(stacked)]
        grads.setdefault(stacked, {}).update(zip(rows, param.grad))
    return {n: torch.stack([rows[e] for e in sorted(rows)]) for n, rows in grads.items()}


def _gate_up_name(name: str) -> str:
    return name.replace("down", "gate_up")


@pytest.mark.parametrize("kernel", PATHS)
@pytest.mark.parametrize(
    ("widths", "norm", "slots"),
    [
        ((0.5, 1.0), "none", 2),
        ((0.5, 1.0, 1.5, 2.0), "learned", 4),
        ((), "frozen", 8),
    ],
)
def test_placed_matches_local_outputs_and_gradients(kernel, widths, norm, slots):
    local = make_experts(widths, norm=norm)
    local.dispatcher = LocalDispatcher(kernel)
    placed = copy.deepcopy(local)
    assert place_experts(placed, ["cpu"] * slots) == 1
    assert placed.dispatcher.kernel == kernel and isinstance(placed.dispatcher, PlacementDispatcher)
    assert not [n for n, _ in placed.named_parameters() if not n.startswith("shards.")]
    x, ids, w = routing_case()
    for per_slot in (False, True):
        local.zero_grad(), placed.zero_grad()
        want, got = run_with_grads(local, x, ids, w, per_slot), run_with_grads(placed, x, ids, w, per_slot)
        for a, b in zip(want[:4], got[:4]):
            if a is not None:
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert want[4].keys() == got[4].keys()
        for name in want[4]:
            torch.testing.assert_close(got[4][name], want[4][name], atol=1e-5, rtol=1e-5, msg=name)
        if per_slot:
            assert (got[1][ids < 0] == 0).all()


def test_all_slots_empty_gives_zeros():
    placed = make_experts()
    place_experts(placed, ["cpu", "cpu"])
    x, ids, w = routing_case()
    out, y = placed.dispatcher(placed, x, torch.full_like(ids, -1), w, per_slot=True)
    assert out.shape == x.shape and not out.any() and y.shape == (*ids.shape, 16) and not y.any()


def test_experts_are_cycled_over_the_entries_and_state_dict_keeps_the_stacked_names():
    local = make_experts((0.5, 1.0), norm="learned")
    placed = copy.deepcopy(local)
    place_experts(placed, ["cpu", "cpu"])
    assert [s.experts for s in placed.shards] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert placed.shards[1].rows == {"gate_up_0": [1, 3], "gate_up_1": [5, 7]}
    assert placed.shards[1].gate_up_1.shape == (2, 16, 32)
    want, got = local.state_dict(), placed.state_dict()
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert placed.expert_sizes() == local.expert_sizes()
    for a, b in zip(placed.groups(), local.groups()):
        assert a.first == b.first and torch.equal(a.gate_up, b.gate_up) and torch.equal(a.down, b.down)
    # and an unplaced state loads back into the shards, rows to their slots
    fresh = make_experts((0.5, 1.0), norm="learned", seed=3)
    place_experts(fresh, ["cpu", "cpu"])
    fresh.load_state_dict(want, strict=True, assign=True)
    assert torch.equal(fresh.shards[1].gate_up_1, want["gate_up_1"][[1, 3]])
    assert torch.equal(fresh.shards[0].output_norm.weight, want["output_norm.weight"][[0, 2, 4, 6]])


@pytest.mark.parametrize(
    ("devices", "match"),
    [
        (["cpu"] * 3, "divides 8"),
        (["cpu"] * 16, "divides 8"),
        (["gpu:0"], "not a device"),
        (["meta"], "only cpu and cuda"),
    ],
)
def test_bad_placements_are_one_line_config_errors(devices, match):
    with pytest.raises(ConfigError, match=match) as e:
        place_experts(make_experts(), devices)
    assert "\n" not in str(e.value)


def test_config_field_validates_device_strings():
    config = load_config(None, tiny_model_overrides("parallel.expert_devices=[cpu, cpu]"))
    assert config.parallel.expert_devices == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="not a device"):
        load_config(None, tiny_model_overrides("parallel.expert_devices=[cpu, 'tpu 0']"))


def test_checkpoint_of_a_placed_model_loads_into_an_unplaced_one(tmp_path):
    from moelab.train.parallel import parallelize

    config = load_config(None, tiny_model_overrides("moe.expert_output_norm=learned"))
    torch.manual_seed(0)
    model = moelab.build(config)
    tokens = torch.randint(3, 128, (2, 10))
    placed_config = load_config(
        None,
        tiny_model_overrides(
            "moe.expert_output_norm=learned", "parallel.expert_devices=[cpu, cpu, cpu, cpu]"
        ),
    )
    model = parallelize(model, placed_config)
    assert sum(isinstance(m, PlacedExperts) for m in model.modules()) == 2
    model.eval()
    with torch.no_grad():
        want = model(tokens).logits
    save_checkpoint(model, tmp_path / "ckpt", config)
    loaded = moelab.load(tmp_path / "ckpt")
    assert not any(isinstance(m, PlacedExperts) for m in loaded.modules())
    loaded.eval()
    with torch.no_grad():
        got = loaded(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["sorted", "grouped"])
def test_cuda_placement_matches_local(kernel):
    devices = [f"cuda:{i}" for i in range(min(torch.cuda.device_count(), 2))] * 2
    local = make_experts((0.5, 1.0), norm="learned").cuda().to(torch.bfloat16)
    local.dispatcher = LocalDispatcher(kernel)
    placed = copy.deepcopy(local)
    place_experts(placed, devices)
    assert {str(s.device) for s in placed.shards} == set(devices)
    x, ids, w = (t.cuda() for t in routing_case(T=64))
    x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    for per_slot in (False, True):
        local.zero_grad(), placed.zero_grad()
        want, got = run_with_grads(local, x, ids, w, per_slot), run_with_grads(placed, x, ids, w, per_slot)
        for a, b in zip(want[:4], got[:4]):
            if a is not None:
                torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)
        for name in want[4]:
            torch.testing.assert_close(
                got[4][name].float().cuda(0), want[4][name].float(), atol=3e-2, rtol=3e-2
            )


def test_training_losses_equal_with_placement(tmp_path, two_domain_data):
    from moelab.train.trainer import prepare_run, train

    def losses(name, *extra):
        overrides = [
            *TINY_TRAIN_MODEL,
            f"data.path={two_domain_data / 'tokens'}",
            "data.seq_len=16",
            "train.batch_size=4",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.eval_every=0",
            "train.log_every=1",
            "train.save_every=0",
            *extra,
        ]
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text("{}\n")
        config, run_dir = prepare_run(cfg, overrides, tmp_path / name, False)
        train(config, run_dir, progress=False)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if r["type"] == "train"]

    want = losses("local")
    got = losses("placed", "parallel.expert_devices=[cpu, cpu]")
    assert len(want) == 4
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
