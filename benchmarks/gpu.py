"""Training throughput on one GPU: tokens/s, MFU and peak memory of moelab against transformers' OLMoE.

Each implementation runs whole training steps (zero_grad, forward with the loss, backward, AdamW step)
on the same weights and the same random batch, one implementation after the other (both would not fit
in memory at once for OLMoE-1B-7B):

  moelab autocast        fp32 parameters, bf16 autocast, fused AdamW: how `moelab train` runs on GPU
  moelab bf16            the parameters cast to bf16 (so gradients and AdamW states are bf16 too)
  transformers bf16      OlmoeForCausalLM with the same config and weights (`moelab.hf`), cast to bf16,
                         its default experts implementation

`moelab bf16` against `transformers bf16` is the like-for-like ratio: transformers' grouped_mm experts
cast their input to the weight dtype, so under autocast with fp32 weights they would run in fp32. The
objective is the same for all: next-token cross-entropy + 0.01 × the load-balancing loss in
transformers' convention (moelab `moe.load_balance=hf_concat`, `moe.z_loss_coef=0`, `moe.lflb=false`).
The losses of the first step are printed beside each other; bf16 rows must agree with transformers to
a relative 2e-2. Configs that transformers' OLMoE cannot represent (shared experts, dense layers) run
the moelab rows only, with the reason printed.

Reported per implementation: the median step time over `--steps` steps after `--warmup`, tokens/s
(= tokens/s/GPU: one process on one GPU), MFU = model FLOPs/token · tokens/s / the GPU's peak dense
bf16 rate (`PEAK_FLOPS` of moelab's trainer, by GPU name; `--peak-tflops` for another GPU), with model
FLOPs/token = 6 · active parameters + 12 · layers · D · N (the trainer's formula), and the peak memory
allocated by torch (`torch.cuda.max_memory_allocated`). A row that runs out of memory says so.
The moelab rows go through `parallelize` as `moelab train` does, so
`--set train.activation_checkpointing=true`, `--set train.loss_chunk_tokens=1024` or
`--set train.compile=true` apply to them (transformers runs as built). Throughput across several
GPUs is what `moelab train` logs (tokens/s, mfu) in its metrics.

    python benchmarks/gpu.py                                      # OLMoE-1B-7B, 1 × 4096 tokens/step
    python benchmarks/gpu.py --batch 2 --steps 20 --out docs/BENCHMARKS.md
    python benchmarks/gpu.py --config configs/research/test-51.yaml --batch 8
    python benchmarks/gpu.py --batch 2 --set train.activation_checkpointing=true --impls "moelab autocast"
    python benchmarks/gpu.py --tiny --device cpu                  # the whole script on CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from common import machine, sync, update_doc  # noqa: E402

import moelab  # noqa: E402
import moelab.hf  # noqa: E402
from moelab.errors import MoelabError  # noqa: E402
from moelab.train.parallel import parallelize  # noqa: E402
from moelab.train.trainer import PEAK_FLOPS  # noqa: E402

LOAD_BALANCE_COEF = 0.01
OBJECTIVE = [
    "moe.load_balance=hf_concat",
    f"moe.load_balance_coef={LOAD_BALANCE_COEF}",
    "moe.z_loss_coef=0",  # transformers' OLMoE has no router z-loss
    "moe.lflb=false",
]
ADAMW = {"lr": 4e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
BF16_LOSS_RTOL = 2e-2
DEFAULT_CONFIG = "configs/olmoe-1b-7b.yaml"
TINY_CONFIG = "configs/tiny-cpu.yaml"
IMPLS = ("moelab autocast", "moelab bf16", "transformers bf16")
SECTION_HEADING = "## GPU training throughput"
NO_GPU = (
    "gpu.py: no CUDA GPU is available here; run it on a GPU machine, or `--tiny --device cpu` "
    "to check the script"
)


@dataclass
class Row:
    name: str
    first_loss: float | None = None
    step_s: float | None = None
    peak_bytes: int | None = None
    skipped: str | None = None  # why the row did not run


def objective_config(path: str, overrides: list[str]):
    return moelab.load_config(path, [*overrides, *OBJECTIVE])


def make_batch(vocab: int, pad_id: int, batch: int, seq: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, N) without the pad id (transformers' embedding never updates that row) and moelab's
    already-shifted labels (B, N), the last position ignored."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    ids = torch.where(ids == pad_id, (pad_id + 1) % vocab, ids)
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = ids[:, 1:]
    return ids.to(device), shifted.to(device)


def build(name: str, config, state: dict, device: torch.device) -> torch.nn.Module:
    """The model of row `name` on `device` with the weights `state` (moelab names, CPU)."""
    if name.startswith("moelab"):
        with torch.device(device):
            model = moelab.build(config)
        model.load_state_dict(state)
        model = model.to(torch.bfloat16) if name == "moelab bf16" else model
        return parallelize(model, config)  # dispatcher, activation checkpointing, compile: as trained
    from transformers import OlmoeConfig, OlmoeForCausalLM

    hf_config = OlmoeConfig(**moelab.hf.config_to_hf(config, torch.bfloat16))  # refuses what it lacks
    hf_config.output_router_logits = True
    hf_config.router_aux_loss_coef = LOAD_BALANCE_COEF
    hf_config.use_cache = False
    with torch.device(device):
        model = OlmoeForCausalLM(hf_config)
    model.load_state_dict(moelab.hf.to_hf_state_dict(state, config), strict=True)
    return model.to(torch.bfloat16)


def loss_fn(name: str, model, ids, shifted, device):
    """The training loss of one row (autocast for `moelab autocast`)."""
    if name == "transformers bf16":
        return model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False).loss
    if name == "moelab autocast":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(ids, labels=shifted).loss
    return model(ids, labels=shifted).loss


def run_row(name, config, state, ids, shifted, device, steps: int, warmup: int) -> Row:
    """Build, step `warmup` + `steps` times, free. Out of memory or a refused config: a skipped row."""
    row = Row(name)
    model = opt = None
    try:
        model = build(name, config, state, device).train()
        opt = torch.optim.AdamW(model.parameters(), **ADAMW, fused=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i in range(warmup + steps):
            sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(name, model, ids, shifted, device)
            loss.backward()
            opt.step()
            sync(device)
            if i == 0:
                row.first_loss = loss.item()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        row.step_s = statistics.median(times)
        if device.type == "cuda":
            row.peak_bytes = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        row.skipped = "out of memory"
    except (MoelabError, ValueError) as e:
        row.skipped = str(e).splitlines()[0][:200]
    finally:
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help=f"default {DEFAULT_CONFIG} ({TINY_CONFIG} with --tiny)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tiny", action="store_true", help=f"{TINY_CONFIG}, 2 × 64 tokens, 2 steps")
    ap.add_argument("--device", default="cuda", help="cuda, cuda:K or cpu (cpu: a check of the script)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default model.max_seq_len)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated rows to run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s for MFU")
    ap.add_argument("--out", type=Path, default=None, help="rewrite this benchmark's block in a doc")
    args = ap.parse_args(argv)
    if args.tiny:
        args.config, args.batch, args.seq = args.config or TINY_CONFIG, 2, args.seq or 64
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_GPU)
        return 1
    names = [n.strip() for n in args.impls.split(",") if n.strip()]
    unknown = set(names) - set(IMPLS)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")

    args.config = args.config or DEFAULT_CONFIG
    config = objective_config(args.config, args.overrides)
    seq = args.seq or config.model.max_seq_len
    tokens = args.batch * seq
    torch.manual_seed(0)
    with torch.device(device):
        reference = moelab.build(config)
    counts = reference.count_parameters()
    state = {k: v.detach().to("cpu", copy=True) for k, v in reference.state_dict().items()}  # fp32, CPU
    del reference
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ids, shifted = make_batch(config.model.vocab_size, config.model.pad_token_id, args.batch, seq, device)
    flops_per_token = 6 * counts["active"] + 12 * config.model.n_total_layers * config.model.d_model * seq
    peak = peak_flops(device, args.peak_tflops)

    rows = [run_row(n, config, state, ids, shifted, device, args.steps, args.warmup) for n in names]
    ran = {r.name: r for r in rows if r.skipped is None}
    tf = ran.get("transformers bf16")
    if tf is not None and "moelab bf16" in ran:
        a, b = ran["moelab bf16"].first_loss, tf.first_loss
        if abs(a - b) > BF16_LOSS_RTOL * abs(b):
            raise AssertionError(f"first-step losses differ: moelab bf16 {a:.5f}, transformers {b:.5f}")

    header = [
        f"- machine: {machine(device)}; torch {torch.__version__}",
        f"- config: {args.config} {' '.join(args.overrides)}".rstrip()
        + f" (objective: {', '.join(OBJECTIVE)}); {counts['total']:,} parameters, "
        f"{counts['active']:,} active",
        f"- batch {args.batch} × {seq} = {tokens:,} tokens/step; median of {args.steps} steps after "
        f"{args.warmup} warm-up; model FLOPs/token {flops_per_token / 1e9:.3f} G; peak "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (MFU n/a)"),
        f"- date: {datetime.date.today()}; command: `python benchmarks/gpu.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| implementation | first loss | ms/step | tokens/s/GPU | MFU % | peak memory (GiB) "
        "| × transformers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines = list(header)
    for r in rows:
        if r.skipped is not None:
            lines.append(f"| {r.name} | skipped: {r.skipped} | | | | | |")
            continue
        tps = tokens / r.step_s
        mfu = f"{100 * flops_per_token * tps / peak:.1f}" if peak else "n/a"
        mem = f"{r.peak_bytes / 2**30:.1f}" if r.peak_bytes is not None else "n/a"
        ratio = f"{tf.step_s / r.step_s:.2f}" if tf is not None else "n/a"
        lines.append(
            f"| {r.name} | {r.first_loss:.4f} | {1e3 * r.step_s:.1f} | {tps:,.0f} | {mfu} | {mem} | {ratio} |"
        )
    block = "\n".join(lines)
    print(block)
    if args.out is not None:
        marker = f"gpu {device.type}"
        update_doc(args.out, f"### {machine(device)}\n\n{block}", marker, SECTION_HEADING, "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
