"""Memory per rank of training a moelab config, and the all-to-all volume of expert parallelism.

A model of what each GPU holds, computed from a config: the model is built on the meta device with
`moelab.build`, so parameter counts are exact and nothing is allocated. Nothing here is measured.

Model states (moelab trains fp32 parameters under bf16 autocast, with torch.optim.AdamW):

  parameters   4 bytes/param (fp32)
  gradients    4 bytes/param (gradients have the parameters' dtype)
  AdamW        8 bytes/param (exp_avg and exp_avg_sq, fp32; the per-tensor `step` scalars are ignored)

P = P_routed + P_rest, where P_routed are the parameters of the routed experts (every `RoutedExperts`
module) and P_rest everything else (embedding, attention, norms, routers, shared experts, dense MLPs,
lm_head). A layout of W ranks says over how many ranks one copy of each part is divided, and which
`moelab train` settings give it (parallel.data_parallel, parallel.ep; `--nproc` / torchrun for W):

  ddp            rest 1, routed 1: every rank holds everything
  fsdp           rest W, routed W: parameters, gradients and AdamW states sharded by FSDP2
  ep=e, ddp      rest 1, routed e: each rank holds E/e experts of every MoE layer; the W/e ranks
                 holding the same experts average their gradients like the rest
  ep=e + FSDP    rest W, routed e·f (the experts' shards also FSDP-sharded over f = W/e ranks): a
                 layout moelab does not run (parallel.data_parallel=fsdp refuses ep > 1), shown for scale

Transient (per rank, on top of the sharded states). ddp: moelab averages the gradients once per
optimizer step with one flat all-reduce per group (train/distributed.py), so a flat fp32 copy of the
largest group exists meanwhile: the gradients of everything (ep=1), else max(rest, E/e experts when
W > e). fsdp: while a block runs its fp32 parameters are all-gathered (this unit and the prefetched
next: 2 units) and in backward its unsharded fp32 gradients exist before the reduce-scatter (1 unit):
3 · 4 bytes · the largest unit's gathered parameters (a unit = a block, or the root: embedding, final
norm and lm_head; a block's routed experts count with 1/e of their parameters when FSDP-sharded
beyond ep, and not at all when they are only split over ep ranks).

Checkpoint save (several ranks): the whole parameters and AdamW moments are gathered one tensor at a
time and moved to rank 0's CPU (train/distributed.py: full_state_dict, full_optimizer_state), so a
device holds at most one whole fp32 tensor beyond its shards: 4 bytes · the largest parameter tensor
when anything is sharded, 0 otherwise; rank 0's host memory holds 12 bytes · P. The last column is
the peak of a save step on a device: states + this (activations are freed).

Activations, for T = B·N tokens per rank per micro-batch under bf16 autocast: the tensors autograd
keeps for backward (and the logits the model returns), per token, in bytes:

  attention sub-block   8·D    attn_norm's fp32 input (the residual stream) and fp32 normalised value
                        2·D    its output cast to bf16 (the q/k/v projections' input)
                        2·6·D  q_norm, k_norm (qk_norm only): each its input's fp32 copy and bf16 output
                        2·4·D  q, k, v after RoPE and the attention output (SDPA keeps no N×N scores)
                        2·D    the heads merged back (o_proj's input)
  MLP sub-block         8·D    mlp_norm's fp32 input and normalised value
                        2·D    its output cast to bf16 (router / dense MLP input)
    MoE layer           12·E   router logits, probabilities and top-k selection input (fp32)
                        2·D    the routed experts' input cast to bf16
                        2·k·(3·D + 4·I)  per routed copy: gathered input, expert output, weighted output,
                                         gate|up (2I), silu(gate) (I), silu(gate)·up (I)
                        2·(D + 4·S·I)    shared experts (S·I wide): input cast, gate|up, silu, product
    dense layer         2·4·I_dense      gate|up, silu, product
  output                8·D + 2·D  the final norm's fp32 input and normalised value, bf16 cast
                        2·V  the bf16 logits (returned in the model output)
                        4·V  the fp32 log-softmax the cross-entropy keeps (the fp32 copy of the logits
                             and the logits' gradient exist only for a moment; not counted)
    chunked loss        with train.loss_chunk_tokens = c > 0 (moelab.models.lm_loss) no logits are kept:
                        per token 8·D + 4·D (norm values, fp32 hidden) + 4 (log-sum-exp), plus one
                        chunk's 10·c·V bytes (bf16 logits, fp32 logits, fp32 softmax) while it runs

tests/test_memory_model.py checks these terms against the tensors autograd really saves for small
models under CPU bf16 autocast (within 3%; the small integer tensors, ids and orders, are left out).

With activation checkpointing (train.activation_checkpointing) each block keeps only its input
(4·D per token, fp32) and one block's activations exist again while it is recomputed in backward:
L·4·D·T + the largest block's activations + the output term (either output term goes with either).

All-to-all of expert parallelism (e ranks, balanced routing; moe/expert_parallel.py): each of the T
tokens of a rank sends its k routed copies (D values of b bytes: the autocast dtype, bf16, b = 2) to
the rank holding the chosen expert, which is remote with probability (e−1)/e, with the expert's local
id (8 bytes, int64); the expert outputs come back the same way. Forward = dispatch + combine, backward
= the same two row exchanges for the gradients, so per MoE layer and micro-batch each rank sends

  V_layer = T · k · (e − 1)/e · (4 · D · b + 8)   bytes
            (T · k · (e − 1)/e · (6 · D · b + 16) with activation checkpointing, whose recomputed
             forward exchanges again)

and receives as much; per micro-batch V = L_moe · V_layer (the (e,) count exchanges are left out).

    python benchmarks/memory_model.py                                  # OLMoE-1B-7B and test-51
    python benchmarks/memory_model.py configs/tiny-cpu.yaml --tokens 3072
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import moelab  # noqa: E402
from moelab.moe.experts import RoutedExperts  # noqa: E402

PARAM_BYTES = 4  # fp32 parameters
GRAD_BYTES = 4  # gradients in the parameters' dtype
ADAM_BYTES = 8  # two fp32 moments
ACT_BYTES = 2  # bf16 autocast activations
ID_BYTES = 8  # an int64 expert id sent with each routed copy
FP32 = 4
GIB = 2**30
DEFAULT_CONFIGS = ("configs/olmoe-1b-7b.yaml", "configs/research/test-51.yaml")
DEFAULT_TOKENS = 8192  # tokens per rank per micro-batch (OLMoE: 2 × 4096; test-51: 4 × 2048)
DEFAULT_LOSS_CHUNK = 1024  # train.loss_chunk_tokens in the last column


@dataclass(frozen=True)
class Counts:
    """Exact parameter counts of a built model, and the shape numbers the activation formula needs."""

    total: int
    routed: int  # parameters of all RoutedExperts modules
    largest: int  # elements of the largest parameter tensor
    units: tuple[tuple[int, int], ...]  # per FSDP unit: (rest params, routed params)
    d_model: int  # D
    vocab: int  # V
    n_heads: int
    qk_norm: bool
    n_experts: int  # E
    top_k: int  # k
    d_expert: int  # I
    n_shared: int  # S
    d_dense: int
    n_dense_layers: int
    n_layers: int  # all blocks, dense + MoE

    @property
    def rest(self) -> int:
        return self.total - self.routed

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


def routed_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if isinstance(m, RoutedExperts) for p in m.parameters())


def count(config) -> Counts:
    """Build `config` on the meta device and count its parameters (no memory is allocated)."""
    with torch.device("meta"):
        model = moelab.build(config)
    total = sum(p.numel() for p in model.parameters())
    units = []
    for block in model.blocks:
        r = routed_params(block)
        units.append((sum(p.numel() for p in block.parameters()) - r, r))
    block_params = sum(a + b for a, b in units)
    units.append((total - block_params, 0))  # the root: embedding, final norm, lm_head
    mc = config.model
    return Counts(
        total=total,
        routed=routed_params(model),
        largest=max(p.numel() for p in model.parameters()),
        units=tuple(units),
        d_model=mc.d_model,
        vocab=mc.vocab_size,
        n_heads=mc.n_heads,
        qk_norm=mc.qk_norm,
        n_experts=mc.n_experts,
        top_k=mc.top_k,
        d_expert=mc.d_expert,
        n_shared=mc.n_shared_experts,
        d_dense=mc.d_dense,
        n_dense_layers=mc.n_dense_layers,
        n_layers=mc.n_total_layers,
    )


@dataclass(frozen=True)
class Layout:
    """How W ranks hold the model: one copy of the non-expert part is divided over `rest_shard` ranks,
    one copy of the routed experts over `routed_shard` ranks (= ep · expert FSDP degree)."""

    name: str
    world: int
    rest_shard: int
    routed_shard: int
    ep: int = 1
    ddp: bool = False  # gradients averaged by a flat all-reduce (a flat copy while it runs)
    runs: bool = True  # a layout `moelab train` runs (False: shown for scale only)


def layouts() -> list[Layout]:
    """The layouts of the table: 1 GPU, one node of 8, two nodes of 8."""
    return [
        Layout("1 GPU", 1, 1, 1),
        Layout("8 GPUs, ddp", 8, 1, 1, ddp=True),
        Layout("8 GPUs, fsdp", 8, 8, 8),
        Layout("8 GPUs, ep=8, ddp", 8, 1, 8, ep=8, ddp=True),
        Layout("8 GPUs, ep=8 + FSDP(8) rest", 8, 8, 8, ep=8, runs=False),
        Layout("2×8 GPUs, fsdp", 16, 16, 16),
        Layout("2×8 GPUs, ep=8, ddp", 16, 1, 8, ep=8, ddp=True),
        Layout("2×8 GPUs, ep=8 + FSDP(16) rest, experts FSDP ×2", 16, 16, 16, ep=8, runs=False),
    ]


def state_bytes(c: Counts, lay: Layout, per_param: int) -> float:
    """Bytes per rank of one model state of `per_param` bytes per parameter (params, grads or AdamW)."""
    return per_param * (c.rest / lay.rest_shard + c.routed / lay.routed_shard)


def transient_bytes(c: Counts, lay: Layout) -> float:
    """ddp: the flat gradient copy of the largest all-reduce group. FSDP: 3 unsharded fp32 units (2
    gathered parameter units + 1 unsharded gradient unit) of the largest unit; 0 on one rank."""
    if lay.world == 1:
        return 0.0
    if lay.ddp:
        if lay.ep == 1:
            return GRAD_BYTES * c.total
        return GRAD_BYTES * max(c.rest, c.routed / lay.ep if lay.world > lay.ep else 0)
    gathered = lay.routed_shard > lay.ep  # experts FSDP-sharded beyond ep are gathered too
    largest = max(rest + (routed / lay.ep if gathered else 0) for rest, routed in c.units)
    return 3 * PARAM_BYTES * largest


def checkpoint_gather_bytes(c: Counts, lay: Layout) -> float:
    """Extra device bytes per rank while a checkpoint is saved: one whole fp32 tensor at a time (the
    largest parameter, an upper bound) when some tensor is sharded; 0 when every tensor is whole."""
    if lay.rest_shard == 1 and lay.routed_shard == 1:
        return 0.0
    return PARAM_BYTES * c.largest


def block_act_bytes(c: Counts, dense: bool) -> int:
    """Activation bytes per token kept by one block (see the module docstring)."""
    D, b = c.d_model, ACT_BYTES
    attn = FP32 * 2 * D + b * D + (b * 6 * D if c.qk_norm else 0) + b * 4 * D + b * D
    mlp = FP32 * 2 * D + b * D
    if dense:
        mlp += b * 4 * c.d_dense
    else:
        mlp += 3 * FP32 * c.n_experts + b * D
        mlp += b * c.top_k * (3 * D + 4 * c.d_expert)
        if c.n_shared:
            mlp += b * (D + 4 * c.n_shared * c.d_expert)
    return attn + mlp


def output_act_bytes(c: Counts, tokens: int, loss_chunk: int = 0) -> int:
    """The output term for `tokens` tokens. Plain: per token the final norm's fp32 input and normalised
    value and bf16 cast, the bf16 logits, the fp32 log-softmax. Chunked (loss_chunk > 0): per token the
    norm's values, the fp32 hidden state and a log-sum-exp, plus one chunk's three (chunk, V) tensors."""
    D, V = c.d_model, c.vocab
    if loss_chunk <= 0:
        return tokens * (FP32 * 2 * D + ACT_BYTES * D + (ACT_BYTES + FP32) * V)
    return tokens * (FP32 * 3 * D + FP32) + min(loss_chunk, tokens) * (ACT_BYTES + FP32 + FP32) * V


def activation_bytes(c: Counts, tokens: int, checkpointing: bool, loss_chunk: int = 0) -> int:
    """Activation bytes per rank for `tokens` tokens per micro-batch."""
    per_block = [block_act_bytes(c, i < c.n_dense_layers) for i in range(c.n_layers)]
    out = output_act_bytes(c, tokens, loss_chunk)
    if not checkpointing:
        return tokens * sum(per_block) + out
    return tokens * (c.n_layers * FP32 * c.d_model + max(per_block)) + out


def all_to_all_bytes(
    tokens: int, top_k: int, d_model: int, ep: int, dtype_bytes: int, moe_layers: int = 1, recompute=False
) -> float:
    """Bytes each rank sends per micro-batch: T · k · (ep−1)/ep · (4·D·b + 8) · L_moe (rows of the
    dispatch, combine and their two gradients, plus the int64 expert ids); with recompute (activation
    checkpointing) the forward's rows and ids go twice: (6·D·b + 16)."""
    rows, ids = (6, 2) if recompute else (4, 1)
    per_pair = rows * d_model * dtype_bytes + ids * ID_BYTES
    return tokens * top_k * (ep - 1) / ep * per_pair * moe_layers


def fsdp_bytes(c: Counts, world: int) -> float:
    """Bytes each rank receives per micro-batch under FSDP2 (fp32, no mixed-precision policy): every
    parameter all-gathered in forward and again in backward, every gradient reduce-scattered:
    3 · 4 · P · (W − 1)/W."""
    return 3 * PARAM_BYTES * c.total * (world - 1) / world


def gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def report(path: str, tokens: int, loss_chunk: int) -> str:
    """The markdown table and the all-to-all lines for one config."""
    config = moelab.load_config(path)
    c = count(config)
    act, act_ckpt = activation_bytes(c, tokens, False), activation_bytes(c, tokens, True)
    act_chunk = activation_bytes(c, tokens, True, loss_chunk)
    lines = [
        f"### {path}",
        "",
        f"- parameters: {c.total:,} total, {c.routed:,} in routed experts, {c.rest:,} other; "
        f"{c.n_layers} blocks ({c.n_moe_layers} MoE), D={c.d_model}, E={c.n_experts}, k={c.top_k}, "
        f"I={c.d_expert}, S={c.n_shared}, V={c.vocab}; routed experts {100 * c.routed / c.total:.1f}%",
        f"- activations for T = {tokens:,} tokens per rank per micro-batch: {gib(act)} GiB, "
        f"{gib(act_ckpt)} GiB with activation checkpointing, {gib(act_chunk)} GiB with checkpointing and "
        f"train.loss_chunk_tokens={loss_chunk}; of these the plain output term (final norm, bf16 logits, "
        f"fp32 log-softmax) is {gib(output_act_bytes(c, tokens))} GiB",
        "",
        "| layout | params | grads | AdamW | transient | states + transient | + activations "
        "| + activations (ckpt) | + activations (ckpt, chunked loss) | checkpoint save |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lay in layouts():
        p, g, o = (state_bytes(c, lay, n) for n in (PARAM_BYTES, GRAD_BYTES, ADAM_BYTES))
        t = transient_bytes(c, lay)
        s = p + g + o + t
        save = p + g + o + checkpoint_gather_bytes(c, lay)
        name = lay.name if lay.runs else f"{lay.name} (not in moelab)"
        lines.append(
            f"| {name} | {gib(p)} | {gib(g)} | {gib(o)} | {gib(t)} | {gib(s)} | {gib(s + act)} "
            f"| {gib(s + act_ckpt)} | {gib(s + act_chunk)} | {gib(save)} |"
        )
    lines += ["", "All-to-all per rank per micro-batch (bf16, b = 2; sent, and as much received):", ""]
    for ep in (2, 8, 16):
        v = all_to_all_bytes(tokens, c.top_k, c.d_model, ep, ACT_BYTES, c.n_moe_layers)
        v_ckpt = all_to_all_bytes(tokens, c.top_k, c.d_model, ep, ACT_BYTES, c.n_moe_layers, True)
        lines.append(
            f"- ep={ep}: {tokens:,}·{c.top_k}·{ep - 1}/{ep}·(4·{c.d_model}·2 + 8)·{c.n_moe_layers} = "
            f"{gib(v)} GiB ({gib(v_ckpt)} GiB with activation checkpointing)"
        )
    lines += ["", "FSDP2 traffic per rank per micro-batch, for comparison (parameters, not tokens):", ""]
    for world in (8, 16):
        f = fsdp_bytes(c, world)
        v8 = all_to_all_bytes(tokens, c.top_k, c.d_model, 8, ACT_BYTES, c.n_moe_layers)
        lines.append(
            f"- W={world}: 3·4·{c.total:,}·{world - 1}/{world} = {gib(f)} GiB; the ep=8 all-to-all "
            f"reaches it at T = {tokens * f / v8:,.0f} tokens per rank"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    ap.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per rank per micro-batch (B·N)"
    )
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=DEFAULT_LOSS_CHUNK,
        help="train.loss_chunk_tokens for the last column",
    )
    args = ap.parse_args(argv)
    print("GiB per rank; states = fp32 params + fp32 grads + AdamW (2 fp32 moments); activations bf16.\n")
    for path in args.configs:
        print(report(path, args.tokens, args.loss_chunk))
    return 0


if __name__ == "__main__":
    sys.exit(main())
