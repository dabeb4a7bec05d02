"""`make demo`: the whole main job on the embedded defaults, idempotent (a rerun reuses what exists).

corpus → 8k BPE → tokenize → train configs/tiny-cpu.yaml → eval → generate → trace → analyze → lens → report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moelab.cli import main as moelab

DATA = Path("data/demo")
RUN = Path("runs/demo")
CONFIG = Path("configs/tiny-cpu.yaml")


def step(title: str, done: bool, *commands: list[str]) -> None:
    """Run moelab commands under a heading, unless their outputs already exist."""
    print(f"\n== {title}" + (" (up to date, reusing)" if done else ""), flush=True)
    if done:
        return
    for argv in commands:
        print("$ moelab " + " ".join(argv), flush=True)
        rc = moelab(argv)
        if rc:
            sys.exit(rc)


def finished(run: Path, steps: int) -> bool:
    from moelab.checkpoint import checkpoint_step
    from moelab.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    return ckpt is not None and checkpoint_step(ckpt) >= steps


def has_checkpoint(run: Path) -> bool:
    """Whether `train --resume` has something to resume (the trainer's own rule)."""
    from moelab.train.checkpoint import latest_checkpoint

    return latest_checkpoint(run) is not None


def prepare_data(of: str) -> tuple[Path, Path, Path]:
    """Steps 1-3 of the demo (and of `make compare`): the embedded corpus, an 8k BPE, the tokens.
    Returns the corpus, tokenizer and tokens directories under data/demo/."""
    corpus, tok, tokens = DATA / "corpus", DATA / "tokenizer", DATA / "tokens"
    step(
        f"1{of} build the embedded multi-domain corpus",
        (corpus / "metadata.json").is_file(),
        ["data", "corpus", "--out", str(corpus)],
    )
    step(
        f"2{of} train an 8k byte-level BPE",
        (tok / "tokenizer.json").is_file(),
        ["tokenizer", "train", str(corpus / "train.jsonl"), "--vocab-size", "8192", "--out", str(tok)],
    )
    step(
        f"3{of} tokenize (2 workers)",
        (tokens / "metadata.json").is_file(),
        [
            "data",
            "tokenize",
            str(corpus / "train.jsonl"),
            str(corpus / "val.jsonl"),
            "--tokenizer",
            str(tok),
            "--out",
            str(tokens),
            "--workers",
            "2",
        ],
    )
    return corpus, tok, tokens


def trace_commands(run: Path, tokens: Path, trace: Path, ctx: Path) -> list[list[str]]:
    """`moelab trace` of the validation split (with router probabilities) and of the contextual set."""
    data = ["trace", str(run), "--data", str(tokens), "--router-probs", "--batch-size", "16"]
    return [
        [*data, "--out", str(trace)],
        ["trace", str(run), "--contextual", "--batch-size", "32", "--out", str(ctx)],
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moelab.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick tries)")
    args = parser.parse_args(argv)
    start = time.time()
    from moelab.config import load_config

    steps = args.steps or load_config(CONFIG).train.steps
    overrides = [f"train.steps={steps}"]  # also on resume: the run's saved config may hold another length
    corpus, tok, tokens = prepare_data("/10")
    trace, ctx, report = RUN / "trace", RUN / "trace-contextual", RUN / "report.html"
    trained_now = not finished(RUN, steps)
    resume = ["--resume"] if has_checkpoint(RUN) else []
    step(
        "4/10 train the tiny MoE (configs/tiny-cpu.yaml)",
        not trained_now,
        ["train", str(CONFIG), "--out", str(RUN), *resume] + [a for o in overrides for a in ("--set", o)],
    )
    step("5/10 evaluate on the validation split", False, ["eval", str(RUN), "--data", str(tokens)])
    step(
        "6/10 generate a sample",
        False,
        [
            "generate",
            str(RUN),
            "--prompt",
            "KING HENRY:",
            "--max-new-tokens",
            "40",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "1",
        ],
    )
    traced = (trace / "meta.json").is_file() and (ctx / "meta.json").is_file() and not trained_now
    step(
        "7/10 trace the routing: validation split and contextual-token set",
        traced,
        *trace_commands(RUN, tokens, trace, ctx),
    )
    step("8/10 analyze expert specialization", False, ["analyze", str(trace)])
    step(
        "9/10 expert logit lens: the tokens each expert's output promotes",
        False,
        ["lens", str(RUN), "--data", str(tokens), "--max-tokens", "16384"],
    )
    step("10/10 write the HTML report", False, ["report", str(RUN), "--out", str(report)])

    baseline = unigram_baseline(tokens)
    print(f"\nunigram baseline on the validation split (context-free model): {baseline:.3f} nats/token")
    print(f"\ndone in {time.time() - start:.0f} s. Where things are:")
    print(f"  corpus      {corpus}/ (train.jsonl, val.jsonl, metadata.json)")
    print(f"  tokenizer   {tok}/tokenizer.json")
    print(f"  tokens      {tokens}/ (train.bin, val.bin, metadata.json)")
    print(f"  run         {RUN}/ (metrics.jsonl, checkpoints/, trace/, trace-contextual/)")
    print(f"  report      {report}   <- open it in a browser")
    print("Try next:")
    print(f"  moelab generate {RUN} --prompt 'In the beginning' --temperature 0.8")
    print(f"  moelab ablate {RUN} --data {tokens} --experts 0:1,0:2")
    print("  moelab new my-router --from olmoe && moelab train experiments/my-router")
    return 0


def unigram_baseline(tokens: Path) -> float:
    """Validation cross-entropy (nats/token) of the training unigram distribution (add-one smoothed):
    the loss of a model that ignores context. A model that learned anything beats it clearly."""
    import numpy as np

    meta = json.loads((tokens / "metadata.json").read_text())
    read = lambda split: np.memmap(tokens / f"{split}.bin", dtype=meta["dtype"], mode="r")  # noqa: E731
    counts = np.bincount(read("train"), minlength=meta["vocab_size"]).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[read("val")].mean())


if __name__ == "__main__":
    sys.exit(main())
