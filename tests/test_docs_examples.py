"""The docs' examples run against the demo's outputs.

Blocks marked `<!-- demo-example -->` in docs/*.md are executed, in order, in a workspace laid out as
`make demo` leaves it (data/demo/{corpus,tokenizer,tokens}, runs/demo with its kept checkpoints, traces
and lens), with the model and data shrunk but the demo's schedule kept (train.steps, save_every,
keep_last), so checkpoint names match the real demo's. Python blocks share one namespace per file; bash
blocks run each `moelab ...` line through the CLI. The CLI twins quoted in comments must parse, and
every runs/demo or data/demo path the docs name must exist afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
from helpers import write_jsonl

from moelab import demo
from moelab.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- demo-example -->"
BLOCK = re.compile(re.escape(MARK) + r"\n```(\w+)\n(.*?)\n```", re.S)
# the demo model, shrunk: widths and depth only; experts, top-k, positions and schedule stay the demo's
SHRINK = [
    "model.d_model=16",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_expert=16",
    "data.seq_len=32",
    "train.batch_size=2",
    "train.eval_batches=2",
    "train.log_every=50",
]


def marked_blocks() -> list[tuple[Path, int, str, str]]:
    """(doc, line, language, code) of every marked block, docs in name order, blocks in file order."""
    out = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            out.append((doc, text.count("\n", 0, m.start(2)) + 1, m.group(1), m.group(2)))
    return out


def build_demo_workspace(root: Path) -> None:
    """What `make demo` leaves, at test size (see moelab.demo for the real steps)."""
    from moelab.interp.contextual import read_contextual_words

    corpus = root / demo.DATA / "corpus"
    corpus.mkdir(parents=True)
    # sentences of the contextual set, so that its words are single tokens of the small BPE
    texts = [s for w in read_contextual_words() for sense in w.senses for s in sense.samples]
    docs = [{"text": t, "domain": "drama" if i % 2 else "scripture"} for i, t in enumerate(texts)]
    write_jsonl(corpus / "train.jsonl", docs[:400])
    write_jsonl(corpus / "val.jsonl", docs[400:])
    tok, tokens = demo.DATA / "tokenizer", demo.DATA / "tokens"
    run = [
        ["tokenizer", "train", str(corpus / "train.jsonl"), "--vocab-size", "1200", "--out", str(tok)],
        ["data", "tokenize", str(corpus / "train.jsonl"), str(corpus / "val.jsonl"), "--tokenizer", str(tok),
         "--out", str(tokens)],
        ["train", str(ROOT / demo.CONFIG), "--out", str(demo.RUN), "--no-progress",
         *[a for o in SHRINK for a in ("--set", o)], "--set", "model.vocab_size=1200"],
        *demo.trace_commands(demo.RUN, tokens, demo.RUN / "trace", demo.RUN / "trace-contextual"),
        ["lens", str(demo.RUN), "--data", str(tokens), "--max-tokens", "16384"],
    ]  # fmt: skip
    for argv in run:
        assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("demo-docs")
    previous, threads = Path.cwd(), torch.get_num_threads()
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.chdir(root)  # the docs' paths are relative to the directory `make demo` ran in
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread
    try:
        build_demo_workspace(root)
        yield root
    finally:
        torch.set_num_threads(threads)
        os.chdir(previous)


def run_block(doc: Path, line: int, language: str, code: str, namespace: dict) -> None:
    where = f"{doc.name}:{line}"
    if language == "python":
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 (the docs' own examples)
    elif language in ("bash", "sh"):
        for i, text in enumerate(code.splitlines()):
            argv = shlex.split(text, comments=True)
            if argv[:1] == ["moelab"]:
                assert main(argv[1:]) == 0, f"{doc.name}:{line + i}: `{text.strip()}` failed"
    else:
        raise AssertionError(f"{where}: a demo example must be python or bash, not {language}")


@pytest.fixture(scope="module")
def executed(workspace):
    """The workspace after every marked block ran (a failing block fails here, naming its line)."""
    import matplotlib.pyplot as plt

    namespaces: dict[Path, dict] = {}
    for doc, line, language, code in marked_blocks():
        run_block(doc, line, language, code, namespaces.setdefault(doc, {"__name__": "__docs__"}))
    plt.close("all")
    return workspace


def test_marked_examples_run_against_the_demo_outputs(executed):
    blocks = marked_blocks()
    assert {"ANALYSIS.md", "TRAINING.md"} <= {doc.name for doc, *_ in blocks} and len(blocks) >= 9
    assert (executed / "runs" / "demo" / "trace-step300" / "meta.json").is_file()
    assert (executed / "runs" / "demo" / "saturation.json").is_file()
    assert (executed / "hf" / "demo" / "config.json").is_file()


def test_cli_twins_in_comments_parse_and_named_demo_paths_exist(executed):
    """A command quoted in a comment (`# moelab ...`) must be one the CLI takes, and every runs/demo/...
    or data/demo/... path in the docs must be something the demo (plus the examples) wrote."""
    parser = build_parser()
    for doc, line, language, code in marked_blocks():
        for i, text in enumerate(code.splitlines()):
            m = re.search(r"#\s*(?:CLI:\s*)?moelab (.*)$", text)
            if m is None or "..." in m.group(1) or language != "python":
                continue
            try:
                parser.parse_args(shlex.split(m.group(1)))
            except SystemExit:
                pytest.fail(f"{doc.name}:{line + i}: `moelab {m.group(1)}` is not a valid command")
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for path in sorted(
            {p.rstrip(".") for p in re.findall(r"\b(?:runs|data)/demo(?:/[\w.-]+)*", doc.read_text())}
        ):
            assert (executed / path).exists(), f"{doc.name} names {path}, which the demo does not keep"
