"""Peak memory and time of the lm_head + cross-entropy forward and backward: the plain path
(`F.cross_entropy(F.linear(h, W).float(), y)`, what models do with train.loss_chunk_tokens=0) against
`moelab.models.lm_loss.chunked_cross_entropy` (train.loss_chunk_tokens > 0).

Each (implementation, tokens, dtype) runs in a fresh child process, one after the other, so one
measurement's memory cannot hide in another's peak. What "peak" measures:
- cuda: torch.cuda.max_memory_allocated() minus the bytes allocated before the step (tensor bytes).
- cpu: the process's peak resident set size (getrusage ru_maxrss) minus its resident size just before
  the step, after a small warm-up step has loaded every kernel. glibc serves blocks over 32 MiB with
  mmap and returns them on free, so the (·, V) tensors show up in full; the number also includes
  allocator slack, so it is an upper bound on live tensor bytes.
Both count everything the step adds on top of the inputs and the weight: logits, saved tensors,
temporaries, and the gradients of hidden and weight (the weight gradient alone is V·D·4 bytes).

Run: python benchmarks/lm_loss.py [--tokens 2048 8192] [--dtypes fp32 bf16] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, sync, update_doc

from moelab.models.lm_loss import chunked_cross_entropy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step(impl: str, h, w, y, dtype, device) -> tuple[float, float, float]:
    """One forward + backward under the dtype's autocast; returns loss, |grad h|, |grad W|."""
    h.grad = w.grad = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        if impl == "plain":
            loss = F.cross_entropy(F.linear(h, w).float(), y, ignore_index=-100)
        else:
            loss = chunked_cross_entropy(h, w, y, int(impl.split("=")[1]))
    loss.backward()
    sync(device)
    return loss.item(), h.grad.float().norm().item(), w.grad.float().norm().item()


def child(impl: str, tokens: int, dim: int, vocab: int, dtype: str, device: str) -> dict:
    """Measure one configuration in this (fresh) process."""
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, dim, generator=g).to(dev).requires_grad_()  # (T, D) fp32 master, as a model's
    w = (torch.randn(vocab, dim, generator=g) * dim**-0.5).to(dev).requires_grad_()  # (V, D)
    y = torch.randint(0, vocab, (tokens,), generator=g).to(dev)  # (T,)
    y[::17] = -100  # some ignored positions, as padding
    step(impl, h[:64].detach().requires_grad_(), w, y[:64], dtype, dev)  # warm-up: load kernels
    h.grad = w.grad = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = rss_bytes()
    t0 = time.perf_counter()
    loss, gh, gw = step(impl, h, w, y, dtype, dev)
    first = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss: KiB on Linux
    return {"peak": peak, "ms": 1000 * first, "loss": loss, "grad_h": gh, "grad_w": gw}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="B·N tokens of one step")
    p.add_argument("--dim", type=int, default=2048, help="hidden width D (OLMoE-1B-7B: 2048)")
    p.add_argument("--vocab", type=int, default=50304, help="vocabulary V (OLMoE: 50304)")
    p.add_argument("--chunks", type=int, nargs="+", default=[1024], help="chunk sizes to compare")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        impl, tokens, dtype = args.child.split(",")
        print(json.dumps(child(impl, int(tokens), args.dim, args.vocab, dtype, args.device)))
        return 0

    impls = ["plain", *(f"chunk={c}" for c in args.chunks)]
    rows = []
    for tokens in args.tokens:
        for dtype in args.dtypes:
            ref = None
            for impl in impls:
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    f"{impl},{tokens},{dtype}",
                    "--device",
                    args.device,
                ]
                cmd += ["--dim", str(args.dim), "--vocab", str(args.vocab)]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                ref = ref or r
                tol = 1e-5 if dtype == "fp32" else 1e-2  # see tests/test_lm_loss.py for the bf16 bound
                for key in ("loss", "grad_h", "grad_w"):  # the same numbers, or nothing is reported
                    if abs(r[key] - ref[key]) > tol * abs(ref[key]):
                        raise SystemExit(f"{impl} {tokens} {dtype}: {key} {r[key]} != plain {ref[key]}")
                r.update(impl=impl, tokens=tokens, dtype=dtype, ratio=r["peak"] / ref["peak"])
                rows.append(r)
                print(
                    f"{impl:>10} T={tokens} {dtype}: peak {r['peak'] / 2**20:8.0f} MiB "
                    f"({r['ratio']:.2f}× plain), {r['ms']:.0f} ms, loss {r['loss']:.5f}",
                    flush=True,
                )
    if args.out:
        dev = torch.device(args.device)
        method = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS growth (ru_maxrss)"
        command = "python benchmarks/lm_loss.py " + " ".join(sys.argv[1:])
        lines = [
            f"- machine: {machine(dev)}",
            f"- software: torch {torch.__version__}, Python {platform.python_version()}",
            f"- D={args.dim}, V={args.vocab}; peak = {method} above the inputs and weight, one child process"
            " per row; ms = that one measured step (kernels warm)",
            f"- date: {datetime.date.today()}; command: `{command}`",
            "- loss, |grad h| and |grad W| of every row agree with plain (fp32 rel 1e-5, bf16 rel 1e-2)",
            "",
            "| implementation | tokens | dtype | peak MiB | × plain | ms/step |",
            "|---|---:|---|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['impl']} | {r['tokens']} | {r['dtype']} | {r['peak'] / 2**20:,.0f} | {r['ratio']:.2f}"
                f" | {r['ms']:,.0f} |"
            )
        update_doc(
            args.out,
            "\n".join(lines),
            f"lm_loss {args.device}",
            "## lm_head + cross-entropy: peak memory",
            "`benchmarks/lm_loss.py`: see its docstring for what is measured.\n",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
