"""The training loader: memory-mapped token files, packed windows, shuffling, sharding, exact resume."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch
from helpers import WORDS, write_jsonl

from moelab.data.loader import PackedLoader, TokenDataset
from moelab.data.tokenize import tokenize_files
from moelab.data.tokenizer import load_tokenizer, train_tokenizer
from moelab.errors import MoelabError

SEQ, BATCH = 16, 4


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        r = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) + f" {i}."}
        if rng.random() < 0.8:
            r["domain"] = rng.choice(["drama", "poetry", "code"])
        records.append(r)
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenized directory (train + val) with domain labels, and its tokenizer."""
    d = tmp_path_factory.mktemp("loader")
    write_jsonl(d / "a.jsonl", synthetic_records(250))
    tok = load_tokenizer(train_tokenizer([d / "a.jsonl"], vocab_size=350, out=d / "tok", progress=False))
    tokenize_files([d / "a.jsonl"], tok, d / "tokens", val_fraction=0.1, progress=False)
    return d / "tokens", tok


def all_tokens(dir, split="train") -> np.ndarray:
    meta = json.loads((dir / "metadata.json").read_text())
    return np.fromfile(dir / f"{split}.bin", dtype=meta["dtype"]).astype(np.int64)


def rows(batch) -> list[tuple[int, ...]]:
    """Each row as its full window: input_ids plus the last label."""
    full = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return [tuple(r) for r in full.tolist()]


def test_dataset_maps_the_file(data):
    dir, tok = data
    ds = TokenDataset(dir)
    ref = all_tokens(dir)
    assert len(ds) == len(ref) and ds.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(ds.tokens), ref)
    view = ds.view(10, 50)
    assert np.shares_memory(view.numpy(), ds.tokens)  # zero-copy
    np.testing.assert_array_equal(view.numpy(), ref[10:50])
    for i in (0, 7, ds.n_documents - 1):
        doc = ds.document(i).tolist()
        assert doc[-1] == tok.eos_id and tok.eos_id not in doc[:-1]
    assert ds.n_documents == int((ref == tok.eos_id).sum())
    meta = json.loads((dir / "metadata.json").read_text())
    assert TokenDataset(dir, "val").n_tokens == meta["splits"]["val"]["tokens"]


def test_windows_are_contiguous_slices_and_labels_shift(data):
    dir, _ = data
    ref = all_tokens(dir)
    loader = PackedLoader(TokenDataset(dir), SEQ, BATCH, seed=3)
    n_windows = (len(ref) - 1) // SEQ
    windows = {}
    for w in range(n_windows):
        windows.setdefault(tuple(ref[w * SEQ : w * SEQ + SEQ + 1]), []).append(w)
    seen = []
    for _ in range(len(loader)):
        batch = next(loader)
        assert batch["input_ids"].shape == (BATCH, SEQ) and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])  # labels = next tokens
        for r in rows(batch):
            assert r in windows  # a slice of the stream starting at a multiple of seq_len
            seen.append(r)
    assert loader.epoch == 0
    assert len(seen) == len(set(seen)) == len(loader) * BATCH  # no window twice in an epoch
    assert len(loader) == n_windows // BATCH
    # the next batch starts epoch 1 in another order over the same windows
    epoch1 = [r for _ in range(len(loader)) for r in rows(next(loader))]
    assert loader.epoch == 1 and epoch1 != seen
    assert len(set(epoch1) | set(seen)) <= n_windows


def test_same_seed_same_order_other_seed_other_order(data):
    ds = TokenDataset(data[0])
    a = [rows(next(PackedLoader(ds, SEQ, BATCH, seed=0)))]
    b = [rows(next(PackedLoader(ds, SEQ, BATCH, seed=0)))]
    c = [rows(next(PackedLoader(ds, SEQ, BATCH, seed=1)))]
    assert a == b and a != c


@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_yields_the_identical_next_batches(data, drop_last):
    ds = TokenDataset(data[0])
    n = len(PackedLoader(ds, SEQ, 5, drop_last=drop_last)) - 2  # 2n crosses the epoch boundary
    straight = PackedLoader(ds, SEQ, 5, seed=7, drop_last=drop_last, return_doc_ids=True)
    want = [next(straight) for _ in range(2 * n)]
    first = PackedLoader(ds, SEQ, 5, seed=7, drop_last=drop_last, return_doc_ids=True)
    got = [next(first) for _ in range(n)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = PackedLoader(TokenDataset(data[0]), SEQ, 5, seed=7, drop_last=drop_last, return_doc_ids=True)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(n)]
    assert straight.epoch == resumed.epoch == 1 and straight.position == resumed.position
    for a, b in zip(want, got, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not drop_last:  # the partial last batch of an epoch is yielded
        sizes = [len(b["input_ids"]) for b in want]
        assert min(sizes) < 5 and sizes.count(min(sizes)) == 1


def test_rank_sharding_disjoint_and_complete(data):
    ds = TokenDataset(data[0])
    loaders = [PackedLoader(ds, SEQ, 3, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    per_rank = [{r for _ in range(len(ld)) for r in rows(next(ld))} for ld in loaders]
    assert not per_rank[0] & per_rank[1]
    # together they cover the epoch's order up to the last full global batch
    single = PackedLoader(ds, SEQ, 1, seed=2)
    order = [rows(next(single))[0] for _ in range(len(single))]
    assert per_rank[0] | per_rank[1] == set(order[: 2 * 3 * len(loaders[0])])
    assert loaders[0].position == loaders[1].position == 2 * 3 * len(loaders[0])


def test_resume_on_another_world_size(data):
    ds = TokenDataset(data[0])
    two = [PackedLoader(ds, SEQ, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [r for _ in range(4) for ld in two for r in rows(next(ld))]
    assert two[0].state_dict() == two[1].state_dict()
    one = PackedLoader(ds, SEQ, 3, seed=5)
    one.load_state_dict(two[0].state_dict())
    while one.epoch == 0:
        batch = next(one)
        if one.epoch == 0:
            seen += rows(batch)
    n_windows = (ds.n_tokens - 1) // SEQ
    assert len(seen) == len(set(seen))  # nothing twice
    assert n_windows - len(seen) < 3  # everything but the tail of the last batch


def test_doc_ids_and_domains_match_a_brute_force_loop(data):
    dir, _ = data
    ds = TokenDataset(dir)
    index = np.load(dir / "train.idx.npy")
    labels = np.load(dir / "train.labels.npy")
    loader = PackedLoader(ds, SEQ, BATCH, seed=1, return_doc_ids=True)
    for epoch_batch in range(3):
        windows = loader.epoch_windows(0)[epoch_batch * BATCH : (epoch_batch + 1) * BATCH]
        batch = next(loader)
        for row, w in enumerate(windows):
            assert batch["input_ids"][row].tolist() == ds.tokens[w * SEQ : w * SEQ + SEQ].tolist()
            for j in range(SEQ):
                pos = w * SEQ + j
                doc = next(d for d, (off, n) in enumerate(index) if off <= pos < off + n)
                assert batch["doc_ids"][row, j] == doc
                assert batch["domains"][row, j] == labels[doc, 0]
    assert batch["doc_ids"].dtype == torch.long and (batch["domains"] >= -1).all()


def broken_copy(src, tmp_path):
    dst = tmp_path / "tokens"
    shutil.copytree(src, dst)
    return dst


def test_truncated_and_wrong_dtype_files(data, tmp_path):
    dir = broken_copy(data[0], tmp_path)
    raw = (dir / "train.bin").read_bytes()
    (dir / "train.bin").write_bytes(raw[:-6])
    with pytest.raises(MoelabError, match=r"train.bin has .* bytes but metadata.json says .*truncated"):
        TokenDataset(dir)
    np.frombuffer(raw, dtype=np.uint16).astype(np.uint32).tofile(dir / "train.bin")
    with pytest.raises(MoelabError, match=r"train.bin .*looks like uint32 data"):
        TokenDataset(dir)
    (dir / "train.bin").write_bytes(raw[2:] + raw[:2])  # right size, shifted content
    with pytest.raises(MoelabError, match=r"train.bin: documents do not end with eos"):
        TokenDataset(dir)
    (dir / "train.bin").write_bytes(raw)
    np.save(dir / "train.idx.npy", np.zeros((3, 2), dtype=np.int64))
    with pytest.raises(MoelabError, match=r"train.idx.npy has shape \(3, 2\)"):
        TokenDataset(dir)
    meta = json.loads((dir / "metadata.json").read_text())
    (dir / "metadata.json").write_text(json.dumps({**meta, "dtype": "uint16", "vocab_size": 70000}))
    with pytest.raises(MoelabError, match=r"metadata.json: dtype 'uint16' cannot hold"):
        TokenDataset(dir)
    (dir / "metadata.json").unlink()
    with pytest.raises(MoelabError, match=r"has no metadata.json"):
        TokenDataset(dir)
    with pytest.raises(MoelabError, match=r"has no 'test' split \(it has: train, val\)"):
        TokenDataset(data[0], "test")


def test_tokenizer_mismatch(data, tmp_path):
    dir, tok = data
    ds = TokenDataset(dir)
    ds.check_tokenizer(tok)
    ds.check_tokenizer(tok.hash)
    shutil.copy(dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ds.check_tokenizer(tmp_path / "tokenizer.json")  # a copy is the same tokenizer
    (tmp_path / "t.jsonl").write_text('{"text": "a different corpus gives a different vocabulary"}\n')
    other = load_tokenizer(
        train_tokenizer([tmp_path / "t.jsonl"], vocab_size=270, out=tmp_path / "o", progress=False)
    )
    with pytest.raises(MoelabError) as e:
        ds.check_tokenizer(other)
    msg = str(e.value)
    assert str(dir) in msg and tok.hash[:12] in msg and other.hash[:12] in msg and str(tmp_path / "o") in msg


def test_loader_settings_errors(data):
    ds = TokenDataset(data[0])
    with pytest.raises(MoelabError, match=rf"seq_len {ds.n_tokens} needs at least .*train.bin has"):
        PackedLoader(ds, ds.n_tokens, 1)
    with pytest.raises(MoelabError, match=r"train.bin gives .* fewer than batch_size x world_size"):
        PackedLoader(ds, 512, 64)
    with pytest.raises(MoelabError, match="bad loader settings"):
        PackedLoader(ds, SEQ, BATCH, rank=2, world_size=2)
    state = PackedLoader(ds, SEQ, BATCH).state_dict()
    with pytest.raises(MoelabError, match=r"saved with seq_len=16 but this loader has seq_len=8"):
        PackedLoader(ds, 8, BATCH).load_state_dict(state)
