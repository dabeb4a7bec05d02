"""Whole training steps: forward + backward + AdamW of a moelab model against transformers' OLMoE.

One training step = zero the gradients, forward with the loss, backward, torch.optim.AdamW step, on the
same weights and the same batch for every implementation:

  moelab loop | sorted | grouped    moelab.build(config) with moe.dispatch set to that path
  transformers <experts impl>       OlmoeForCausalLM with each experts implementation transformers
                                    registers (5.24: eager, batched_mm, grouped_mm, deepgemm, sonicmoe);
                                    those that cannot run here are skipped with the reason printed

The objective is the same everywhere: next-token cross-entropy (moelab gets labels already shifted,
transformers shifts them itself) + 0.01 × the load-balancing loss in transformers' convention
(moelab `moe.load_balance=hf_concat`; transformers `output_router_logits=True`,
`router_aux_loss_coef=0.01`). transformers' OLMoE has no router z-loss, so moelab runs with
`moe.z_loss_coef=0`. The optimizer is AdamW(lr=4e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
over all parameters, foreach left at torch's default. transformers runs with `use_cache=False` (no KV
cache is built in training). Only moelab's public surfaces are used: `moelab.load_config`,
`moelab.build`, `model(input_ids, labels=...)` and `moelab.hf.to_hf_state_dict` / `config_to_hf`.

Before timing, every implementation must agree with transformers' per-expert loop (`eager`): the loss
and its two terms (fp32: rtol 1e-5), the gradient of every parameter (fp32: atol 1e-5, moelab's
gradients mapped to transformers' names and layouts by `to_hf_state_dict`), and the parameters after
one AdamW step (atol 1e-5 on top of lr·|Δg|/eps: Adam's first step g/(|g| + eps) turns a 1e-9 rounding
difference of a near-zero gradient into up to lr/10 of movement). A counter on torch._grouped_mm
(what torch.nn.functional.grouped_mm calls) shows which implementations really ran grouped_mm; a row
that should have and did not is marked "(fallback)".

Timing: `--warmup` untimed rounds, then `--repeats` rounds; each round runs one step of every
implementation in turn (interleaved, so a noisy phase of a shared machine hits all alike; the order is
reversed every other round) and one
2048×2048 @ 2048×2048 matmul in the timed dtype, the machine's matmul rate measured in the same
conditions. Reported: the median step time and its phases (forward incl. loss, backward, zero_grad +
optimizer step; medians of each phase), tokens/s, the speed-up against the fastest transformers
experts implementation (> 1 = faster), and model FLOP/s as a percentage of the measured matmul rate.
Model FLOPs per token are PaLM's 6·N + 12·n_layers·d_model·seq_len, where N is the active parameter
count (`model.count_parameters()["active"]`: all non-routed parameters + top_k/E of the routed expert
parameters) minus the input embedding table, a lookup that does no multiply-adds (the untied lm_head
does count); the attention term counts the full, unmasked seq_len × seq_len score and value products.

Precision: `--dtype fp32` runs everything in fp32. `--dtype bf16` casts the parameters of both models
to bf16 (so activations, gradients and AdamW states are bf16 too) rather than using autocast:
transformers' grouped_mm experts cast their input to the weight dtype, so under autocast with fp32
weights they would run in fp32 while moelab's run in bf16, and the comparison would measure that rather
than the implementations. The bf16 models are checked again at bf16 tolerances (loss rtol 2e-2,
gradient relative error 5e-2) after the fp32 check. bf16 runs on CPU too, slowly (it is meant for CUDA).

    python benchmarks/train_step.py                               # both shapes, fp32, CPU (~3 min on 2 cores)
    python benchmarks/train_step.py --out docs/BENCHMARKS.md      # and rewrite its results block there
    python benchmarks/train_step.py --device cuda --dtype bf16 --repeats 20 --warmup 3
    python benchmarks/train_step.py --quick --out /tmp/train_step.md   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import GroupedMMCounter, machine, sync, update_doc  # noqa: E402

import moelab  # noqa: E402
import moelab.hf  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int  # V
    d_model: int  # D
    n_layers: int  # L (every layer is MoE)
    n_heads: int
    d_expert: int  # I
    n_experts: int  # E
    top_k: int  # k
    batch: int  # B sequences per step
    seq_len: int  # N tokens per sequence

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def describe(self) -> str:
        return (
            f"E={self.n_experts}, k={self.top_k}, V={self.vocab}, D={self.d_model}, L={self.n_layers}, "
            f"{self.n_heads} heads, I={self.d_expert}, batch {self.batch}×{self.seq_len}"
        )


SHAPES = {
    "small": Shape("small", 8192, 128, 2, 4, 256, 8, 2, 4, 256),
    # OLMoE-1B-7B's routing (64 experts, top-8), narrower and shallower; 2,048 tokens keep the full run
    # (transformers eager takes ~10 s a step here) within ~5 minutes on 2 cores
    "olmoe": Shape("olmoe", 8192, 512, 2, 8, 256, 64, 8, 2, 1024),
}
QUICK_SEQ_DIVISOR = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOELAB_PATHS = ("loop", "sorted", "grouped")
LOAD_BALANCE_COEF = 0.01
EOS_ID, PAD_ID = 0, 1
ADAMW = {"lr": 4e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
MATMUL_N = 2048
# agreement with transformers eager: (loss rtol, gradient tolerance, parameter-after-step atol)
FP32_TOL = {"loss_rtol": 1e-5, "grad_atol": 1e-5, "param_atol": 1e-5}
BF16_TOL = {"loss_rtol": 2e-2, "grad_rel": 5e-2}
SECTION_HEADING = "## Whole training step: forward + backward + AdamW"
AFTER_SECTION = "## MoE layer: forward + backward"  # the new section goes after this one, when present
SECTION_INTRO = """\
`benchmarks/train_step.py` times whole training steps (zero_grad, forward with the loss, backward,
`torch.optim.AdamW` step) of a moelab model, for each `moe.dispatch` path, against transformers'
`OlmoeForCausalLM` with each of its experts implementations that runs on the machine, on the same
weights and the same batch. The objective is identical (next-token cross-entropy + 0.01 × the
load-balancing loss in transformers' convention, `moe.load_balance=hf_concat`; no router z-loss, which
transformers' OLMoE lacks, so moelab runs with `moe.z_loss_coef=0`), as is the optimizer (lr 4e-4,
betas 0.9/0.95, weight decay 0.1 on all parameters). Before timing, every implementation must agree
with transformers' per-expert loop on the loss (fp32, rtol 1e-5), on every parameter's gradient (atol
1e-5) and on the parameters after one AdamW step (atol 1e-5 beyond lr·|Δg|/eps, the most a gradient
difference can move Adam's first step). Implementations run interleaved within each repeat, in
reversed order every other repeat. The table gives the median step and its phases (`fwd` includes the
loss, `opt` includes zero_grad), tokens/s, `× tf-best` (the speed-up against the fastest transformers
experts implementation; > 1 = faster) and `% peak`: model FLOP/s (PaLM's 6·N + 12·L·D·seq_len per
token, N = active parameters without the input embedding) over the rate of a 2048² fp32 matmul
measured in the same rounds. transformers' `batched_mm` gathers one weight matrix per (token, expert)
pair and is skipped where that would not fit in memory; `deepgemm` and `sonicmoe` need CUDA kernels
from the Hub and are skipped on CPU.
"""


# ----------------------------------------------------------------------------- building the models


def moelab_config(shape: Shape, dispatch: str):
    """The moelab config of a shape; only documented config keys are used."""
    return moelab.load_config(
        None,
        [
            f"model.vocab_size={shape.vocab}",
            f"model.d_model={shape.d_model}",
            f"model.n_layers={shape.n_layers}",
            f"model.n_heads={shape.n_heads}",
            f"model.d_expert={shape.d_expert}",
            f"model.n_experts={shape.n_experts}",
            f"model.top_k={shape.top_k}",
            f"model.max_seq_len={shape.seq_len}",
            "model.norm_topk_prob=false",
            f"model.pad_token_id={PAD_ID}",
            f"model.eos_token_id={EOS_ID}",
            f"moe.dispatch={dispatch}",
            "moe.load_balance=hf_concat",
            f"moe.load_balance_coef={LOAD_BALANCE_COEF}",
            "moe.z_loss_coef=0",  # transformers' OLMoE has no router z-loss
            "moe.lflb=false",
        ],
    )


def hand_active_params(shape: Shape) -> int:
    """Active parameters by hand: embeddings, final norm, and per layer attention (q, k, v, o and the
    q/k norms), the two block norms, the router and k of E SwiGLU experts (3·D·I each)."""
    s = shape
    per_layer = (
        4 * s.d_model**2 + 4 * s.d_model + s.n_experts * s.d_model + s.top_k * 3 * s.d_model * s.d_expert
    )
    return 2 * s.vocab * s.d_model + s.d_model + s.n_layers * per_layer


def transformers_candidates() -> tuple[list[str], dict[str, str]]:
    """Experts implementations transformers registers, and those skipped up front with the reason."""
    names, skipped = ["eager"], {}
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        names += sorted(ALL_EXPERTS_FUNCTIONS.keys())
    except ImportError:  # another transformers layout: the two that 5.x always has
        names += ["batched_mm", "grouped_mm"]
    try:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

        for name in sorted(set(ALL_FP8_EXPERTS_FUNCTIONS.keys()) - set(names)):
            skipped[name] = "FP8-quantized checkpoints only (chosen when loading one)"
    except ImportError:
        pass
    return names, skipped


@dataclass
class Impl:
    name: str
    family: str  # "moelab" or "transformers"
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    expects_grouped_mm: bool
    config: object = None  # the moelab Config (moelab rows)
    ran_grouped_mm: bool | None = None  # set by the check

    def loss(self, ids: torch.Tensor, shifted: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total training loss and its terms (ce, load_balance)."""
        if self.family == "moelab":
            out = self.model(ids, labels=shifted)
            return out.loss, {"ce": out.losses["ce"], "load_balance": out.losses["load_balance"]}
        out = self.model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
        aux = out.aux_loss
        return out.loss, {"ce": out.loss - LOAD_BALANCE_COEF * aux, "load_balance": aux}

    def hf_tensors(self, grads: bool) -> dict[str, torch.Tensor]:
        """Parameters (or their gradients) under transformers' names and layouts."""
        params = dict(self.model.named_parameters())
        if self.family == "transformers":
            return {n: _grad(p) if grads else p.detach() for n, p in params.items()}
        state = self.model.state_dict()  # parameters + persistent buffers, as to_hf_state_dict expects
        if grads:
            state = {n: _grad(params[n]) if n in params else t for n, t in state.items()}
        return moelab.hf.to_hf_state_dict(state, self.config)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), **ADAMW)


def initial_weights(shape: Shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """moelab's own initialisation (fp32, CPU), shared by every implementation."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in moelab.build(moelab_config(shape, "grouped")).state_dict().items()}


def batched_mm_bytes(shape: Shape, dtype: torch.dtype) -> int:
    """Rough peak memory of transformers' batched_mm experts: it gathers one (2I, D) and one (D, I)
    matrix per (token, expert) pair, kept for backward in every layer, plus their gradients in one."""
    pairs = shape.tokens * shape.top_k
    per_layer = pairs * 3 * shape.d_expert * shape.d_model * torch.finfo(dtype).bits // 8
    return (shape.n_layers + 2) * per_layer


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def build_impls(shape: Shape, state: dict, dtype, device, skipped: dict[str, str]) -> list[Impl]:
    """Every implementation on the same weights; transformers ones that cannot be built go to `skipped`."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    impls = []
    for path in MOELAB_PATHS:
        config = moelab_config(shape, path)
        model = moelab.build(config)
        model.load_state_dict(state, strict=True)
        model.to(device, dtype).train()
        impls.append(Impl(f"moelab {path}", "moelab", model, adamw(model), path == "grouped", config))

    config = impls[0].config
    hf_state = moelab.hf.to_hf_state_dict(state, config)
    names, up_front = transformers_candidates()
    skipped.update(up_front)
    for name in names:
        if name == "batched_mm":
            need, free = batched_mm_bytes(shape, dtype), free_memory_bytes(device)
            if need > free // 2:
                skipped[name] = (
                    f"needs ~{need / 2**30:.0f} GiB for its gathered per-pair expert weights "
                    f"({free / 2**30:.0f} GiB free)"
                )
                continue
        hf_config = OlmoeConfig(**moelab.hf.config_to_hf(config, torch.float32))
        hf_config.output_router_logits = True
        hf_config.router_aux_loss_coef = LOAD_BALANCE_COEF
        hf_config.use_cache = False
        try:
            model = OlmoeForCausalLM(hf_config)
            model.set_experts_implementation(name)
            model.load_state_dict(hf_state, strict=True)
        except Exception as e:  # noqa: BLE001 (any refusal means: not available here)
            skipped[name] = _reason(e)
            continue
        model.to(device, dtype).train()
        impls.append(Impl(f"transformers {name}", "transformers", model, adamw(model), name == "grouped_mm"))
    return impls


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def make_batch(shape: Shape, device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (B, N) and moelab's already-shifted labels (B, N), last position ignored.

    The pad id is replaced by the next id: transformers' embedding has padding_idx=pad_token_id (that
    row never gets a gradient) while moelab's has none, so a batch holding the pad id would differ there.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq_len), generator=g)
    ids = torch.where(ids == PAD_ID, PAD_ID + 1, ids)
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = ids[:, 1:]
    return ids.to(device), shifted.to(device)


# ----------------------------------------------------------------------------- checking, then timing


@dataclass
class Agreement:
    loss: dict[str, float] = field(default_factory=dict)  # largest relative |Δ| of total, ce, load_balance
    grad: dict[str, float] = field(default_factory=dict)  # largest |Δ| over all gradients (or relative)
    param: dict[str, float] = field(default_factory=dict)  # largest |Δ| over all parameters after a step
    worst_grad: dict[str, str] = field(default_factory=dict)  # the parameter where it is reached


def check_agreement(impls: list[Impl], ids, shifted, exact: bool, skipped: dict[str, str]) -> Agreement:
    """One step of each implementation against transformers eager: loss, gradients, parameters after it.

    exact=True (fp32): absolute gradient and parameter tolerances. exact=False (bf16): loss rtol and the
    relative gradient error ||Δg|| / ||g|| of each tensor only. Implementations that raise go to
    `skipped` and are removed from `impls`.
    """
    tol = FP32_TOL if exact else BF16_TOL
    ref_impl = next((i for i in impls if i.name == "transformers eager"), None) or next(
        i for i in impls if i.family == "transformers"
    )
    order = [ref_impl] + [i for i in impls if i is not ref_impl]
    result = Agreement()
    for impl in order:
        try:
            with GroupedMMCounter() as counter:
                impl.opt.zero_grad(set_to_none=True)
                total, parts = impl.loss(ids, shifted)
                total.backward()
        except Exception as e:  # noqa: BLE001 (an implementation that cannot run here is skipped)
            if impl is ref_impl or impl.family == "moelab":
                raise
            skipped[impl.name.removeprefix("transformers ")] = _reason(e)
            impls.remove(impl)
            continue
        impl.ran_grouped_mm = counter.calls > 0
        losses = {"total": total.detach().float(), **{k: v.detach().float() for k, v in parts.items()}}
        grads = {k: v.float() for k, v in impl.hf_tensors(grads=True).items()}
        impl.opt.step()
        params = {k: v.float() for k, v in impl.hf_tensors(grads=False).items()}
        if impl is ref_impl:
            ref_losses, ref_grads, ref_params = losses, grads, params
            continue
        rel = {k: ((losses[k] - ref_losses[k]).abs() / ref_losses[k].abs().clamp(min=1e-12)).item()
               for k in ref_losses}  # fmt: skip
        result.loss[impl.name] = max(rel.values())
        if result.loss[impl.name] > tol["loss_rtol"]:
            raise AssertionError(f"{impl.name}: losses differ from {ref_impl.name}: {rel}")
        if grads.keys() != ref_grads.keys():
            raise AssertionError(f"{impl.name}: parameter names differ from {ref_impl.name}")
        if exact:
            gdiff = {n: (grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads}
            glimit = tol["grad_atol"]
        else:
            gdiff = {n: ((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm().clamp(min=1e-12)).item()
                     for n in ref_grads}  # fmt: skip
            glimit = tol["grad_rel"]
        worst = max(gdiff, key=gdiff.get)
        result.grad[impl.name], result.worst_grad[impl.name] = gdiff[worst], worst
        if gdiff[worst] > glimit:
            raise AssertionError(
                f"{impl.name}: gradient of {worst} differs from {ref_impl.name} by {gdiff[worst]}"
            )
        if exact:
            # Adam's first step moves each entry by lr·g/(|g| + eps) (+ weight decay), whose slope in g is
            # at most 1/eps: where a gradient is ~1e-9, fp32 rounding differences of the gradient move the
            # parameter by up to lr·|Δg|/eps. Beyond that bound the parameters must agree to param_atol.
            pdiff, excess = 0.0, 0.0
            for n in ref_params:
                d = (params[n] - ref_params[n]).abs()
                allowed = tol["param_atol"] + ADAMW["lr"] * (grads[n] - ref_grads[n]).abs() / ADAMW["eps"]
                pdiff, excess = max(pdiff, d.max().item()), max(excess, (d - allowed).max().item())
            result.param[impl.name] = pdiff
            if excess > 0:
                raise AssertionError(
                    f"{impl.name}: parameters after one AdamW step differ by up to {pdiff:.2e}, "
                    f"{excess:.2e} beyond what the gradient differences explain"
                )
    return result


def train_step(impl: Impl, ids, shifted, device) -> tuple[float, float, float]:
    """One training step; seconds of forward (with the loss), backward, zero_grad + optimizer step."""
    sync(device)
    t0 = time.perf_counter()
    impl.opt.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    loss, _ = impl.loss(ids, shifted)
    sync(device)
    t2 = time.perf_counter()
    loss.backward()
    sync(device)
    t3 = time.perf_counter()
    impl.opt.step()
    sync(device)
    t4 = time.perf_counter()
    return t2 - t1, t3 - t2, (t1 - t0) + (t4 - t3)


def matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    sync(a.device)
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync(a.device)
    return time.perf_counter() - t0


@dataclass
class Timing:
    step: float  # median seconds per step
    fwd: float
    bwd: float
    opt: float


def time_impls(impls: list[Impl], ids, shifted, repeats: int, warmup: int, dtype):
    """Median timings per implementation, and the median matmul rate (FLOP/s) of the same rounds."""
    device = ids.device
    g = torch.Generator().manual_seed(2)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=g).to(device, dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=g).to(device, dtype)
    for _ in range(warmup):
        matmul_seconds(a, b)
        for impl in impls:
            train_step(impl, ids, shifted, device)
    samples = {impl.name: [] for impl in impls}
    mm = []
    for r in range(repeats):
        mm.append(matmul_seconds(a, b))
        for impl in impls if r % 2 == 0 else impls[::-1]:  # alternate the order: no seat is favoured
            samples[impl.name].append(train_step(impl, ids, shifted, device))
    timings = {}
    for name, rows in samples.items():
        fwd, bwd, opt = zip(*rows)
        steps = [f + bw + o for f, bw, o in rows]
        timings[name] = Timing(*(statistics.median(x) for x in (steps, fwd, bwd, opt)))
    return timings, 2 * MATMUL_N**3 / statistics.median(mm)


# ----------------------------------------------------------------------------- the run


@dataclass
class ShapeResult:
    shape: Shape
    rows: list[tuple[str, Timing]]
    matmul_flops: float  # FLOP/s of the reference matmul
    flops_per_token: float
    active: int  # count_parameters()["active"]
    active_hand: int
    matmul_params: int  # active minus the input embedding table
    agreement: Agreement
    skipped: dict[str, str]
    fallbacks: list[str]  # rows that should have run grouped_mm and did not
    best_tf: str = ""


def run_shape(shape: Shape, dtype, device, repeats: int, warmup: int) -> ShapeResult:
    state = initial_weights(shape)
    probe = moelab.build(moelab_config(shape, "grouped"))
    active = probe.count_parameters()["active"]
    del probe
    active_hand = hand_active_params(shape)
    if active != active_hand:
        print(
            f"warning: count_parameters()['active']={active:,} != hand formula {active_hand:,}",
            file=sys.stderr,
        )
    matmul_params = active - shape.vocab * shape.d_model  # the embedding lookup does no multiply-adds
    flops_per_token = 6 * matmul_params + 12 * shape.n_layers * shape.d_model * shape.seq_len

    skipped: dict[str, str] = {}
    ids, shifted = make_batch(shape, device)
    # the agreement check runs in fp32; a bf16 run is built again in bf16 and checked at bf16 tolerance
    impls = build_impls(shape, state, torch.float32, device, skipped)
    agreement = check_agreement(impls, ids, shifted, exact=True, skipped=skipped)
    if dtype != torch.float32:
        del impls
        impls = build_impls(shape, state, dtype, device, skipped)
        agreement = check_agreement(impls, ids, shifted, exact=False, skipped=skipped)
    # grouped_mm on CUDA is bf16-only: an fp32 CUDA run uses fallbacks by design, say so in the table
    fallbacks = [i.name for i in impls if i.expects_grouped_mm and not i.ran_grouped_mm]
    timings, matmul_flops = time_impls(impls, ids, shifted, repeats, warmup, dtype)
    rows = [(i.name, timings[i.name]) for i in impls]
    tf = {n: t for n, t in rows if n.startswith("transformers ")}
    best_tf = min(tf, key=lambda n: tf[n].step)
    return ShapeResult(shape, rows, matmul_flops, flops_per_token, active, active_hand, matmul_params,
                       agreement, skipped, fallbacks, best_tf)  # fmt: skip


def table(res: ShapeResult) -> str:
    best = dict(res.rows)[res.best_tf].step
    lines = [
        f"| implementation | ms/step | fwd | bwd | opt | tokens/s | × tf-best ({res.best_tf.split()[-1]}) "
        f"| % peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in res.rows:
        tps = res.shape.tokens / t.step
        mfu = 100 * tps * res.flops_per_token / res.matmul_flops
        label = f"{name} (fallback)" if name in res.fallbacks else name
        lines.append(
            f"| {label} | {t.step * 1e3:.1f} | {t.fwd * 1e3:.1f} | {t.bwd * 1e3:.1f} | {t.opt * 1e3:.1f} "
            f"| {tps:,.0f} | {best / t.step:.2f} | {mfu:.1f} |"
        )
    return "\n".join(lines)


def shape_block(res: ShapeResult, exact: bool) -> str:
    s = res.shape
    a = res.agreement
    grad_kind = "largest |Δ gradient|" if exact else "largest ‖Δ gradient‖/‖gradient‖"
    lines = [
        f"#### {s.name}: {s.describe()} = {s.tokens:,} tokens/step",
        "",
        f"- active parameters: {res.active:,} (`count_parameters()`; hand formula {res.active_hand:,}); "
        f"without the input embedding {res.matmul_params:,}; model FLOPs/token "
        f"6·{res.matmul_params:,} + 12·{s.n_layers}·{s.d_model}·{s.seq_len} "
        f"= {res.flops_per_token / 1e6:.1f} M",
        f"- measured {MATMUL_N}² matmul rate: {res.matmul_flops / 1e9:.1f} GFLOP/s",
        "- against transformers eager: largest relative |Δ loss| "
        + ", ".join(f"{n} {v:.1e}" for n, v in a.loss.items())
        + f"; {grad_kind} "
        + ", ".join(f"{n} {v:.1e} (`{a.worst_grad[n]}`)" for n, v in a.grad.items())
        + (
            "; largest |Δ parameter| after one AdamW step (within 1e-5 + lr·|Δg|/eps) "
            + ", ".join(f"{n} {v:.1e}" for n, v in a.param.items())
            if a.param
            else ""
        ),
    ]
    if res.skipped:
        lines.append(
            "- skipped transformers experts implementations: "
            + "; ".join(f"`{n}` ({why})" for n, why in sorted(res.skipped.items()))
        )
    if res.fallbacks:
        lines.append(f"- (fallback): ran without grouped_mm: {', '.join(res.fallbacks)}")
    lines += ["", table(res)]
    return "\n".join(lines)


def moelab_revision() -> str:
    """moelab's version and the git commit of the source that ran, noting uncommitted changes under it."""
    src = Path(moelab.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=src, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    if not commit:
        return moelab.__version__
    return f"{moelab.__version__} ({commit}{' + uncommitted changes' if dirty else ''})"


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def results_block(results: list[ShapeResult], args, command: str, load_before: str) -> str:
    import transformers

    kind = (
        f"quick smoke run (seq_len ÷ {QUICK_SEQ_DIVISOR}; not representative)" if args.quick else "full run"
    )
    lines = [
        f"### {args.device} {args.dtype}",
        "",
        f"- machine: {machine(torch.device(args.device))}; load average {load_before} before, "
        f"{load_average()} after",
        f"- software: moelab {moelab_revision()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}",
        f"- dtype {args.dtype}; median of {args.repeats} steps after {args.warmup} warm-up "
        f"round(s) of every implementation, interleaved (order reversed every other round); {kind}",
        f"- date: {datetime.date.today().isoformat()}; command: `{command}`",
        "- ms/step = fwd + bwd + opt (each the median of its own phase; step the median of sums); "
        "fwd includes the loss, opt includes zero_grad",
    ]
    for res in results:
        lines += ["", shape_block(res, exact=args.dtype == "fp32")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + __doc__.rsplit("\n\n", 1)[1],
    )  # fmt: skip
    p.add_argument(
        "--shapes", default=None, help="comma-separated, from small,olmoe (default: both; --quick: small)"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="bf16: parameters cast to bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every implementation first")
    p.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/BENCHMARKS.md)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: small shape, seq_len ÷ {QUICK_SEQ_DIVISOR}, 1 repeat, no warm-up",
    )
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = "small" if args.quick else "small,olmoe"
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        p.error(f"--shapes {args.shapes!r}: choose among {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.quick:
        args.repeats, args.warmup = 1, 0

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    load_before = load_average()
    results = []
    for name in names:
        shape = SHAPES[name]
        if args.quick:
            shape = dataclasses.replace(shape, seq_len=shape.seq_len // QUICK_SEQ_DIVISOR)
        t0 = time.perf_counter()
        res = run_shape(shape, dtype, device, args.repeats, args.warmup)
        results.append(res)
        for impl, why in sorted(res.skipped.items()):
            print(f"[{name}: skipped transformers {impl}: {why}]", file=sys.stderr)
        print(
            f"[{name}: losses, gradients and post-step parameters agree; "
            f"checked and timed in {time.perf_counter() - t0:.0f} s]",
            file=sys.stderr,
        )
        print(f"\n{shape_block(res, exact=args.dtype == 'fp32')}\n")
    if args.out:
        block = results_block(results, args, command, load_before)
        key = f"train_step {args.device} {args.dtype}"
        update_doc(args.out, block, key, SECTION_HEADING, SECTION_INTRO, after=AFTER_SECTION)
        print(f"updated {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
