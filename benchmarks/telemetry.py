"""Overhead of the trainer's per-step routing telemetry, measured on the real training loop.

Runs `moelab train` on the same data and config twice per round, interleaved: once logging every
step (`train.log_every=1`: per-layer counts, MaxVio, router entropy, bias ranges, a metrics.jsonl
line) and once logging never (`train.log_every` larger than the run). The loss, gradient norms and
finiteness are read back every step in both. A steps=1 run of each variant measures start-up, which
is subtracted, so the ratio is per training step.

  python benchmarks/telemetry.py                          # print the table
  python benchmarks/telemetry.py --out docs/BENCHMARKS.md # and write its "## Telemetry overhead" section
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelab.config import load_config
from moelab.io import atomic_file
from moelab.train.trainer import train

SECTION = "## Telemetry overhead"
ROOT = Path(__file__).resolve().parents[1]


def make_data(tmp: Path) -> Path:
    """data/demo/tokens when `make demo` made it, else a small synthetic tokenized set."""
    demo = ROOT / "data" / "demo" / "tokens"
    if (demo / "metadata.json").is_file():
        return demo
    from moelab.data.tokenize import tokenize_files
    from moelab.data.tokenizer import train_tokenizer

    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "said", "that", "a", "river", "of", "light", "runs", "over"]
    words += ["every", "stone", "and", "field"]
    lines = [
        json.dumps(
            {"text": " ".join(words[i] for i in torch.randint(len(words), (400,), generator=g).tolist())}
        )
        for _ in range(300)
    ]
    (tmp / "train.jsonl").write_text("\n".join(lines) + "\n")
    train_tokenizer([tmp / "train.jsonl"], 512, tmp / "tok", progress=False)
    tokenize_files([tmp / "train.jsonl"], tmp / "tok", tmp / "tokens", progress=False)
    return tmp / "tokens"


def timed_run(data: Path, steps: int, log_every: int, tmp: Path, tag: str) -> float:
    config = load_config(
        ROOT / "configs" / "tiny-cpu.yaml",
        [f"data.path={data}", f"train.steps={steps}", f"train.log_every={log_every}", "train.eval_every=0",
         "train.save_every=0", "train.device=cpu"],
    )  # fmt: skip
    out = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=tmp))
    t0 = time.perf_counter()
    train(config, out, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the section into this Markdown file")
    args = parser.parse_args()
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 and --repeats >= 1")
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_data(tmp)
        times = {"with": [], "without": [], "start_with": [], "start_without": []}
        timed_run(data, 3, 1, tmp, "warmup")
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            times["with"].append(timed_run(data, args.steps, 1, tmp, "with"))
            times["without"].append(timed_run(data, args.steps, 10**9, tmp, "without"))
            times["start_with"].append(timed_run(data, 1, 1, tmp, "sw"))
            times["start_without"].append(timed_run(data, 1, 10**9, tmp, "swo"))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step_with = (med["with"] - med["start_with"]) / (args.steps - 1)
    per_step_without = (med["without"] - med["start_without"]) / (args.steps - 1)
    overhead = per_step_with / per_step_without - 1
    table = [
        "| variant | per-step time (ms) | ratio |",
        "|---|---:|---:|",
        f"| no telemetry (`log_every` > steps) | {per_step_without * 1e3:.1f} | 1.000 |",
        f"| telemetry every step (`log_every=1`) | {per_step_with * 1e3:.1f} | {1 + overhead:.3f} |",
    ]
    print("\n".join(table))
    print(f"overhead: {overhead * 100:+.2f}% of step time (goal: <= 3%)")
    if args.out:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
        section = "\n".join([
            SECTION, "",
            f"`python benchmarks/telemetry.py {' '.join(sys.argv[1:])}` on {datetime.date.today()}: "
            f"configs/tiny-cpu.yaml, {args.steps} steps per run, median of {args.repeats} interleaved runs, "
            f"start-up (a 1-step run of each variant) subtracted. {cpu}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}.", "",
            *table, "",
            f"Overhead of per-step telemetry: **{overhead * 100:+.2f}%** of step time (goal: ≤ 3%; a value "
            "near or below 0 means the difference is within this machine's run-to-run noise). Both "
            "variants read loss, gradient norms and finiteness back every step; telemetry adds per-layer "
            "counts, MaxVio, router entropy and bias ranges (one extra transfer) and a metrics.jsonl line.",
            "",
        ])  # fmt: skip
        write_section(Path(args.out), section)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end < 0 else text[end + 1 :])
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with atomic_file(path) as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
