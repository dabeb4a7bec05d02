"""Tokenize text files into flat token files that the training loader memory-maps.

Output directory (written to a temporary sibling and renamed when complete):
  {split}.bin         every document's tokens followed by one eos, concatenated (uint16 when the
                      vocabulary fits, else uint32)
  {split}.idx.npy     (n_docs, 2) int64: offset and length of each document in {split}.bin; the
                      length counts the document's eos, so documents tile the file exactly
  {split}.labels.npy  (n_docs, 2) int32: domain id and source id of each document (-1 = unknown)
  metadata.json       tokenizer hash and ids, dtype, per-split counts, domain/source names, inputs
  tokenizer.json      the tokenizer used (+ tokenizer_meta.json)

Splits: files named val*/valid*/validation* (e.g. val.jsonl, val-00000.jsonl) go to `val` whole;
with val_fraction > 0 the other documents go to `val` when a keyed hash of their text falls below
the fraction (deterministic, independent of file order and worker count, and duplicates of one
text always land in the same split).

The main process reads the files and writes the output in order; worker processes tokenize
whole chunks of documents, so the output is byte-identical for any number of workers.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moelab.data.tokenizer import MoeTokenizer, load_tokenizer
from moelab.errors import MoelabError
from moelab.io import atomic_dir, disk_full, is_disk_full, tree_size

log = logging.getLogger(__name__)

SUPPORTED = (".txt", ".jsonl", ".json", ".parquet")
CHUNK_CHARS = 1 << 18  # text per worker task: big enough to amortise IPC, small enough to balance load
INFLIGHT_PER_WORKER = 3  # chunks queued per worker (bounds memory on huge inputs)
# fork starts workers at once on Linux; spawn (the default elsewhere) re-imports moelab in each worker
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
_VAL_NAME = re.compile(r"^(val|valid|validation)([-_.].*)?$", re.IGNORECASE)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def is_val_file(path: Path) -> bool:
    return bool(_VAL_NAME.match(path.name.split(".", 1)[0]))


# ----------------------------------------------------------------------------- reading


@dataclass
class Document:
    text: str
    domain: str | None
    source: str | None
    file: int  # index into the expanded file list
    nbytes: int  # input bytes this document accounts for (progress only)


@dataclass
class FileStats:
    documents: int = 0
    empty_documents: int = 0  # empty or whitespace-only texts, skipped
    replaced_bytes: int = 0  # invalid UTF-8 bytes (and JSON lone surrogates), decoded as U+FFFD


class _ReplacedBytes:
    count = 0


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _ReplacedBytes.count += err.end - err.start
    return "\ufffd", err.end  # exactly what errors="replace" produces


codecs.register_error("moelab-count-replace", _count_and_replace)


def _decode(raw: bytes, stats: FileStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        before = _ReplacedBytes.count
        text = raw.decode("utf-8", errors="moelab-count-replace")
        stats.replaced_bytes += _ReplacedBytes.count - before
        return text


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files in the given order; a directory becomes the supported files under it (sorted).

    Inside directories, hidden files and .json files that are not a JSON list (sidecars such as
    metadata.json or tokenizer.json) are left out; files named explicitly are always read.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file()
                and p.suffix.lower() in SUPPORTED
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (p.suffix.lower() != ".json" or _looks_like_list(p))
            ]
            if not found:
                raise MoelabError(
                    f"{path} holds no {'/'.join(SUPPORTED)} files; pass files or another directory"
                )
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in SUPPORTED:
                raise MoelabError(
                    f"{path}: unsupported file type '{path.suffix}'; use {', '.join(SUPPORTED)}"
                )
            files.append(path)
        else:
            raise MoelabError(f"{path} does not exist")
    return list(dict.fromkeys(files))


def _looks_like_list(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def iter_documents(
    files: Sequence[Path], text_field: str = "text", stats: dict[Path, FileStats] | None = None
) -> Iterator[Document]:
    """Every non-empty document of `files`, in order. Bad input raises a one-line MoelabError."""
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    stats = {} if stats is None else stats
    for index, path in enumerate(files):
        st = stats.setdefault(path, FileStats())
        for doc in readers[path.suffix.lower()](path, index, text_field, st):
            if doc.text.strip():
                st.documents += 1
                yield doc
            else:
                st.empty_documents += 1
        if st.replaced_bytes:
            log.warning(
                "%s: %d bytes are not valid UTF-8; replaced them with U+FFFD", path, st.replaced_bytes
            )
        if st.documents == 0:
            log.warning("%s has no documents; skipped", path)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text: str, st: FileStats) -> str:
    """JSON escapes can spell lone surrogates, which are not text: replace them like bad bytes."""
    text, n = _SURROGATE.subn("\ufffd", text)
    st.replaced_bytes += n
    return text


def _label(value) -> str | None:
    return None if value is None else str(value)


def _read_txt(path: Path, index: int, text_field: str, st: FileStats) -> Iterator[Document]:
    raw = path.read_bytes()
    yield Document(_decode(raw, st), None, None, index, len(raw))


def _read_jsonl(path: Path, index: int, text_field: str, st: FileStats) -> Iterator[Document]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, st)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoelabError(
                    f"{path}:{lineno}: invalid JSON ({e.msg}); fix or delete the line"
                ) from None
            yield _record(obj, f"{path}:{lineno}", index, text_field, len(raw), st, b"\\u" in raw)


def _record(
    obj, where: str, index: int, text_field: str, nbytes: int, st: FileStats, escapes: bool
) -> Document:
    if not isinstance(obj, dict):
        raise MoelabError(
            f"{where}: expected a JSON object with a '{text_field}' field, got {type(obj).__name__}"
        )
    text = obj.get(text_field)
    if text is None:
        keys = ", ".join(sorted(obj)[:8]) or "none"
        raise MoelabError(f"{where}: no '{text_field}' field (fields: {keys}); pass --text-field NAME")
    if not isinstance(text, str):
        raise MoelabError(f"{where}: '{text_field}' is a {type(text).__name__}, not a string")
    text = _clean(text, st) if escapes else text  # only \u escapes can spell surrogates
    return Document(text, _label(obj.get("domain")), _label(obj.get("source")), index, nbytes)


def _read_json(path: Path, index: int, text_field: str, st: FileStats) -> Iterator[Document]:
    raw = path.read_bytes()
    try:
        items = json.loads(_decode(raw, st))
    except json.JSONDecodeError as e:
        raise MoelabError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    if not isinstance(items, list):
        raise MoelabError(f"{path}: expected a JSON list of strings, got {type(items).__name__}")
    share, escapes = len(raw) // max(len(items), 1), b"\\u" in raw
    for i, item in enumerate(items):
        if isinstance(item, str):
            yield Document(_clean(item, st) if escapes else item, None, None, index, share)
        elif isinstance(item, dict):
            yield _record(item, f"{path}: item {i}", index, text_field, share, st, escapes)
        else:
            raise MoelabError(f"{path}: item {i} is a {type(item).__name__}, not a string")


def _read_parquet(path: Path, index: int, text_field: str, st: FileStats) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MoelabError(f"{path}: reading .parquet needs pyarrow; pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise MoelabError(f"{path} is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise MoelabError(
            f"{path}: no '{text_field}' column (columns: {', '.join(names)}); pass --text-field NAME"
        )
    columns = [text_field] + [c for c in ("domain", "source") if c in names]
    share = path.stat().st_size // max(pf.metadata.num_rows, 1)
    row = 0
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        data = batch.to_pydict()
        domains, sources = data.get("domain"), data.get("source")
        for i, text in enumerate(data[text_field]):
            if isinstance(text, bytes):
                text = _decode(text, st)
            if not isinstance(text, str):
                raise MoelabError(f"{path}: row {row + i} has no text (null {text_field!r})")
            yield Document(
                text,
                _label(domains[i]) if domains else None,
                _label(sources[i]) if sources else None,
                index,
                share,
            )
        row += batch.num_rows


# ----------------------------------------------------------------------------- encoding (workers)


class _ChunkEncoder:
    """Tokenizes a chunk of documents: flat tokens with an eos after each, lengths, val flags."""

    def __init__(self, tokenizer, eos_id: int, dtype: str, val_fraction: float, seed: int):
        if isinstance(tokenizer, str):  # serialized JSON, as sent to worker processes
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(tokenizer)
            tokenizer.encode_special_tokens = True  # as MoeTokenizer does
        self.tokenizer, self.eos_id, self.dtype = tokenizer, eos_id, np.dtype(dtype)
        self.threshold = int(val_fraction * 2**64)  # hash < threshold -> val
        self.key = str(seed).encode()

    def __call__(self, texts: list[str], may_be_val: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, enc in enumerate(self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)):
            ids = enc.ids
            flat.extend(ids)
            flat.append(self.eos_id)
            lengths[i] = len(ids) + 1
        if may_be_val and self.threshold > 0:
            is_val = np.array([self._hash(t) < self.threshold for t in texts], dtype=bool)
        else:
            is_val = np.zeros(len(texts), dtype=bool)
        return np.array(flat, dtype=self.dtype), lengths, is_val

    def _hash(self, text: str) -> int:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=self.key).digest()
        return int.from_bytes(digest, "little")


_WORKER: _ChunkEncoder | None = None


def _init_worker(*args) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process = one core; no nested thread pool
    global _WORKER
    _WORKER = _ChunkEncoder(*args)


def _run_worker(texts: list[str], may_be_val: bool):
    return _WORKER(texts, may_be_val)


@contextlib.contextmanager
def _serial_tokenizers() -> Iterator[None]:
    """Keep `tokenizers` single-threaded here and in forked workers (which inherit the setting,
    so its fork hook stays quiet)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


class _Encoder:
    """Runs chunks in this process (workers=1) or in a pool, yielding results in submission order."""

    def __init__(self, tok: MoeTokenizer, dtype: np.dtype, workers: int, val_fraction: float, seed: int):
        self.workers, self.pool = workers, None
        if workers == 1:
            self.local = _ChunkEncoder(tok.tokenizer, tok.eos_id, dtype.name, val_fraction, seed)
        else:
            ctx = multiprocessing.get_context(START_METHOD)
            args = (tok.tokenizer.to_str(), tok.eos_id, dtype.name, val_fraction, seed)
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=args)

    def map(self, tasks: Iterator[tuple[object, list[str], bool]]) -> Iterator[tuple[object, tuple]]:
        if self.pool is None:
            for tag, texts, may_be_val in tasks:
                yield tag, self.local(texts, may_be_val)
            return
        pending: collections.deque = collections.deque()
        for tag, texts, may_be_val in tasks:
            pending.append((tag, self.pool.apply_async(_run_worker, (texts, may_be_val))))
            if len(pending) >= INFLIGHT_PER_WORKER * self.workers:
                tag0, result = pending.popleft()
                yield tag0, result.get()
        while pending:
            tag0, result = pending.popleft()
            yield tag0, result.get()

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


def _chunks(
    docs: Iterator[Document], val_files: set[int]
) -> Iterator[tuple[list[Document], list[str], bool]]:
    """Groups of documents of about CHUNK_CHARS characters, never mixing forced-val and other files."""
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        if chunk and (size >= CHUNK_CHARS or (doc.file in val_files) != (chunk[0].file in val_files)):
            yield chunk, [d.text for d in chunk], chunk[0].file not in val_files
            chunk, size = [], 0
        chunk.append(doc)
        size += len(doc.text)
    if chunk:
        yield chunk, [d.text for d in chunk], chunk[0].file not in val_files


# ----------------------------------------------------------------------------- writing


@dataclass
class _SplitWriter:
    path: Path
    n_tokens: int = 0
    lengths: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    def __post_init__(self):
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed by finish() or the caller's finally)

    @property
    def n_docs(self) -> int:
        return sum(len(x) for x in self.lengths)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, labels: np.ndarray) -> None:
        if len(lengths):
            tokens.tofile(self.fh)
            self.n_tokens += len(tokens)
            self.lengths.append(lengths)
            self.labels.append(labels)

    def finish(self, split: str, domain_map: np.ndarray, source_map: np.ndarray) -> None:
        """Close the token file and write the document index and labels (ids remapped to sorted names)."""
        self.fh.close()
        out = self.path.parent
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        labels = np.concatenate(self.labels) if self.labels else np.zeros((0, 2), np.int32)
        offsets = np.cumsum(lengths) - lengths
        np.save(out / f"{split}.idx.npy", np.stack([offsets, lengths], axis=1).astype(np.int64))
        domain = np.where(labels[:, 0] >= 0, domain_map[labels[:, 0]], -1)
        source = np.where(labels[:, 1] >= 0, source_map[labels[:, 1]], -1)
        np.save(out / f"{split}.labels.npy", np.stack([domain, source], axis=1).astype(np.int32))


class _Names:
    """Label strings -> ids in order of first appearance (remapped to sorted order at the end)."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, name: str | None) -> int:
        return -1 if name is None else self.ids.setdefault(name, len(self.ids))

    def sorted(self) -> tuple[list[str], np.ndarray]:
        names = sorted(self.ids)
        remap = np.zeros(max(len(names), 1), dtype=np.int32)
        for new, name in enumerate(names):
            remap[self.ids[name]] = new
        return names, remap


def tokenize_files(
    inputs: Sequence[str | Path],
    tokenizer: str | Path | MoeTokenizer,
    out: str | Path,
    workers: int = 1,
    val_fraction: float = 0.0,
    text_field: str = "text",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into the directory `out` (see the module docstring); returns metadata.json."""
    if workers < 1:
        raise MoelabError(f"--workers {workers} must be at least 1")
    if not 0.0 <= val_fraction < 1.0:
        raise MoelabError(f"--val-fraction {val_fraction} must be in [0, 1)")
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    tok = load_tokenizer(tokenizer)
    files = expand_inputs(inputs)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metadata.json").exists())):
        raise MoelabError(f"{out} exists and is not a tokenized data directory; choose another --out")
    dtype = token_dtype(tok.vocab_size)
    val_files = {i for i, f in enumerate(files) if is_val_file(f)}
    stats: dict[Path, FileStats] = {}
    per_file = np.zeros((len(files), 2), dtype=np.int64)  # documents, tokens
    domains, sources = _Names(), _Names()
    total_bytes = sum(f.stat().st_size for f in files)

    with atomic_dir(out) as tmp, _serial_tokenizers():
        writers = {s: _SplitWriter(tmp / f"{s}.bin") for s in ("train", "val")}
        encoder = _Encoder(tok, dtype, workers, val_fraction, seed)
        ok, done_bytes = False, 0  # input bytes tokenized
        try:
            docs = iter_documents(files, text_field=text_field, stats=stats)
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
            with bar:
                for chunk, (tokens, lengths, is_val) in encoder.map(_chunks(docs, val_files)):
                    file_idx = np.array([d.file for d in chunk], dtype=np.int64)
                    labels = np.array([(domains(d.domain), sources(d.source)) for d in chunk], dtype=np.int32)
                    labels = labels.reshape(len(chunk), 2)
                    if chunk[0].file in val_files:  # chunks never mix val files with others
                        is_val = np.ones(len(chunk), dtype=bool)
                    per_file[:, 0] += np.bincount(file_idx, minlength=len(files))
                    per_file[:, 1] += np.bincount(file_idx, weights=lengths, minlength=len(files)).astype(
                        np.int64
                    )
                    token_is_val = np.repeat(is_val, lengths)  # (n_tokens,) split of each token
                    chunk_bytes = sum(d.nbytes for d in chunk)
                    done_bytes += chunk_bytes
                    writers["train"].add(tokens[~token_is_val], lengths[~is_val], labels[~is_val])
                    writers["val"].add(tokens[token_is_val], lengths[is_val], labels[is_val])
                    bar.update(chunk_bytes)
                    bar.set_postfix(
                        tokens=f"{writers['train'].n_tokens + writers['val'].n_tokens:,}", refresh=False
                    )
            ok = True
        except Exception as e:
            if not is_disk_full(e, tmp):
                raise
            # the output grows with the input: what was written so far, scaled to all of it
            needed = tree_size(tmp) * total_bytes // done_bytes if done_bytes else None
            raise disk_full(out, needed=needed) from None
        finally:
            encoder.close(ok)
            for w in writers.values():
                w.fh.close()

        if sum(w.n_docs for w in writers.values()) == 0:
            raise MoelabError(f"no documents in {', '.join(map(str, inputs))}; every input is empty")
        domain_names, domain_map = domains.sorted()
        source_names, source_map = sources.sorted()
        splits = {}
        for split, w in writers.items():
            if w.n_docs == 0:
                (tmp / f"{split}.bin").unlink()
                if split == "val" and (val_fraction > 0 or val_files):
                    log.warning("no document went to the val split; raise --val-fraction")
                continue
            w.finish(split, domain_map, source_map)
            splits[split] = {"tokens": w.n_tokens, "documents": w.n_docs}
        tok.save(tmp)
        metadata = {
            "format": "moelab-tokens/1",
            "tokenizer_hash": tok.hash,
            "tokenizer_source": tok.source,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "dtype": dtype.name,
            "splits": splits,
            "index_columns": ["offset", "length"],
            "label_columns": ["domain", "source"],
            "domains": domain_names,
            "sources": source_names,
            "val_fraction": val_fraction,
            "seed": seed,
            "text_field": text_field,
            "replaced_bytes": sum(s.replaced_bytes for s in stats.values()),
            "empty_documents": sum(s.empty_documents for s in stats.values()),
            "inputs": [
                {
                    "path": str(f),
                    "split": "val" if i in val_files else ("train+val" if val_fraction > 0 else "train"),
                    "documents": int(per_file[i, 0]),
                    "tokens": int(per_file[i, 1]),
                    "replaced_bytes": stats[f].replaced_bytes if f in stats else 0,
                    "empty_documents": stats[f].empty_documents if f in stats else 0,
                }
                for i, f in enumerate(files)
            ],
        }
        (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata


def cmd_tokenize(args) -> None:
    from moelab.cli import show_progress

    meta = tokenize_files(
        args.inputs,
        args.tokenizer,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        text_field=args.text_field,
        seed=args.seed,
        progress=show_progress(args),
    )
    for split, s in meta["splits"].items():
        print(f"{split}: {s['tokens']:,} tokens in {s['documents']:,} documents")
    extra = f"; {meta['replaced_bytes']:,} invalid UTF-8 bytes replaced" if meta["replaced_bytes"] else ""
    print(f"dtype {meta['dtype']}, vocab {meta['vocab_size']:,}, {len(meta['domains'])} domains{extra}")
    print(f"wrote {args.out}")
