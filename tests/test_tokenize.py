"""Tokenizing files into flat token files: every format, splits, labels, workers, bad input."""

from __future__ import annotations

import json
import logging
import random
import sys

import numpy as np
import pytest
from helpers import synthetic_docs, write_jsonl

import moelab.data.tokenize as tokenize_mod
from moelab.cli import main
from moelab.data.tokenize import token_dtype, tokenize_files
from moelab.data.tokenizer import EOS_TOKEN, MoeTokenizer, load_tokenizer, train_tokenizer
from moelab.errors import MoelabError


@pytest.fixture(scope="session")
def tok(tmp_path_factory) -> MoeTokenizer:
    d = tmp_path_factory.mktemp("tok_src")
    write_jsonl(d / "a.jsonl", [{"text": t} for t in synthetic_docs(200, seed=99)])
    return load_tokenizer(train_tokenizer([d], vocab_size=400, out=d / "tok", progress=False))


def reference(tok: MoeTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and per-document lengths (with eos) straight from the tokenizer, one document at a time."""
    ids = [tok.encode(t) + [tok.eos_id] for t in texts]
    return np.array([i for doc in ids for i in doc], dtype=np.int64), np.array([len(d) for d in ids])


def read_split(out, split):
    meta = json.loads((out / "metadata.json").read_text())
    tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)
    return tokens, np.load(out / f"{split}.idx.npy"), np.load(out / f"{split}.labels.npy"), meta


def check_against_reference(tok, out, texts, split="train"):
    tokens, index, _, meta = read_split(out, split)
    want, lengths = reference(tok, texts)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(index[:, 1], lengths)
    np.testing.assert_array_equal(index[:, 0], np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    assert meta["splits"][split] == {"tokens": len(want), "documents": len(texts)}
    assert (tokens == tok.eos_id).sum() == len(texts)  # one eos per document, nowhere else
    return meta


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet"])
def test_each_format_matches_the_tokenizer(tok, tmp_path, fmt):
    texts = synthetic_docs(40, seed=1)
    src = tmp_path / "src"
    src.mkdir()
    if fmt == "txt":
        for i, t in enumerate(texts):
            (src / f"doc{i:03d}.txt").write_text(t, encoding="utf-8")
    elif fmt == "jsonl":
        write_jsonl(src / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    elif fmt == "json":
        (src / "shard.json").write_text(json.dumps(texts), encoding="utf-8")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), src / "a.parquet", row_group_size=7)
    tokenize_files([src], tok, tmp_path / "out", progress=False)
    meta = check_against_reference(tok, tmp_path / "out", texts)
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tok.hash
    assert (meta["eos_id"], meta["pad_id"], meta["vocab_size"]) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert load_tokenizer(tmp_path / "out").hash == tok.hash  # the tokenizer travels with the data


def test_directory_expansion_order_and_sidecars(tok, tmp_path):
    a, b, c = synthetic_docs(3, seed=5), synthetic_docs(2, seed=6), synthetic_docs(4, seed=7)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_jsonl(src / "b.jsonl", [{"text": t} for t in a])
    (src / "a.txt").write_text(b[0], encoding="utf-8")
    (src / "sub" / "c.json").write_text(json.dumps(c), encoding="utf-8")
    (src / "metadata.json").write_text(json.dumps({"not": "documents"}))  # sidecar: skipped
    (src / ".hidden.jsonl").write_text('{"text": "hidden"}\n')  # hidden: skipped
    (src / "notes.csv").write_text("x,y\n")  # unsupported inside a directory: ignored
    extra = tmp_path / "extra.txt"
    extra.write_text(b[1], encoding="utf-8")
    tokenize_files([src, extra], tok, tmp_path / "out", progress=False)
    check_against_reference(tok, tmp_path / "out", [b[0], *a, *c, b[1]])  # sorted, then the explicit file


def test_dtype_choice(tok, tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    assert token_dtype(50304) == np.uint16
    texts = synthetic_docs(10, seed=2)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    big = MoeTokenizer(load_tokenizer(tok.source).tokenizer, tok.eos_id, tok.pad_id, source="big")
    big.tokenizer.add_tokens([f"<extra_{i}>" for i in range(66000)])  # never occur in the text
    assert big.vocab_size > 65535
    tokenize_files([tmp_path / "a.jsonl"], big, tmp_path / "out", progress=False)
    meta = check_against_reference(big, tmp_path / "out", texts)
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * meta["splits"]["train"]["tokens"]


def labelled_corpus(path, n=120, seed=0):
    rng = random.Random(seed)
    records = []
    for i, t in enumerate(synthetic_docs(n, seed=seed)):
        r = {"text": f"{t} #{i}", "doc_id": f"d{i}"}
        if rng.random() < 0.8:
            r["domain"] = rng.choice(["poetry", "drama", "code"])
        if rng.random() < 0.5:
            r["source"] = rng.choice(["gutenberg", "stdlib"])
        records.append(r)
    return write_jsonl(path, records), records


def test_labels_and_index(tok, tmp_path):
    path, records = labelled_corpus(tmp_path / "a.jsonl")
    meta = tokenize_files([path], tok, tmp_path / "out", progress=False)
    assert meta["domains"] == ["code", "drama", "poetry"] and meta["sources"] == ["gutenberg", "stdlib"]
    check_against_reference(tok, tmp_path / "out", [r["text"] for r in records])
    _, _, labels, _ = read_split(tmp_path / "out", "train")
    for row, r in zip(labels, records, strict=True):
        assert row[0] == (meta["domains"].index(r["domain"]) if "domain" in r else -1)
        assert row[1] == (meta["sources"].index(r["source"]) if "source" in r else -1)
    assert labels.dtype == np.int32 and labels.shape == (len(records), 2)
    # with a val split, each split's labels still belong to its own documents
    meta = tokenize_files([path], tok, tmp_path / "split", val_fraction=0.3, progress=False)
    by_text = {r["text"]: r for r in records}
    n_docs = 0
    for split in ("train", "val"):
        tokens, index, labels, _ = read_split(tmp_path / "split", split)
        for (offset, length), row in zip(index, labels, strict=True):
            r = by_text[tok.decode(tokens[offset : offset + length - 1])]
            assert row[0] == (meta["domains"].index(r["domain"]) if "domain" in r else -1)
            assert row[1] == (meta["sources"].index(r["source"]) if "source" in r else -1)
            n_docs += 1
    assert n_docs == len(records)


def test_workers_2_identical_to_1(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 1500)  # many chunks, so both workers get work
    (tmp_path / "src").mkdir()
    labelled_corpus(tmp_path / "src" / "a.jsonl", n=300)
    write_jsonl(
        tmp_path / "src" / "val.jsonl", [{"text": t, "domain": "drama"} for t in synthetic_docs(30, seed=8)]
    )
    metas = [
        tokenize_files(
            [tmp_path / "src"], tok, tmp_path / f"out{w}", workers=w, val_fraction=0.2, progress=False
        )
        for w in (1, 2)
    ]
    assert metas[0] == metas[1]
    for name in [
        "train.bin",
        "train.idx.npy",
        "train.labels.npy",
        "val.bin",
        "val.idx.npy",
        "val.labels.npy",
    ]:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name


def test_spawned_workers_identical(tok, tmp_path, monkeypatch):
    """Workers started with spawn (macOS/Windows default) build their tokenizer from its JSON alone."""
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 1500)
    monkeypatch.setattr(tokenize_mod, "START_METHOD", "spawn")
    path, _ = labelled_corpus(tmp_path / "a.jsonl", n=100)
    metas = [
        tokenize_files([path], tok, tmp_path / f"out{w}", workers=w, val_fraction=0.2, progress=False)
        for w in (1, 2)
    ]
    assert metas[0] == metas[1]
    for name in ["train.bin", "train.idx.npy", "val.bin", "val.idx.npy"]:
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name


def test_val_split(tok, tmp_path):
    val_names = ["val.jsonl", "val-00000.jsonl", "validation.txt", "valid_1.json", "VAL.jsonl"]
    assert all(tokenize_mod.is_val_file(tmp_path / n) for n in val_names)
    assert not any(
        tokenize_mod.is_val_file(tmp_path / n) for n in ["valentine.txt", "interval.jsonl", "train.jsonl"]
    )
    texts = synthetic_docs(300, seed=4)
    texts[10] = texts[200] = "a duplicated document, which must not leak across splits"
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    val_texts = synthetic_docs(7, seed=11)
    write_jsonl(tmp_path / "val-00000.jsonl", [{"text": t} for t in val_texts])

    def val_set(out, seed):
        meta = tokenize_files(
            [tmp_path / "train.jsonl"], tok, out, val_fraction=0.25, seed=seed, progress=False
        )
        tokens, index, _, _ = read_split(out, "val")
        docs = [tok.decode(tokens[o : o + n - 1]) for o, n in index]
        return meta, docs

    meta, val_a = val_set(tmp_path / "a", seed=0)
    _, val_b = val_set(tmp_path / "b", seed=0)
    _, val_c = val_set(tmp_path / "c", seed=1)
    assert val_a == val_b  # deterministic
    assert val_a != val_c  # the seed changes the split
    assert 0.15 < len(val_a) / len(texts) < 0.35
    train_tokens, train_index, _, _ = read_split(tmp_path / "a", "train")
    train_docs = [tok.decode(train_tokens[o : o + n - 1]) for o, n in train_index]
    # every document in exactly one split, each split in input order
    val_iter = iter(val_a)
    train_iter = iter(train_docs)
    nxt_v, nxt_t = next(val_iter, None), next(train_iter, None)
    for t in texts:
        if t == nxt_v:
            nxt_v = next(val_iter, None)
        else:
            assert t == nxt_t
            nxt_t = next(train_iter, None)
    assert nxt_v is None and nxt_t is None
    dup = texts[10]
    assert (dup in val_a) != (dup in train_docs) and (val_a.count(dup) in (0, 2))
    assert meta["splits"]["val"]["documents"] == len(val_a)
    # files named val* go to val whole, the others stay in train without val_fraction
    tokenize_files(
        [tmp_path / "train.jsonl", tmp_path / "val-00000.jsonl"], tok, tmp_path / "d", progress=False
    )
    check_against_reference(tok, tmp_path / "d", val_texts, split="val")
    check_against_reference(tok, tmp_path / "d", texts, split="train")


def test_empty_files_and_invalid_utf8(tok, tmp_path, caplog):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    good = synthetic_docs(3, seed=9)
    write_jsonl(tmp_path / "good.jsonl", [{"text": good[0]}, {"text": "   "}, {"text": good[1]}])
    raw = b"caf\xc3\xa9 \xff\xfe bad \xe2\x82 bytes"  # 2 + 2 invalid bytes (one 2-byte truncated sequence)
    (tmp_path / "latin.txt").write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="moelab"):
        meta = tokenize_files(
            [
                tmp_path / "empty.txt",
                tmp_path / "blank.jsonl",
                tmp_path / "good.jsonl",
                tmp_path / "latin.txt",
            ],
            tok,
            tmp_path / "out",
            progress=False,
        )
    assert any("empty.txt has no documents" in r.message for r in caplog.records)
    assert any("latin.txt: 4 bytes are not valid UTF-8" in r.message for r in caplog.records)
    decoded = raw.decode("utf-8", errors="replace")
    assert decoded.count("\ufffd") == 3
    check_against_reference(tok, tmp_path / "out", [good[0], good[1], decoded])
    assert meta["replaced_bytes"] == 4 and meta["empty_documents"] == 2  # empty.txt and "   "
    by_path = {i["path"]: i for i in meta["inputs"]}
    assert by_path[str(tmp_path / "latin.txt")]["replaced_bytes"] == 4
    assert by_path[str(tmp_path / "empty.txt")]["documents"] == 0
    # a JSON escape for a lone surrogate is not text either: replaced and counted
    (tmp_path / "s.jsonl").write_text('{"text": "ab\\ud800cd"}\n')
    meta = tokenize_files([tmp_path / "s.jsonl"], tok, tmp_path / "s", progress=False)
    check_against_reference(tok, tmp_path / "s", ["ab\ufffdcd"])
    assert meta["replaced_bytes"] == 1


def test_special_token_text_stays_text(tok, tmp_path):
    texts = [f"before {EOS_TOKEN} after", "plain"]
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts])
    tokenize_files([tmp_path / "a.jsonl"], tok, tmp_path / "out", progress=False)
    check_against_reference(tok, tmp_path / "out", texts)  # asserts exactly one eos per document


BAD_INPUTS = {
    "missing_field.jsonl": (
        '{"text": "fine"}\n{"body": "no text here"}\n',
        r"missing_field.jsonl:2: no 'text' field",
    ),
    "invalid.jsonl": ('{"text": "fine"}\n\n{"text": broken\n', r"invalid.jsonl:3: invalid JSON"),
    "not_object.jsonl": ('["a list"]\n', r"not_object.jsonl:1: expected a JSON object"),
    "number.jsonl": ('{"text": 5}\n', r"number.jsonl:1: 'text' is a int"),
    "dict.json": ('{"text": "x"}', r"dict.json: expected a JSON list of strings"),
    "mixed.json": ('["ok", 3]', r"mixed.json: item 1 is a int"),
    "broken.json": ('["ok", ', r"broken.json: invalid JSON"),
    "table.csv": ("a,b\n", r"table.csv: unsupported file type '.csv'"),
    "only_empty.txt": ("", r"no documents in .*only_empty.txt"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_raises_and_cli_prints_one_line(tok, tmp_path, capsys, name):
    content, pattern = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MoelabError, match=pattern):
        tokenize_files([path], tok, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    code = main(
        ["data", "tokenize", str(path), "--tokenizer", str(tok.source), "--out", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("moelab: error: ") and name in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary directory left behind


def test_missing_inputs_and_pyarrow(tok, tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="nope.jsonl does not exist"):
        tokenize_files([tmp_path / "nope.jsonl"], tok, tmp_path / "out", progress=False)
    (tmp_path / "d").mkdir()
    with pytest.raises(MoelabError, match="holds no"):
        tokenize_files([tmp_path / "d"], tok, tmp_path / "out", progress=False)
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MoelabError, match=r"a.parquet: reading .parquet needs pyarrow; pip install pyarrow"):
        tokenize_files([tmp_path / "a.parquet"], tok, tmp_path / "out", progress=False)
    with pytest.raises(MoelabError, match="--workers"):
        tokenize_files([tmp_path / "a.parquet"], tok, tmp_path / "out", workers=0)
    with pytest.raises(MoelabError, match="--val-fraction"):
        tokenize_files([tmp_path / "a.parquet"], tok, tmp_path / "out", val_fraction=1.0)


def test_parquet_missing_column(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(MoelabError, match=r"a.parquet: no 'text' column \(columns: body\)"):
        tokenize_files([tmp_path / "a.parquet"], tok, tmp_path / "out", progress=False)


def test_interrupted_run_leaves_nothing(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenize_mod, "CHUNK_CHARS", 500)
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in synthetic_docs(100)])
    calls = {"n": 0}
    real_add = tokenize_mod._SplitWriter.add

    def failing_add(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_add(self, *args)

    monkeypatch.setattr(tokenize_mod._SplitWriter, "add", failing_add)
    for workers in (1, 2):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            tokenize_files([tmp_path / "a.jsonl"], tok, tmp_path / "out", workers=workers, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_out_guard_and_replace(tok, tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in synthetic_docs(5)])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(MoelabError, match="not a tokenized data directory"):
        tokenize_files([tmp_path / "a.jsonl"], tok, precious, progress=False)
    assert (precious / "notes.txt").read_text() == "keep"
    # an earlier output is replaced whole, via the CLI
    tokenize_files([tmp_path / "a.jsonl"], tok, tmp_path / "out", val_fraction=0.5, progress=False)
    args = ["data", "tokenize", str(tmp_path / "a.jsonl"), "--tokenizer", str(tok.source), "--out"]
    assert main([*args, str(tmp_path / "out")]) == 0
    assert "train: " in capsys.readouterr().out
    assert not (tmp_path / "out" / "val.bin").exists()
    check_against_reference(tok, tmp_path / "out", synthetic_docs(5))
