"""bf16 autocast against fp32 for one CPU training step of the demo model (configs/tiny-cpu.yaml): the
number train.dtype=bf16 quotes when it warns on a CPU without bf16 matrix instructions
(moelab.train.device).

A step is zero_grad, forward with the loss, backward and a torch.optim.AdamW step on a random batch of
the config's batch_size × seq_len. fp32 and bf16 steps alternate (after one warm-up step of each) and
each reports the median of --repeats. `--as-avx2` also runs the same comparison in a child process with
torch and oneDNN restricted to AVX2 kernels (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2): how a
CPU without AVX512-BF16/AMX runs it, on this machine's cores.

Run: python benchmarks/bf16_cpu.py [--repeats 3] [--as-avx2] [--out docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import machine, update_doc

import moelab

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def measure(repeats: int) -> dict:
    """Median seconds per step of fp32 and bf16 autocast, interleaved, in this process."""
    torch.manual_seed(0)
    config = moelab.load_config(CONFIG, [])
    model = moelab.build(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, N = config.train.batch_size, config.data.seq_len
    ids = torch.randint(3, config.model.vocab_size, (B, N + 1), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids[:, :-1], labels=ids[:, 1:])
        out.loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times = {"fp32": [], "bf16": []}
    step(False), step(True)  # warm-up
    for _ in range(repeats):
        for name in ("fp32", "bf16"):
            times[name].append(step(name == "bf16"))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_s": med["fp32"],
        "bf16_s": med["bf16"],
        "slowdown": med["bf16"] / med["fp32"],
        "tokens": B * N,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each dtype (median)")
    p.add_argument("--as-avx2", action="store_true", help="also run restricted to AVX2 kernels")
    p.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/BENCHMARKS.md)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.repeats)))
        return 0
    results = {"native": measure(args.repeats)}
    if args.as_avx2:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        cmd = [sys.executable, __file__, "--child", "--repeats", str(args.repeats)]
        results["AVX2 kernels"] = json.loads(
            subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        )
    for name, r in results.items():
        print(
            f"{name} ({r['capability']}): fp32 {r['fp32_s'] * 1000:.0f} ms, bf16 {r['bf16_s'] * 1000:.0f} ms "
            f"per step: bf16 {r['slowdown']:.1f}× the fp32 time"
        )
    if args.out:
        dev, command = torch.device("cpu"), " ".join(argv or sys.argv[1:])
        lines = [
            f"- machine: {machine(dev)}; CPU bf16 flags: " + (", ".join(sorted(_bf16_flags())) or "none"),
            f"- software: torch {torch.__version__}, Python {platform.python_version()}",
            f"- one step = {results['native']['tokens']} tokens (batch × seq_len, configs/tiny-cpu.yaml);"
            f" median of {args.repeats} steps per dtype after one warm-up step each, interleaved",
            f"- date: {datetime.date.today()}; command: `python benchmarks/bf16_cpu.py {command}`",
            "",
            "| kernels | torch CPU capability | fp32 ms/step | bf16 ms/step | bf16 / fp32 |",
            "|---|---|---:|---:|---:|",
        ]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['capability']} | {r['fp32_s'] * 1000:,.0f} | {r['bf16_s'] * 1000:,.0f} |"
                f" {r['slowdown']:.1f}× |"
            )
        update_doc(
            args.out,
            "\n".join(lines),
            "bf16_cpu",
            "## bf16 autocast on CPU: one demo training step",
            "`benchmarks/bf16_cpu.py`: see its docstring.\n",
        )
    return 0


def _bf16_flags() -> set[str]:
    from moelab.train.device import _cpu_flags

    return _cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"}


if __name__ == "__main__":
    raise SystemExit(main())
