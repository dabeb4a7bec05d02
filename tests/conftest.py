"""Shared test setup: everything runs offline; expensive imports happen once per session."""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"  # hub calls would otherwise retry for ~30-50 s

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def transformers():
    """The transformers package (imported once: ~4.5 s), or skip where it is not installed."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def two_domain_data(tmp_path_factory):
    """A small tokenized dataset: 80 documents in two labelled domains (70 train, 10 val) and its tokenizer.

    The root holds train.jsonl, val.jsonl, tok/ (byte-level BPE, vocabulary <= 300) and tokens/. Tests only
    read it; anything they write goes to their own directories.
    """
    import json

    import torch

    from moelab.data.tokenize import tokenize_files
    from moelab.data.tokenizer import train_tokenizer

    words = {
        "drama": ["king", "queen", "crown", "sword", "castle", "ghost", "night", "murder", "throne", "exile"],
        "science": ["atom", "energy", "cell", "gene", "force", "mass", "orbit", "light", "wave", "field"],
    }
    root = tmp_path_factory.mktemp("two-domain-data")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i in range(80):
        domain = "drama" if i % 2 else "science"
        idx = torch.randint(len(words[domain]), (60,), generator=g).tolist()
        text = " ".join(words[domain][j] for j in idx) + "."
        lines.append(json.dumps({"text": text, "domain": domain, "doc_id": f"d{i}"}))
    (root / "train.jsonl").write_text("\n".join(lines[:70]) + "\n")
    (root / "val.jsonl").write_text("\n".join(lines[70:]) + "\n")
    train_tokenizer([root / "train.jsonl"], 300, root / "tok", progress=False)
    tokenize_files([root / "train.jsonl", root / "val.jsonl"], root / "tok", root / "tokens", progress=False)
    return root
