"""Tokenization throughput: `moelab data tokenize` with 1 and 2 worker processes on the same input.

Input: data/corpus/train.jsonl when it exists (the embedded corpus), else ~10 MB of synthetic
Zipf-distributed text. Tokenizer: --tokenizer, else an 8,192-token BPE trained on the input. Runs
alternate between worker counts (1, 2, 1, 2, ...) so background load hits both alike; the table
reports the median of --repeats runs and the ratio.

  python benchmarks/tokenization.py                       # print the table
  python benchmarks/tokenization.py --out docs/BENCHMARKS.md   # and write its "## Tokenization" section
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tokenizers

from moelab.data.tokenize import tokenize_files
from moelab.data.tokenizer import load_tokenizer, train_tokenizer
from moelab.io import atomic_file

SECTION = "## Tokenization"
CORPUS = Path("data/corpus/train.jsonl")


def synthetic_jsonl(path: Path, megabytes: float, seed: int = 0) -> None:
    """Documents of Zipf-distributed pseudo-words (a natural-language-like token distribution)."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "men", "sa", "lo", "ver", "un", "tha", "is", "on", "el", "qu", "an", "de"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(20000)})
    rng.shuffle(vocab)
    cum, total = [], 0.0
    for rank in range(1, len(vocab) + 1):
        total += 1.0 / rank
        cum.append(total)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(200, 800))
            sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
            line = json.dumps({"text": " ".join(sentences)}) + "\n"
            fh.write(line)
            written += len(line)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(inputs: list[Path], tokenizer, workers: int, out: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens of one tokenization."""
    cpu, start = cpu_seconds(), time.perf_counter()
    meta = tokenize_files(inputs, tokenizer, out, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return seconds, cpu_seconds() - cpu, sum(s["tokens"] for s in meta["splits"].values())


def _burn(n: int) -> float:
    start, total = time.perf_counter(), 0
    for i in range(n):
        total += i
    return time.perf_counter() - start


def parallel_ceiling(n: int = 10_000_000) -> float:
    """Speed-up of a pure CPU loop on 2 processes over 1, measured now: the best 2 workers can do
    on this machine at this moment (about 2 on 2 idle cores, about 1 when another job holds a core)."""
    one = _burn(n)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_burn, [n, n])
        two = time.perf_counter() - start
    return 2 * one / two


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of the file (or append it); leave every other section alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    begin = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if begin is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        tail = "".join(lines[end:])
        new = "".join(lines[:begin]) + section + ("\n" + tail if tail else "")
    with atomic_file(path, encoding="utf-8") as fh:
        fh.write(new)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=None, help="JSONL/txt input (default: corpus or synthetic)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir/file or 'olmoe' (default: train 8k BPE)")
    p.add_argument("--mb", type=float, default=10.0, help="size of the synthetic input")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="markdown file to write the section into")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="moelab-bench-tok-") as tmp:
        tmp = Path(tmp)
        if args.input is not None:
            source, path = str(args.input), args.input
        elif CORPUS.is_file():
            source, path = f"embedded corpus ({CORPUS})", CORPUS
        else:
            path = tmp / "synthetic.jsonl"
            synthetic_jsonl(path, args.mb)
            source = f"synthetic Zipf text ({args.mb:g} MB JSONL)"
        size_mb = path.stat().st_size / 1e6
        if args.tokenizer is None:
            tok = load_tokenizer(train_tokenizer([path], 8192, tmp / "tok", progress=False))
            tok_name = f"byte-level BPE trained on the input, vocab {tok.vocab_size:,}"
        else:
            tok = load_tokenizer(args.tokenizer)
            tok_name = f"{args.tokenizer}, vocab {tok.vocab_size:,}"
        times: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[int, list[float]] = {1: [], 2: []}
        n_tokens = 0
        load_before, ceiling_before = os.getloadavg()[0], parallel_ceiling()
        for rep in range(args.repeats):
            for workers in (1, 2):
                seconds, cpu_s, n_tokens = run([path], tok, workers, tmp / f"out{workers}")
                times[workers].append(seconds)
                cpu[workers].append(cpu_s)
                label = f"run {rep + 1}/{args.repeats}, {workers} worker(s)"
                print(f"  {label}: {seconds:.2f} s wall, {cpu_s:.2f} s CPU", file=sys.stderr)
            if rep == 0:  # same work before comparing speed: the outputs must be byte-identical
                for name in ("train.bin", "train.idx.npy"):
                    if (tmp / "out1" / name).read_bytes() != (tmp / "out2" / name).read_bytes():
                        sys.exit(f"{name} differs between 1 and 2 workers")
        load_after, ceiling_after = os.getloadavg()[0], parallel_ceiling()

    rate = {w: n_tokens / statistics.median(t) for w, t in times.items()}
    rows = [
        "| workers | tokens/s (median) | MB/s | wall per run (s) | CPU per run (s) | speedup |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for w in (1, 2):
        runs = ", ".join(f"{t:.2f}" for t in times[w])
        cpus = ", ".join(f"{t:.2f}" for t in cpu[w])
        mbps = size_mb / statistics.median(times[w])
        rows.append(f"| {w} | {rate[w]:,.0f} | {mbps:.2f} | {runs} | {cpus} | {rate[w] / rate[1]:.2f}x |")
    table = "\n".join(rows)
    command = " ".join(["python benchmarks/tokenization.py", *sys.argv[1:]])
    section = (
        f"{SECTION}\n\n"
        "`moelab data tokenize` throughput with 1 and 2 worker processes on the same input "
        f"(`python benchmarks/tokenization.py`; median of {args.repeats} alternating runs, wall clock, "
        "including reading and writing; CPU = this process and its workers). Other processes on the "
        "machine slow the 2-worker runs most, so the script also measures the ceiling: how much faster a "
        "pure CPU loop runs on 2 processes than on 1 at that moment (2.0 on two idle cores). The outputs "
        "of 1 and 2 workers are checked to be byte-identical first.\n\n"
        f"- input: {source}, {size_mb:.1f} MB, {n_tokens:,} tokens\n"
        f"- tokenizer: {tok_name}\n"
        f"- machine: {_cpu_name()}, {os.cpu_count()} cores; load average {load_before:.1f} before, "
        f"{load_after:.1f} after; 2-process ceiling {ceiling_before:.2f}x before, "
        f"{ceiling_after:.2f}x after\n"
        f"- software: tokenizers {tokenizers.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}\n"
        f"- date: {datetime.date.today()}; command: `{command}`\n\n"
        f"{table}\n"
    )
    print(section)
    if args.out is not None:
        write_section(args.out, section)
        print(f"wrote the {SECTION!r} section of {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
