"""transformers interop: conversion both ways checked against transformers' own OlmoeForCausalLM.

The reference is transformers 5.24 itself: a random OlmoeForCausalLM is converted and must give the
same logits and the same expert choices in moelab; what moelab writes must load in transformers with
no missing or unexpected weights and give moelab's logits. Weights are randomised with distinct norm
weights so that any swapped name in the mapping changes the numbers.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_model_overrides
from safetensors.torch import load_file, save_file

import moelab
from moelab.cli import main
from moelab.convert import convert_from_hf, convert_to_hf
from moelab.errors import MoelabError
from moelab.hf import load_hf_olmoe
from moelab.moe.losses import load_balance_loss

HF_TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    pad_token_id=1,
    eos_token_id=127,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},  # not the default: checks the mapping
)
MOELAB_TINY = tiny_model_overrides(
    "model.rope_theta=500", "model.norm_topk_prob=true", "model.attention=eager", eos_token_id=127
)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger, distinct weights: norms around 1 (each different), matrices N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.2 * noise)
    return model


def hf_model(transformers, attn: str = "eager", seed: int = 0, **overrides):
    config = transformers.OlmoeConfig(**{**HF_TINY, **overrides})
    config._attn_implementation = attn
    return randomize(transformers.OlmoeForCausalLM(config), seed).eval()


def save_fused(model, path):
    """A transformers 5.x folder: fused expert tensors exactly as the module holds them."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def save_per_expert(model, path):
    """A transformers 4.x folder, split by hand: one gate/up/down module per expert, rope_theta on top."""
    path.mkdir(parents=True)
    hf = model.config.to_dict()
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]
    hf["torch_dtype"] = hf.pop("dtype", "float32")
    (path / "config.json").write_text(json.dumps(hf))
    state, I = {}, model.config.intermediate_size
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):  # (E, 2I, D)
            prefix = name.removesuffix("gate_up_proj")
            for e in range(t.shape[0]):
                state[f"{prefix}{e}.gate_proj.weight"] = t[e, :I].clone()
                state[f"{prefix}{e}.up_proj.weight"] = t[e, I:].clone()
        elif name.endswith("experts.down_proj"):  # (E, D, I)
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                state[f"{prefix}{e}.down_proj.weight"] = t[e].clone()
        else:
            state[name] = t.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def moelab_model(seed: int = 0, overrides: list[str] = ()):
    torch.manual_seed(seed)
    return randomize(moelab.build(moelab.load_config(None, MOELAB_TINY + list(overrides))), seed).eval()


def left_padded_batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 128, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :2] = 0
    ids[mask == 0] = 1  # the pad id
    return ids, mask


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- transformers -> moelab


@pytest.mark.parametrize(("attn", "norm_topk_prob"), [("eager", False), ("sdpa", True)])
def test_from_hf_matches_transformers(transformers, tmp_path, attn, norm_topk_prob):
    ref = hf_model(transformers, attn, norm_topk_prob=norm_topk_prob)
    ckpt = convert_from_hf(save_fused(ref, tmp_path / "hf"), tmp_path / "ckpt")
    model = moelab.load(ckpt, overrides=[f"model.attention={attn}"])
    assert model.config.model.norm_topk_prob is norm_topk_prob
    assert model.config.model.rope_theta == 500.0

    full = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    for ids, mask in [(full, None), left_padded_batch()]:
        with torch.no_grad():
            ours = model(ids, attention_mask=mask)
            theirs = ref(ids, attention_mask=mask, output_router_logits=True)
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        diff = (ours.logits - theirs.logits)[valid].abs().max().item()
        assert diff <= 1e-5, f"max |logits diff| {diff:.2e}"
        assert len(ours.routing) == len(theirs.router_logits) == 3
        flat = valid.reshape(-1)
        for r, hf_logits in zip(ours.routing, theirs.router_logits, strict=True):
            hf_ids = hf_logits.float().softmax(-1).topk(2, dim=-1).indices
            assert torch.equal(r.topk_ids[flat].sort(-1).values, hf_ids[flat].sort(-1).values)


def test_hf_concat_load_balance_matches_transformers(transformers):
    ref = hf_model(transformers)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        for m in (None, mask):
            out = ref(ids, attention_mask=m, output_router_logits=True)
            valid = None if m is None else m.reshape(-1)
            ours = load_balance_loss(list(out.router_logits), 2, valid, kind="hf_concat")
            assert abs(ours.item() - out.aux_loss.item()) <= 1e-6
    assert out.aux_loss.item() > 2.0  # random routers are unbalanced: the check is not on a constant


def test_per_expert_folder_reads_like_fused(transformers, tmp_path):
    ref = hf_model(transformers)
    config_a, fused = load_hf_olmoe(save_fused(ref, tmp_path / "fused"))
    config_b, per_expert = load_hf_olmoe(save_per_expert(ref, tmp_path / "per_expert"))
    assert config_a == config_b
    assert_same_state(fused, per_expert)
    # the mapping itself, against the module's tensors
    layer = ref.model.layers[1].mlp
    assert torch.equal(fused["blocks.1.mlp.experts.gate_up"], layer.experts.gate_up_proj.transpose(1, 2))
    assert torch.equal(fused["blocks.1.mlp.experts.down"], layer.experts.down_proj.transpose(1, 2))
    assert torch.equal(fused["blocks.1.mlp.router.weight"], layer.gate.weight)
    assert torch.equal(fused["blocks.2.attn.k_norm.weight"], ref.model.layers[2].self_attn.k_norm.weight)


def test_sharded_folder(transformers, tmp_path):
    ref = hf_model(transformers)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="500KB")  # 5.24 writes per-expert keys
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    _, expected = load_hf_olmoe(save_fused(ref, tmp_path / "fused"))
    _, sharded = load_hf_olmoe(tmp_path / "sharded")
    assert_same_state(expected, sharded)

    assert main(["convert", "from-hf", str(tmp_path / "sharded"), "--out", str(tmp_path / "ckpt")]) == 0
    assert_same_state(load_file(str(tmp_path / "ckpt" / "model.safetensors")), expected)

    next(iter(sorted((tmp_path / "sharded").glob("model-0*.safetensors")))).unlink()
    with pytest.raises(MoelabError, match="lacks shard model-0"):
        load_hf_olmoe(tmp_path / "sharded")


# ----------------------------------------------------------------------------- moelab -> transformers


@pytest.mark.parametrize("layout", ["fused", "per-expert"])
def test_to_hf_loads_in_transformers(transformers, tmp_path, layout):
    model = moelab_model()
    moelab.save_checkpoint(model, tmp_path / "ckpt")
    out = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", layout=layout)

    keys = load_file(str(out / "model.safetensors")).keys()
    fused_key = "model.layers.0.mlp.experts.gate_up_proj"
    assert (fused_key in keys) is (layout == "fused")
    assert ("model.layers.1.mlp.experts.7.up_proj.weight" in keys) is (layout == "per-expert")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["OlmoeForCausalLM"] and hf_config["model_type"] == "olmoe"
    assert hf_config["dtype"] == "float32"

    ref, info = transformers.OlmoeForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == info["mismatched_keys"] == set(), info
    assert not info["error_msgs"]
    assert ref.config.rope_parameters["rope_theta"] == 500.0 and ref.config.norm_topk_prob
    ref.config._attn_implementation = "eager"
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, ref.eval()(ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize(("layout", "dtype"), [("fused", torch.float32), ("per-expert", torch.bfloat16)])
def test_round_trip_is_bit_identical(tmp_path, layout, dtype):
    model = moelab_model(seed=3)
    for p in model.parameters():
        p.data = p.data.to(dtype)  # the balancing bias buffer stays fp32, as training keeps it
    moelab.save_checkpoint(model, tmp_path / "ckpt")
    hf = convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", layout=layout)
    assert json.loads((hf / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    back = convert_from_hf(hf, tmp_path / "back")
    assert_same_state(
        load_file(str(tmp_path / "ckpt/model.safetensors")), load_file(str(back / "model.safetensors"))
    )
    config_in = moelab.load_config(tmp_path / "ckpt")
    # from-hf keeps data.seq_len within the model's positions
    seq_len = f"data.seq_len={min(config_in.data.seq_len, config_in.model.max_seq_len)}"
    assert moelab.load_config(back) == moelab.load_config(config_in, ["model.attention=sdpa", seq_len])


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "lflb_bias", "why"),
    [
        (
            ["model.n_shared_experts=1"],
            False,
            "n_shared_experts=1: transformers' OLMoE has no shared experts",
        ),
        (
            ["model.n_dense_layers=1", "model.d_dense=64"],
            False,
            "n_dense_layers=1: transformers' OLMoE has no dense",
        ),
        (["model.qk_norm=false"], False, "always applies q/k norms"),
        ([], True, "blocks.1.mlp.router.balance_bias is non-zero"),
    ],
)
def test_to_hf_refuses_what_transformers_cannot_represent(tmp_path, overrides, lflb_bias, why):
    model = moelab_model(overrides=overrides)
    if lflb_bias:
        model.blocks[1].mlp.router.balance_bias[3] = 0.002  # one step of loss-free balancing
    moelab.save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(MoelabError, match=why):
        convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_to_hf_refusal_is_one_line(tmp_path, capsys):
    moelab.save_checkpoint(moelab_model(overrides=["model.n_shared_experts=1"]), tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["convert", "to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: ") and err.count("\n") == 1, err
    assert "n_shared_experts=1" in err
    assert not (tmp_path / "hf").exists()


def test_from_hf_refuses_missing_or_unsupported(transformers, tmp_path):
    with pytest.raises(MoelabError, match="does not exist"):
        convert_from_hf(tmp_path / "nowhere", tmp_path / "ckpt")
    folder = tmp_path / "hf"
    folder.mkdir()
    with pytest.raises(MoelabError, match="has no config.json"):
        load_hf_olmoe(folder)
    hf = transformers.OlmoeConfig(**HF_TINY).to_dict()
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(MoelabError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_hf_olmoe(folder)
    refused = [
        ({"clip_qkv": 8.0}, "clip_qkv"),
        ({"attention_bias": True}, "attention_bias"),
        ({"num_key_value_heads": 2}, "grouped-query"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}, "plain RoPE"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "plain RoPE"),
        ({"model_type": "mixtral"}, "model_type='mixtral'"),
    ]
    for change, why in refused:
        (folder / "config.json").write_text(json.dumps({**hf, **change}))
        with pytest.raises(MoelabError, match=why):
            load_hf_olmoe(folder)
    assert not (tmp_path / "ckpt").exists()
