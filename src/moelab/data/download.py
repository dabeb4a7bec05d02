"""Web corpora as JSONL shards: FineWeb-Edu (English educational web pages) streamed from the Hub.

The layout is `val-00000.jsonl` (the first V documents of the stream), then `train-00000.jsonl`,
`train-00001.jsonl`, ... with M documents each, and `metadata.json`. Every shard is written
atomically, so an interrupted download leaves only complete shards; running the same command again
skips the documents those shards cover and continues. The stream is deterministic (no shuffling), so
a resumed download equals an uninterrupted one.

Offline this fails at once: the HF offline variables are checked first, then a 3-second connection
probe, before `datasets` ever starts its retrying hub client.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from moelab.errors import MoelabError
from moelab.io import atomic_file

log = logging.getLogger(__name__)

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
DEFAULT_CONFIG = "sample-10BT"
FIELDS = ("text", "id", "url", "score")
LICENSE = "ODC-By 1.0 (FineWeb-Edu); use is also subject to Common Crawl's terms of use"
FORMAT = "moelab-shards"
PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.jsonl"


# ----------------------------------------------------------------------------- the stream


def _offline_var() -> str | None:
    """The HF offline variable that is set to a true value, if any."""
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return var
    return None


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hub (HF_ENDPOINT, default huggingface.co:443) opens in time.

    Runs in a thread so that a slow DNS lookup is bounded by the same timeout.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def fineweb_edu_stream(config: str = DEFAULT_CONFIG) -> Iterator[dict]:
    """Rows of FineWeb-Edu's train split, streamed by `datasets`; fails fast when offline."""
    if var := _offline_var():
        raise MoelabError(
            f"{var} is set, so {FINEWEB_EDU} cannot be downloaded; unset it and run again online"
        )
    if importlib.util.find_spec("datasets") is None:
        raise MoelabError(f"downloading {FINEWEB_EDU} needs the datasets package: pip install datasets")
    if not hub_reachable():
        raise MoelabError(
            f"cannot reach the Hugging Face Hub to download {FINEWEB_EDU} (no network?); run again online"
        )
    import datasets

    log.info("streaming %s (%s)", FINEWEB_EDU, config)
    return iter(datasets.load_dataset(FINEWEB_EDU, name=config, split="train", streaming=True))


# ----------------------------------------------------------------------------- shards


def _record(row: dict) -> dict:
    return {field: row.get(field) for field in FIELDS}


def _accepted(rows: Iterable[dict], min_score: float | None) -> Iterator[dict]:
    """Rows kept by the score filter; a failure of the stream becomes one resumable error line."""
    it = iter(rows)
    kept = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except MoelabError:
            raise
        except Exception as e:  # the network or the Hub failed mid-stream
            raise MoelabError(
                f"the {FINEWEB_EDU} stream failed after {kept} documents ({type(e).__name__}: {e}); "
                "complete shards are kept: run the same command again to resume"
            ) from e
        score = row.get("score")
        if min_score is None or (score is not None and score >= min_score):
            kept += 1
            yield _record(row)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))


def _plan(samples: int, shard_size: int, val_samples: int) -> list[tuple[str, int, int]]:
    """(file name, first accepted-document index, documents) for every shard, val first."""
    plan = [(shard_name("val", 0), 0, val_samples)] if val_samples else []
    for i, start in enumerate(range(0, samples, shard_size)):
        plan.append((shard_name("train", i), val_samples + start, min(shard_size, samples - start)))
    return plan


def _check_settings(out: Path, settings: dict) -> dict | None:
    """The metadata of an earlier download into `out`; refuse to mix settings or foreign files."""
    meta_file = out / "metadata.json"
    if not meta_file.is_file():
        if _shard_files(out):
            raise MoelabError(f"{out} holds shards without metadata.json; choose a new --out")
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        raise MoelabError(f"{meta_file} is not valid JSON; choose a new --out") from None
    old = meta.get("settings", {})
    if meta.get("format") != FORMAT or {k: old.get(k) for k in settings} != settings:
        diff = ", ".join(f"{k}={old.get(k)!r}" for k in settings if old.get(k) != settings[k])
        raise MoelabError(
            f"{out} holds a download with other settings ({diff or 'not a moelab download'}); "
            "use the same flags to resume, or a new --out"
        )
    return meta


def download_fineweb_edu(
    out: str | Path,
    samples: int,
    shard_size: int,
    val_samples: int,
    min_score: float | None = None,
    stream: Iterable[dict] | None = None,
    *,
    config: str = DEFAULT_CONFIG,
    progress: bool = True,
) -> dict:
    """Write FineWeb-Edu JSONL shards (fields text, id, url, score) to `out`; return the metadata.

    `stream` replaces the Hub stream (an iterable of row dicts, in a fixed order). Finished shards
    of an earlier run with the same settings are kept and their documents skipped.
    """
    if samples < 1 or shard_size < 1 or val_samples < 0:
        raise MoelabError(
            f"--samples ({samples}) and --shard-size ({shard_size}) must be >= 1, "
            f"--val-samples ({val_samples}) >= 0"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MoelabError(f"{out} is a file; --out must be a directory")
    settings = {
        "dataset": FINEWEB_EDU,
        "config": config,
        "split": "train",
        "shard_size": shard_size,
        "val_samples": val_samples,
        "min_score": min_score,
    }
    if out.exists():
        _check_settings(out, settings)
    plan = _plan(samples, shard_size, val_samples)
    extra = sorted(set(_shard_files(out)) - {name for name, _, _ in plan})
    if extra:
        raise MoelabError(
            f"{out} holds more shards than --samples {samples} needs ({extra[-1]}); "
            "use the earlier --samples or a new --out"
        )
    done = 0  # leading shards already complete
    for name, _, count in plan:
        if (out / name).is_file() and _count_lines(out / name) == count:
            done += 1
        else:
            break
    meta = {
        "format": FORMAT,
        "settings": settings,
        "samples": samples,
        "license": LICENSE,
        "fields": list(FIELDS),
        "complete": False,
    }
    if done == len(plan):
        log.info("%s is up to date (%d shards); nothing to do", out, len(plan))
        return _finish(out, meta, plan, complete=True)
    rows = stream if stream is not None else fineweb_edu_stream(config)  # fails here when offline

    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.jsonl.tmp-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    _write_meta(out, meta | _shard_summary(plan[:done]))
    skip = plan[done][1]
    exhausted = False
    with tqdm(
        total=val_samples + samples,
        initial=skip,
        desc=FINEWEB_EDU,
        unit="doc",
        disable=None if progress else True,
    ) as bar:
        docs = _accepted(rows, min_score)
        for _ in itertools.islice(docs, skip):  # covered by complete shards
            pass
        for index in range(done, len(plan)):
            name, first, count = plan[index]
            with atomic_file(out / name, "w", encoding="utf-8") as fh:
                written = 0
                for doc in itertools.islice(docs, count):
                    fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
                    written += 1
                    bar.update()
            if written < count:
                exhausted = True
                log.warning("the stream ended early: %s has %d of %d documents", name, written, count)
                if written:
                    plan = [*plan[:index], (name, first, written)]
                else:
                    (out / name).unlink()
                    plan = plan[:index]
                break
            _write_meta(out, meta | _shard_summary(plan[: index + 1]))
    if not plan:
        raise MoelabError(
            f"the {FINEWEB_EDU} stream yielded no documents (is --min-score {min_score} too high?)"
        )
    return _finish(out, meta, plan, complete=not exhausted)


def _shard_files(out: Path) -> list[str]:
    if not out.is_dir():
        return []
    return [p.name for p in out.iterdir() if re.fullmatch(r"(train|val)-\d{5}\.jsonl", p.name)]


def _shard_summary(plan: list[tuple[str, int, int]]) -> dict:
    val = [{"file": n, "documents": c} for n, _, c in plan if n.startswith("val-")]
    train = [{"file": n, "documents": c} for n, _, c in plan if n.startswith("train-")]
    return {
        "val": val,
        "train": train,
        "val_documents": sum(s["documents"] for s in val),
        "train_documents": sum(s["documents"] for s in train),
    }


def _write_meta(out: Path, meta: dict) -> None:
    with atomic_file(out / "metadata.json") as fh:
        fh.write(json.dumps(meta, indent=2) + "\n")


def _finish(out: Path, meta: dict, plan: list[tuple[str, int, int]], complete: bool) -> dict:
    meta = meta | _shard_summary(plan) | {"complete": complete}
    _write_meta(out, meta)
    return meta


def cmd_download(args) -> None:
    from moelab.cli import show_progress

    meta = download_fineweb_edu(
        args.out,
        args.samples,
        args.shard_size,
        args.val_samples,
        min_score=args.min_score,
        progress=show_progress(args),
    )
    print(
        f"{args.out}: {meta['train_documents']:,} training documents in {len(meta['train'])} shards, "
        f"{meta['val_documents']:,} validation documents"
        + ("" if meta["complete"] else " (the stream ended early)")
    )
