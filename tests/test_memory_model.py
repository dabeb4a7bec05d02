"""benchmarks/memory_model.py against hand computations for a tiny config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moelab

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model as mm  # noqa: E402

# V, D, heads, I, E, k, shared S, dense width, 1 dense + 2 MoE blocks
V, D, H, I, E, K, S, ID, L = 64, 16, 2, 8, 4, 2, 1, 32, 3
OVERRIDES = [
    f"model.vocab_size={V}",
    f"model.d_model={D}",
    f"model.n_heads={H}",
    f"model.d_expert={I}",
    f"model.n_experts={E}",
    f"model.top_k={K}",
    f"model.n_shared_experts={S}",
    "model.n_dense_layers=1",
    f"model.d_dense={ID}",
    f"model.n_layers={L - 1}",
    "model.qk_norm=true",
    "model.eos_token_id=0",
    "model.pad_token_id=1",
]

# by hand: attention 4·D² + 4 norms of D per block; dense MLP 3·D·ID; MoE router E·D, routed
# experts E·3·D·I, shared 3·D·S·I; embedding and lm_head V·D each, final norm D
ATTN = 4 * D * D + 4 * D
DENSE_BLOCK = ATTN + 3 * D * ID
ROUTED_PER_LAYER = E * 3 * D * I
MOE_REST = ATTN + E * D + 3 * D * S * I
ROUTED = 2 * ROUTED_PER_LAYER
TOTAL = 2 * V * D + D + DENSE_BLOCK + 2 * (MOE_REST + ROUTED_PER_LAYER)


@pytest.fixture(scope="module")
def counts():
    return mm.count(moelab.load_config(None, OVERRIDES))


def test_parameter_counts_by_hand(counts):
    assert (counts.total, counts.routed, counts.rest) == (TOTAL, ROUTED, TOTAL - ROUTED)
    model = moelab.build(moelab.load_config(None, OVERRIDES))  # a real build agrees with the meta one
    assert model.count_parameters()["total"] == TOTAL
    assert counts.units == (
        (DENSE_BLOCK, 0),
        (MOE_REST, ROUTED_PER_LAYER),
        (MOE_REST, ROUTED_PER_LAYER),
        (2 * V * D + D, 0),  # the root unit: embedding, final norm, lm_head
    )


def test_state_bytes_by_layout(counts):
    one, ddp, fsdp, ep8, ep8_fsdp, fsdp16, ep8_16, ep8_fsdp16 = mm.layouts()
    rest = TOTAL - ROUTED
    for per_param in (4, 4, 8):  # params, grads, AdamW
        assert mm.state_bytes(counts, one, per_param) == per_param * TOTAL
        assert mm.state_bytes(counts, ddp, per_param) == per_param * TOTAL
        assert mm.state_bytes(counts, fsdp, per_param) == pytest.approx(per_param * TOTAL / 8)
        assert mm.state_bytes(counts, ep8, per_param) == pytest.approx(per_param * (rest + ROUTED / 8))
        assert mm.state_bytes(counts, ep8_fsdp, per_param) == pytest.approx(per_param * TOTAL / 8)
        assert mm.state_bytes(counts, fsdp16, per_param) == pytest.approx(per_param * TOTAL / 16)
        assert mm.state_bytes(counts, ep8_16, per_param) == pytest.approx(per_param * (rest + ROUTED / 8))
        assert mm.state_bytes(counts, ep8_fsdp16, per_param) == pytest.approx(per_param * TOTAL / 16)


def test_transient_bytes(counts):
    one, ddp, fsdp, ep8, ep8_fsdp, fsdp16, ep8_16, ep8_fsdp16 = mm.layouts()
    rest, root = TOTAL - ROUTED, 2 * V * D + D
    assert mm.transient_bytes(counts, one) == 0
    # ddp: a flat copy of all gradients; with ep=8 on 8 ranks only the rest is all-reduced, on 16 ranks
    # the experts' shard (ROUTED / 8) too, one group after the other
    assert mm.transient_bytes(counts, ddp) == 4 * TOTAL
    assert mm.transient_bytes(counts, ep8) == 4 * rest
    assert mm.transient_bytes(counts, ep8_16) == 4 * max(rest, ROUTED / 8)
    largest = max(DENSE_BLOCK, MOE_REST + ROUTED_PER_LAYER, root)
    assert mm.transient_bytes(counts, fsdp) == 3 * 4 * largest
    assert mm.transient_bytes(counts, fsdp16) == 3 * 4 * largest
    # experts only split over ep: nothing gathered for them; FSDP over 2 beyond ep: 1/8 gathered
    assert mm.transient_bytes(counts, ep8_fsdp) == 3 * 4 * max(DENSE_BLOCK, MOE_REST, root)
    assert mm.transient_bytes(counts, ep8_fsdp16) == pytest.approx(
        3 * 4 * max(DENSE_BLOCK, MOE_REST + ROUTED_PER_LAYER / 8, root)
    )


def test_checkpoint_gather_bytes(counts):
    one, ddp, fsdp, ep8, ep8_fsdp, fsdp16, ep8_16, ep8_fsdp16 = mm.layouts()
    # largest tensor by hand: embedding / lm_head V·D, dense gate_up D·2·ID, experts' gate_up E·D·2I
    largest = max(V * D, D * 2 * ID, E * D * 2 * I, D * D)
    assert counts.largest == largest
    assert mm.checkpoint_gather_bytes(counts, one) == 0
    assert mm.checkpoint_gather_bytes(counts, ddp) == 0  # every tensor is already whole
    for lay in (fsdp, ep8, ep8_16, ep8_fsdp16):  # one gathered fp32 tensor at a time, then to CPU
        assert mm.checkpoint_gather_bytes(counts, lay) == 4 * largest


def test_activation_formula(counts):
    T = 100
    # attn_norm fp32 in + normalised, bf16 cast, q/k norms (fp32 copy + bf16 out each), q/k/v + SDPA out,
    # merged heads
    attn = 4 * 2 * D + 2 * D + 2 * 6 * D + 2 * 4 * D + 2 * D
    mlp_in = 4 * 2 * D + 2 * D  # mlp_norm fp32 in + normalised, bf16 cast
    dense = attn + mlp_in + 2 * 4 * ID
    # router (3 fp32 (T, E)), experts' input cast, per copy 3 bf16 (D) + 4 bf16 (I), shared experts
    moe = attn + mlp_in + 3 * 4 * E + 2 * D + 2 * K * (3 * D + 4 * I) + 2 * (D + 4 * S * I)
    head = 4 * 2 * D + 2 * D + (2 + 4) * V  # final norm values + cast, bf16 logits, fp32 log-softmax
    assert mm.activation_bytes(counts, T, checkpointing=False) == T * (dense + 2 * moe + head)
    assert mm.activation_bytes(counts, T, checkpointing=True) == T * (L * 4 * D + max(dense, moe) + head)
    # chunked loss, 30 tokens a chunk: norm values, fp32 hidden, log-sum-exp per token + one chunk's logits
    chunked = T * (4 * 2 * D + 4 * D + 4) + 30 * (2 + 4 + 4) * V
    assert mm.activation_bytes(counts, T, False, loss_chunk=30) == T * (dense + 2 * moe) + chunked
    assert mm.activation_bytes(counts, T, True, loss_chunk=30) == T * (L * 4 * D + max(dense, moe)) + chunked


def saved_activation_bytes(config, tokens: int, seq: int) -> int:
    """Bytes of the distinct storages autograd saves in one bf16-autocast forward with the loss on CPU,
    plus the returned logits; parameters and autocast's bf16 copies of them are left out."""
    torch.manual_seed(0)
    model = moelab.build(config).train()
    ids = torch.randint(2, config.model.vocab_size, (tokens // seq, seq))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    shapes |= {s[::-1] for s in shapes}  # transposed weight copies (lm_head's for the logits)
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
            seen[st.data_ptr()] = st.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    if out.logits is not None:
        seen[out.logits.untyped_storage().data_ptr()] = out.logits.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.qk_norm=false"],
        ["model.n_shared_experts=1", "model.n_dense_layers=1", "model.d_dense=384"],
        ["train.loss_chunk_tokens=128"],
    ],
    ids=["tiny", "no-qk-norm", "shared+dense", "chunked-loss"],
)
def test_activation_formula_against_autograd(overrides):
    """The documented formula within 3% of what autograd keeps (it leaves out small integer tensors:
    token ids, top-k indices, sort orders); the chunk's transient logits are not saved, so they are
    taken out of the formula here."""
    config = moelab.load_config("configs/tiny-cpu.yaml", overrides)
    tokens, seq = 480, 160  # T unlike any weight dimension (weight copies are told apart by shape)
    chunk = config.train.loss_chunk_tokens
    formula = mm.activation_bytes(mm.count(config), tokens, False, chunk)
    if chunk:
        formula -= chunk * (2 + 4 + 4) * config.model.vocab_size
    measured = saved_activation_bytes(config, tokens, seq)
    assert formula == pytest.approx(measured, rel=0.03), (formula, measured)


def test_all_to_all_formula():
    # T=1000 tokens, k=2, D=16, ep=4, bf16, 3 MoE layers: 4 row exchanges of 16·2 bytes per copy,
    # 1000·2 copies, 3/4 of them remote
    # plus an 8-byte expert id per remote copy (twice with recompute)
    assert mm.all_to_all_bytes(1000, 2, 16, 4, 2, 3) == 1000 * 2 * 3 / 4 * (4 * 16 * 2 + 8) * 3
    assert (
        mm.all_to_all_bytes(1000, 2, 16, 4, 2, 3, recompute=True) == 1000 * 2 * 3 / 4 * (6 * 16 * 2 + 16) * 3
    )
    assert mm.all_to_all_bytes(1000, 2, 16, 1, 2, 3) == 0  # one rank: nothing leaves


def test_fsdp_bytes(counts):
    assert mm.fsdp_bytes(counts, 8) == pytest.approx(3 * 4 * TOTAL * 7 / 8)
    assert mm.fsdp_bytes(counts, 1) == 0


def test_report_runs(counts, capsys):
    assert mm.main(["configs/tiny-cpu.yaml", "--tokens", "3072"]) == 0
    out = capsys.readouterr().out
    assert "5,511,296 total" in out and "| 8 GPUs, fsdp |" in out and "(not in moelab)" in out
