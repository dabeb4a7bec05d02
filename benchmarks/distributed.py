"""Training throughput of one process against two torchrun processes (data and expert parallel) on CPU.

Runs `moelab train configs/tiny-cpu.yaml` on data/demo/tokens, the same global batch
(train.batch_size sequences per micro-batch over all ranks) for every variant, interleaved in rounds:

  1 process (2 threads)    plain `moelab train` (torch's default: one thread per core here)
  1 process (1 thread)     OMP_NUM_THREADS=1: the per-process share the two-process runs get
  2 processes DDP          `--nproc 2`, parallel.data_parallel=ddp, gloo
  2 processes FSDP         `--nproc 2`, parallel.data_parallel=fsdp, gloo
  2 processes EP=2         `--nproc 2`, parallel.ep=2 (4 of the 8 experts per rank, all-to-all over gloo)

torchrun starts each process with OMP_NUM_THREADS=1, so the two-process runs use the same two cores as
the one-process run: on CPU this measures the cost of the communication and of splitting the work, not
a speed-up (there are no more cores to gain). Throughput is taken from the run's metrics.jsonl:
tokens per step (the growth of `tokens` between logged steps) over `step_time_s`, median over the
steps after `--skip` warm-up steps, then the median over rounds; start-up, evaluation and checkpoints
are outside it. The loss of the first step is shown beside each: the data-parallel runs see the same
sequences as the one-process run.

    python benchmarks/distributed.py                          # print the table (~3 minutes on 2 cores)
    python benchmarks/distributed.py --out docs/BENCHMARKS.md # and write its results block there
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import machine, update_doc

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
DATA = ROOT / "data" / "demo" / "tokens"
SECTION_HEADING = "## Distributed training on CPU: 1 process against 2"
VARIANTS = {  # name: (processes, extra env, --set overrides)
    "1 process (2 threads)": (1, {}, []),
    "1 process (1 thread)": (1, {"OMP_NUM_THREADS": "1"}, []),
    "2 processes DDP": (2, {}, ["parallel.data_parallel=ddp"]),
    "2 processes FSDP": (2, {}, ["parallel.data_parallel=fsdp"]),
    "2 processes EP=2": (2, {}, ["parallel.ep=2"]),
}
SECTION_INTRO = """\
`benchmarks/distributed.py` trains configs/tiny-cpu.yaml on data/demo/tokens with one process and
with two torchrun processes over gloo (data parallel with DDP or FSDP2, and expert parallel with ep=2),
at the same global batch, interleaved in rounds. Tokens/s come from each run's metrics.jsonl (tokens
per step over `step_time_s`, median over the steps after warm-up), so start-up, evaluation and
checkpoints are excluded. On this machine the two processes share the same two cores as the one
process (torchrun gives each one thread), so this is the price of communication and of splitting the
work, not a speed-up: on GPUs each process has its own device.
"""


def run(name: str, steps: int, out: Path) -> list[dict]:
    """One training run of variant `name`; its train records from metrics.jsonl."""
    nproc, env_extra, sets = VARIANTS[name]
    cmd = [sys.executable, "-m", "moelab.cli", "train", str(CONFIG), "--out", str(out), "--no-progress"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    overrides = [
        f"train.steps={steps}",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        f"train.save_every={steps}",
        "train.device=cpu",
        f"data.path={DATA}",
        *sets,
    ]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{name}: `{shlex.join(cmd)}` failed ({proc.returncode}):\n{tail}")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "train"]


def throughput(records: list[dict], skip: int) -> float:
    """Median tokens/s over the steps after `skip`: tokens added by the step over its step time."""
    rates = [
        (b["tokens"] - a["tokens"]) / b["step_time_s"]
        for a, b in zip(records, records[1:])
        if b["step"] > skip and b["step"] == a["step"] + 1
    ]
    if not rates:
        raise RuntimeError("too few logged steps after warm-up; raise --steps")
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=None, help="rewrite this benchmark's block in a doc")
    args = ap.parse_args(argv)
    if not (DATA / "metadata.json").is_file():
        print(f"distributed.py: {DATA.relative_to(ROOT)} is missing; make it with `make demo`")
        return 1
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    rates: dict[str, list[float]] = {n: [] for n in names}
    first_loss: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="moelab-dist-") as tmp:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                records = run(name, args.steps, Path(tmp) / f"{r}-{name.replace(' ', '_')}")
                rates[name].append(throughput(records, args.skip))
                first_loss[name] = records[0]["loss"]
                print(f"round {r + 1}: {name}: {rates[name][-1]:,.0f} tokens/s", file=sys.stderr)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/distributed.py", *map(shlex.quote, given)])
    base = statistics.median(rates[names[0]])
    load = os.getloadavg()
    lines = [
        f"- machine: {machine(torch.device('cpu'))}; load average {load[0]:.1f}, {load[1]:.1f}, "
        f"{load[2]:.1f} after",
        f"- software: torch {torch.__version__}, Python {sys.version.split()[0]}; gloo backend",
        f"- {CONFIG.relative_to(ROOT)} on {DATA.relative_to(ROOT)}, {args.steps} steps per run, median "
        f"over steps {args.skip + 1}-{args.steps}, then over {args.rounds} interleaved rounds",
        f"- date: {datetime.date.today()}; command: `{command}`",
        "",
        f"| variant | tokens/s (rounds) | tokens/s | × {names[0]} | first-step loss |",
        "|---|---|---:|---:|---:|",
    ]
    for n in names:
        med = statistics.median(rates[n])
        each = ", ".join(f"{x:,.0f}" for x in rates[n])
        lines.append(f"| {n} | {each} | {med:,.0f} | {med / base:.2f} | {first_loss[n]:.4f} |")
    block = "\n".join(lines)
    print(block)
    if args.out is not None:
        update_doc(args.out, block, "distributed cpu", SECTION_HEADING, SECTION_INTRO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
