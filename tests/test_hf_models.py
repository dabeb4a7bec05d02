"""Routing capture for transformers MoE families, checked against the models' own computations.

Each family is a tiny random config saved with save_pretrained. The reference for the ids is what the
experts module actually received (recorded by a pre-hook on `mlp.experts`, independent of the code under
test); the reference for the router logits is the gate's weight applied to the gate's recorded input.
"""

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from moelab.errors import MoelabError
from moelab.interp.hf_models import (
    SUPPORTED,
    is_hf_moe_dir,
    load_hf_moe,
    renormalizes,
    routing_from_router_output,
    select_experts,
)

VOCAB = 100
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
# name: (model_type, family-specific config, decoder layers that must be MoE layers)
CASES = {
    "olmoe": ("olmoe", dict(intermediate_size=16, num_experts=8), [0, 1, 2]),
    "mixtral": ("mixtral", dict(intermediate_size=16, num_local_experts=6), [0, 1, 2]),
    "qwen2_moe-shared-dense1": (
        "qwen2_moe",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=8,
            mlp_only_layers=[1],
        ),
        [0, 2],
    ),  # fmt: skip
    "qwen3_moe-norm": (
        "qwen3_moe",
        dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4, norm_topk_prob=True, head_dim=8),
        [0, 1, 2],
    ),
    "qwen3_moe-nonorm-step2": (
        "qwen3_moe",
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=8,
            norm_topk_prob=False,
            head_dim=8,
            decoder_sparse_step=2,
        ),
        [1],
    ),  # fmt: skip
}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, transformers, tmp_path_factory):
    """(name, the plain transformers model, the folder it was saved to, expected MoE layer indices)."""
    model_type, extra, moe_layers = CASES[request.param]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # a sharper router than the init's, so top-k choices are far from ties
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path, moe_layers


def _record_experts(model):
    """Pre-hooks on every sparse block's experts module, recording (top_k_index, top_k_weights)."""
    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    calls, gate_inputs, hooks = [], [], []
    for block in blocks:
        hooks.append(
            block.experts.register_forward_pre_hook(lambda _m, args: calls.append((args[1], args[2])))
        )
        hooks.append(block.gate.register_forward_pre_hook(lambda m, args: gate_inputs.append((m, args[0]))))
    return calls, gate_inputs, hooks


def test_routing_matches_what_the_experts_received(family):
    name, plain, path, moe_layers = family
    hf = load_hf_moe(path)
    model_type, extra, _ = CASES[name]
    assert hf.model_type == model_type and hf.vocab_size == VOCAB and hf.top_k == 2
    assert hf.n_experts == extra.get("num_experts", extra.get("num_local_experts"))
    assert hf.n_layers == len(moe_layers) and hf.layer_indices == moe_layers

    x = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    calls, gate_inputs, hooks = _record_experts(hf.model)
    try:
        logits, routing = hf.route(x)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        reference = plain(x).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-6)
    assert logits.shape == (2, 9, VOCAB)

    assert len(routing) == len(calls) == len(moe_layers)
    for layer, info, (used_ids, used_weights), (gate, gate_in) in zip(
        moe_layers, routing, calls, gate_inputs, strict=True
    ):
        assert info.extra["layer_index"] == layer
        assert info.router_logits.dtype == torch.float32 and info.router_logits.shape == (18, hf.n_experts)
        assert info.topk_ids.dtype == torch.long and info.topk_ids.shape == (18, 2)
        assert torch.equal(info.topk_ids, used_ids.long())
        torch.testing.assert_close(info.topk_weights, used_weights, rtol=0, atol=0)
        # the logits are the gate's own linear map of its input (no shared-expert gate mixed in)
        gate_logits = F.linear(gate_in.reshape(-1, gate_in.shape[-1]), gate.weight).float()
        torch.testing.assert_close(info.router_logits, gate_logits, rtol=1e-6, atol=1e-6)
        # softmax of the recorded logits gives the weights the experts were mixed with
        chosen = info.router_logits.softmax(-1).gather(1, info.topk_ids)  # (T, k)
        if renormalizes(hf.config):
            chosen = chosen / chosen.sum(-1, keepdim=True)
        torch.testing.assert_close(chosen, info.topk_weights.float(), rtol=1e-6, atol=1e-7)
        # and the ids are the k largest probabilities, in decreasing order
        top = torch.topk(info.router_logits, 2, dim=-1)
        assert torch.equal(top.indices, info.topk_ids)
        if model_type == "mixtral":  # normalised top-k probabilities == softmax over the k chosen logits
            torch.testing.assert_close(
                top.values.softmax(-1), info.topk_weights.float(), rtol=1e-6, atol=1e-7
            )


def test_family_rule_reproduces_the_router(family):
    """select_experts (used for routers that return logits only) equals each 5.x router's choice."""
    _, _, path, _ = family
    hf = load_hf_moe(path)
    x = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    _, routing = hf.route(x)
    for info in routing:
        ids, weights = select_experts(info.router_logits, hf.top_k, renormalizes(hf.config))
        assert torch.equal(ids, info.topk_ids)
        torch.testing.assert_close(weights, info.topk_weights.float(), rtol=0, atol=1e-7)
        from_logits = routing_from_router_output(info.router_logits.clone(), hf.top_k, hf.normalize)
        assert torch.equal(from_logits.topk_ids, info.topk_ids)


def test_padding_leaves_valid_rows_as_an_unpadded_run(family):
    """Rows: a full sequence, a right-padded and a left-padded short one; valid rows match lone runs."""
    _, _, path, _ = family
    hf = load_hf_moe(path)
    g = torch.Generator().manual_seed(3)
    full, short = torch.randint(3, VOCAB, (8,), generator=g), torch.randint(3, VOCAB, (5,), generator=g)
    pad = torch.full((3,), 0)
    x = torch.stack([full, torch.cat([short, pad]), torch.cat([pad, short])])  # (3, 8)
    mask = torch.stack([torch.ones(8), torch.arange(8) < 5, torch.arange(8) >= 3]).long()  # (3, 8)
    logits, routing = hf.route(x, attention_mask=mask)

    full_logits, full_routing = hf.route(full[None])  # (1, 8), unpadded
    alone_logits, alone_routing = hf.route(short[None])  # (1, 5), unpadded
    torch.testing.assert_close(logits[0], full_logits[0], rtol=1e-4, atol=1e-5)
    for row in (1, 2):
        valid = mask[row].bool()
        torch.testing.assert_close(logits[row][valid], alone_logits[0], rtol=1e-4, atol=1e-5)
    for info, whole, alone in zip(routing, full_routing, alone_routing, strict=True):
        ids, router_logits = info.topk_ids.reshape(3, 8, -1), info.router_logits.reshape(3, 8, -1)
        assert torch.equal(ids[0], whole.topk_ids)
        for row in (1, 2):
            valid = mask[row].bool()
            assert torch.equal(ids[row][valid], alone.topk_ids)
            torch.testing.assert_close(router_logits[row][valid], alone.router_logits, rtol=1e-4, atol=1e-5)


def test_routing_only_mode_and_bf16(family):
    _, _, path, _ = family
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    full = load_hf_moe(path)
    _, reference = full.route(x)
    logits, routing = full.route(x, with_logits=False)
    assert logits is None
    for a, b in zip(routing, reference, strict=True):
        assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.router_logits, b.router_logits)

    half = load_hf_moe(path, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    calls, _, hooks = _record_experts(half.model)
    try:
        logits, routing = half.route(x)
    finally:
        for h in hooks:
            h.remove()
    assert logits.dtype == torch.bfloat16
    for info, (used_ids, _) in zip(routing, calls, strict=True):
        assert info.router_logits.dtype == torch.float32
        assert torch.equal(info.topk_ids, used_ids.long())


def test_is_hf_moe_dir(family, tmp_path):
    _, _, path, _ = family
    assert is_hf_moe_dir(path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_hf_moe_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "olmoe"}))
    assert is_hf_moe_dir(tmp_path)
    (tmp_path / "config.yaml").write_text("model: {}\n")  # a moelab checkpoint exported beside its config
    assert not is_hf_moe_dir(tmp_path)
    assert not is_hf_moe_dir(tmp_path / "missing")


def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="not a directory"):
        load_hf_moe(tmp_path / "missing")
    with pytest.raises(MoelabError, match="missing or not JSON"):
        load_hf_moe(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MoelabError, match="model_type='llama'.*" + ", ".join(SUPPORTED)):
        load_hf_moe(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(MoelabError, match="dtype 'int8'"):
        load_hf_moe(tmp_path, dtype="int8")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails as if not installed
    with pytest.raises(MoelabError, match=r"pip install 'moelab\[hf\]'"):
        load_hf_moe(tmp_path)


def test_missing_weights_is_a_user_error(transformers, tmp_path):
    config = transformers.AutoConfig.for_model("olmoe", **COMMON, intermediate_size=16, num_experts=4)
    config.save_pretrained(tmp_path)
    with pytest.raises(MoelabError, match="could not load"):
        load_hf_moe(tmp_path)


def test_trace_router_predicts_the_argmax(family):
    """`moelab trace --predictions` on a transformers folder: the router's predicted ids are the argmax of
    a plain forward's logits, and its routing equals the routing-only run's."""
    from moelab.interp.trace import open_router

    _, model, path, _ = family
    x = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    router = open_router(path, device="cpu")
    routing, predicted = router.predict(x, None)
    with torch.no_grad():
        want = model(x).logits.argmax(-1)
    assert torch.equal(predicted, want)
    for a, b in zip(routing, router.route(x, None), strict=True):
        assert torch.equal(a.topk_ids, b.topk_ids)
