"""Test data and model settings used by several test files.

A plain module: tests/ has no __init__.py, so pytest puts tests/ on sys.path and test files import it as
`from helpers import ...`. Fixtures live in conftest.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# Frequent words for merges, plus accents, CJK and punctuation-bearing tokens for byte-level coverage.
WORDS = [
    "the",
    "king",
    "shall",
    "speak",
    "unto",
    "river",
    "light",
    "über",
    "naïve",
    "日本",
    "code",
    "def",
    "x=1",
]


def synthetic_docs(n: int, seed: int = 0, lengths: tuple[int, int] = (3, 80)) -> list[str]:
    """`n` documents of random WORDS, each `lengths` words long (inclusive range) plus an ending."""
    rng = random.Random(seed)
    lo, hi = lengths
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "!\n", "?"])
        for _ in range(n)
    ]


def write_jsonl(path: Path, records) -> Path:
    """One JSON object per line, UTF-8."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def tiny_model_overrides(*extra: str, eos_token_id: int = 2) -> list[str]:
    """Config overrides for a 2-layer, 8-expert, top-2 OLMoE that runs in milliseconds; `extra` goes last."""
    return [
        "model.vocab_size=128",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.d_expert=32",
        "model.n_experts=8",
        "model.top_k=2",
        f"model.eos_token_id={eos_token_id}",
        "model.max_seq_len=64",
        *extra,
    ]


# A 2-layer model for the two-domain training data of conftest.py (its BPE: eos 0, pad 1).
TINY_TRAIN_MODEL = [
    "model.vocab_size=320",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_expert=32",
    "model.n_experts=4",
    "model.top_k=2",
    "model.max_seq_len=32",
    "model.pad_token_id=1",
    "model.eos_token_id=0",
]
