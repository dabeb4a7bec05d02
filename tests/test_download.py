"""`moelab data download fineweb-edu`: shards from a fake stream; offline failures are immediate."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from moelab.data import download
from moelab.data.download import download_fineweb_edu
from moelab.errors import MoelabError


def _rows(n: int) -> list[dict]:
    """Rows shaped like FineWeb-Edu's (with columns the shards do not keep); scores 2.5, 3.0, 3.5, ..."""
    return [
        {
            "text": f"Document {i} — about photosynthesis.",
            "id": f"<urn:uuid:{i:04d}>",
            "dump": "CC-MAIN-2024-10",
            "url": f"https://example.org/{i}",
            "language": "en",
            "token_count": 7,
            "score": 2.5 + 0.5 * (i % 3),
            "int_score": 3,
        }
        for i in range(n)
    ]


def _expected(row: dict) -> dict:
    return {"text": row["text"], "id": row["id"], "url": row["url"], "score": row["score"]}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


class Failing:
    """A stream that fails after `after` rows, as a dropped connection would."""

    def __init__(self, rows: list[dict], after: int):
        self.rows, self.after, self.served = rows, after, 0

    def __iter__(self):
        for row in self.rows:
            if self.served == self.after:
                raise ConnectionError("connection reset by peer")
            self.served += 1
            yield row


class Counting:
    def __init__(self, rows: list[dict]):
        self.rows, self.served = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.served += 1
            yield row


def test_shards_sizes_fields_and_val_first(tmp_path):
    rows = _rows(100)
    out = tmp_path / "fw"
    meta = download_fineweb_edu(out, samples=25, shard_size=10, val_samples=5, stream=rows)
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.json", "train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl", "val-00000.jsonl",
    ]  # fmt: skip
    val = _read(out / "val-00000.jsonl")
    train = [d for i in range(3) for d in _read(out / f"train-{i:05d}.jsonl")]
    assert [len(_read(out / f"train-{i:05d}.jsonl")) for i in range(3)] == [10, 10, 5]
    assert val == [_expected(r) for r in rows[:5]]  # the first documents of the stream
    assert train == [_expected(r) for r in rows[5:30]]
    assert not {d["id"] for d in val} & {d["id"] for d in train}
    assert "—" in (out / "val-00000.jsonl").read_text(encoding="utf-8")  # UTF-8, not \\u escapes
    assert meta == json.loads((out / "metadata.json").read_text())
    assert meta["complete"] and meta["train_documents"] == 25 and meta["val_documents"] == 5
    assert [s["documents"] for s in meta["train"]] == [10, 10, 5] and meta["fields"] == [
        "text",
        "id",
        "url",
        "score",
    ]
    assert not list(out.glob(".*"))  # no temporaries


def test_min_score_filter(tmp_path):
    rows = _rows(60) + [{"text": "no score", "id": "x", "url": "u"}]
    out = tmp_path / "fw"
    download_fineweb_edu(out, samples=12, shard_size=5, val_samples=3, min_score=3.0, stream=rows)
    kept = [_expected(r) for r in rows if r.get("score") is not None and r["score"] >= 3.0]
    got = _read(out / "val-00000.jsonl") + [d for i in range(3) for d in _read(out / f"train-{i:05d}.jsonl")]
    assert got == kept[:15]
    assert all(d["score"] >= 3.0 for d in got)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    rows = _rows(100)
    whole = tmp_path / "whole"
    download_fineweb_edu(whole, samples=25, shard_size=10, val_samples=5, stream=rows)

    out = tmp_path / "resumed"
    with pytest.raises(MoelabError, match="run the same command again to resume") as err:
        download_fineweb_edu(out, samples=25, shard_size=10, val_samples=5, stream=Failing(rows, after=17))
    assert "\n" not in str(err.value)
    # val (5) and train-00000 (10) were complete; train-00001 had 2 of 10 rows: not visible.
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "train-00000.jsonl", "val-00000.jsonl"]
    meta = json.loads((out / "metadata.json").read_text())
    assert not meta["complete"] and meta["train_documents"] == 10
    kept = {name: (out / name).stat().st_mtime_ns for name in ("val-00000.jsonl", "train-00000.jsonl")}

    download_fineweb_edu(out, samples=25, shard_size=10, val_samples=5, stream=rows)
    assert _files(out) == _files(whole)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten


def test_more_samples_extends_a_finished_download(tmp_path):
    rows = _rows(100)
    whole = tmp_path / "whole"
    download_fineweb_edu(whole, samples=40, shard_size=10, val_samples=5, stream=rows)
    out = tmp_path / "grown"
    download_fineweb_edu(out, samples=25, shard_size=10, val_samples=5, stream=rows)
    download_fineweb_edu(out, samples=40, shard_size=10, val_samples=5, stream=rows)  # train-00002: 5 -> 10
    assert _files(out) == _files(whole)
    with pytest.raises(MoelabError, match="more shards than --samples 15"):
        download_fineweb_edu(out, samples=15, shard_size=10, val_samples=5, stream=rows)


def test_up_to_date_reads_nothing(tmp_path):
    out = tmp_path / "fw"
    download_fineweb_edu(out, samples=20, shard_size=10, val_samples=5, stream=_rows(50))
    before = _files(out)
    stream = Counting(_rows(50))
    meta = download_fineweb_edu(out, samples=20, shard_size=10, val_samples=5, stream=stream)
    assert stream.served == 0 and meta["complete"] and _files(out) == before


def test_other_settings_are_refused(tmp_path):
    out = tmp_path / "fw"
    download_fineweb_edu(out, samples=20, shard_size=10, val_samples=5, stream=_rows(50))
    with pytest.raises(MoelabError, match="shard_size=10"):
        download_fineweb_edu(out, samples=20, shard_size=7, val_samples=5, stream=_rows(50))
    with pytest.raises(MoelabError, match="min_score=None"):
        download_fineweb_edu(out, samples=20, shard_size=10, val_samples=5, min_score=3.0, stream=_rows(50))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-00000.jsonl").write_text("{}\n")
    with pytest.raises(MoelabError, match="without metadata.json"):
        download_fineweb_edu(foreign, samples=20, shard_size=10, val_samples=5, stream=_rows(50))
    with pytest.raises(MoelabError, match="--samples"):
        download_fineweb_edu(tmp_path / "bad", samples=0, shard_size=10, val_samples=5, stream=_rows(5))


def test_short_stream_keeps_what_it_got(tmp_path):
    out = tmp_path / "fw"
    meta = download_fineweb_edu(out, samples=25, shard_size=10, val_samples=5, stream=_rows(17))
    assert not meta["complete"] and meta["val_documents"] == 5 and meta["train_documents"] == 12
    assert [s["documents"] for s in meta["train"]] == [10, 2]
    assert sorted(p.name for p in out.iterdir()) == [
        "metadata.json", "train-00000.jsonl", "train-00001.jsonl", "val-00000.jsonl",
    ]  # fmt: skip
    with pytest.raises(MoelabError, match="no documents"):
        download_fineweb_edu(tmp_path / "none", samples=5, shard_size=5, val_samples=0, stream=[])


# ----------------------------------------------------------------------------- offline


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_cli_fails_at_once_with_one_line(tmp_path, monkeypatch, capsys, var):
    from moelab.cli import main

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1" if name == var else "0")
    out = tmp_path / "fw"
    start = time.perf_counter()
    rc = main(
        ["data", "download", "fineweb-edu", "--out", str(out), "--samples", "100", "--shard-size", "10"]
    )
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err.strip()
    assert rc == 2 and elapsed < 1.0
    assert err.startswith("moelab: error: ") and "\n" not in err and var in err
    assert not out.exists()


def test_missing_datasets_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MoelabError, match="pip install datasets"):
        download_fineweb_edu(tmp_path / "fw", samples=10, shard_size=10, val_samples=0)
    assert not (tmp_path / "fw").exists()


def test_unreachable_hub_fails_after_the_probe(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(download.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(download, "hub_reachable", lambda: False)
    with pytest.raises(MoelabError, match="cannot reach the Hugging Face Hub"):
        download_fineweb_edu(tmp_path / "fw", samples=10, shard_size=10, val_samples=0)
    assert not (tmp_path / "fw").exists()


def test_hub_probe_against_local_ports(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        assert download.hub_reachable(timeout=1.0)
    # The same port, now closed: refused at once, not after the timeout.
    start = time.perf_counter()
    assert not download.hub_reachable(timeout=1.0)
    assert time.perf_counter() - start < 1.0
