"""The contextual-token set: polysemous words for telling apart two kinds of expert specialization.

If experts specialise by *token identity*, every occurrence of " bank" goes to the same experts
whatever it means (high TIS, low ICS); if they specialise by *meaning in context*, "the river bank"
and "the bank approved the loan" go to different experts (high ICS). Measuring that needs words that
are one token in the model's tokenizer, each used in several clearly distinct senses, with enough
samples per sense. The set ships as YAML next to this module, one word per file:

    word: bank                      # lowercase; " " + word should be one token
    senses:                         # 2 or more (the packaged set has 2-3)
      - name: finance               # short id, unique within the word
        gloss: an institution that keeps and lends money
        samples:                    # sentences using the word in this sense, after a space
          - "She deposited her first paycheck at the bank on Monday morning."

A file may also hold a list of such entries. `load_contextual_set` checks each word against the
model's own tokenizer and keeps it only if it is a single token there and every sense has at least
`min_samples` samples in which that token really occurs; it records why it dropped the others.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from moelab.errors import MoelabError

log = logging.getLogger(__name__)

MIN_SENSES = 2
_WORD_KEYS = {"word", "senses"}
_SENSE_KEYS = {"name", "gloss", "samples"}


@dataclass(frozen=True)
class Sense:
    name: str
    gloss: str
    samples: tuple[str, ...]


@dataclass(frozen=True)
class ContextualWord:
    """One word as written in the YAML, before any tokenizer has looked at it."""

    word: str
    senses: tuple[Sense, ...]
    source: str  # the file it came from, for error messages


class ContextualSample(NamedTuple):
    """One encoded sample; unpacks as (word_index, sense_index, text, token_ids, target_positions)."""

    word_index: int  # index into ContextualSet.words
    sense_index: int  # index into ContextualSet.senses[word_index]
    text: str
    token_ids: list[int]  # (n,) the sample's ids in the tokenizer the set was loaded with
    target_positions: list[int]  # indices i with token_ids[i] == the word's token id (>= 1 of them)


@dataclass
class ContextualSet:
    """The words that survived a tokenizer's check, their token ids and their encoded samples.

    `words`, `token_ids`, `senses`, `glosses` and `n_samples` are aligned: entry i is about words[i].
    """

    words: list[str]
    token_ids: list[int]
    senses: list[list[str]]  # sense names per word
    glosses: list[list[str]]
    n_samples: list[list[int]]  # usable samples per word and sense
    dropped: dict[str, str]  # word -> why it was left out
    _all_words: list[str] = field(repr=False)
    _encoded: list[list[list[tuple[str, list[int], list[int]]]]] = field(repr=False)

    def raw_words(self) -> list[str]:
        """Every word in the YAML, kept or dropped, in file order."""
        return list(self._all_words)

    def samples(self) -> Iterator[ContextualSample]:
        """The usable samples of the kept words, word by word, sense by sense, in file order."""
        for w, per_sense in enumerate(self._encoded):
            for s, encoded in enumerate(per_sense):
                for text, ids, positions in encoded:
                    yield ContextualSample(w, s, text, list(ids), list(positions))

    def meta(self) -> dict[str, Any]:
        """The `contextual` entry of a trace's meta.json."""
        return {
            "words": list(self.words),
            "token_ids": list(self.token_ids),
            "senses": [list(s) for s in self.senses],
        }

    def __len__(self) -> int:
        return sum(sum(counts) for counts in self.n_samples)


# ----------------------------------------------------------------------------- reading the YAML


def read_contextual_words(source: str | Path | None = None) -> list[ContextualWord]:
    """The words of the packaged set (source=None), of one YAML file, or of a directory of YAML files.

    Files are read in name order. Raises MoelabError naming the file if an entry breaks the schema.
    """
    if source is None:
        root = resources.files(__name__)
        files = sorted(
            (f for f in root.iterdir() if f.name.endswith((".yaml", ".yml"))), key=lambda f: f.name
        )
        label = "the packaged contextual set"
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        elif path.is_file():
            files = [path]
        else:
            raise MoelabError(
                f"contextual set {source} does not exist; pass a YAML file or a directory of them"
            )
        label = str(source)
    words: list[ContextualWord] = []
    seen: dict[str, str] = {}
    for f in files:
        name = str(f) if source is not None else f"moelab/interp/contextual/{f.name}"
        for entry in _parse_file(f.read_text(encoding="utf-8"), name):
            if entry.word in seen:
                raise MoelabError(f"{name}: word '{entry.word}' is already defined in {seen[entry.word]}")
            seen[entry.word] = name
            words.append(entry)
    if not words:
        raise MoelabError(f"{label} holds no words; add YAML files with 'word' and 'senses'")
    return words


def _parse_file(text: str, name: str) -> list[ContextualWord]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise MoelabError(f"{name}:{line} is not valid YAML; fix the syntax") from None
    entries = data if isinstance(data, list) else [data]
    return [_parse_word(entry, name) for entry in entries]


def _parse_word(entry: Any, name: str) -> ContextualWord:
    if not isinstance(entry, dict) or set(entry) != _WORD_KEYS:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise MoelabError(f"{name}: each entry needs exactly the keys 'word' and 'senses' (got {keys})")
    word = entry["word"]
    if not isinstance(word, str) or not word or word != word.strip() or " " in word or word != word.lower():
        raise MoelabError(f"{name}: word {word!r} must be one lowercase word without spaces")
    senses = entry["senses"]
    if not isinstance(senses, list) or len(senses) < MIN_SENSES:
        n = len(senses) if isinstance(senses, list) else 0
        raise MoelabError(f"{name}: '{word}' has {n} senses; list at least {MIN_SENSES} under 'senses'")
    parsed = tuple(_parse_sense(sense, word, name) for sense in senses)
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise MoelabError(f"{name}: '{word}' repeats a sense name ({names}); give each sense its own name")
    return ContextualWord(word, parsed, name)


def _parse_sense(sense: Any, word: str, name: str) -> Sense:
    if not isinstance(sense, dict) or set(sense) != _SENSE_KEYS:
        keys = sorted(sense) if isinstance(sense, dict) else type(sense).__name__
        raise MoelabError(
            f"{name}: each sense of '{word}' needs exactly 'name', 'gloss', 'samples' (got {keys})"
        )
    label, gloss, samples = sense["name"], sense["gloss"], sense["samples"]
    if not isinstance(label, str) or not label or not isinstance(gloss, str) or not gloss:
        raise MoelabError(f"{name}: a sense of '{word}' has an empty or non-text 'name' or 'gloss'")
    if not isinstance(samples, list) or not samples or not all(isinstance(s, str) and s for s in samples):
        raise MoelabError(
            f"{name}: sense '{label}' of '{word}' needs 'samples' as a non-empty list of sentences"
        )
    return Sense(label, gloss, tuple(samples))


# ----------------------------------------------------------------------------- checking against a tokenizer


def load_contextual_set(
    tokenizer: Any, min_samples: int = 15, source: str | Path | None = None
) -> ContextualSet:
    """The contextual set as seen by `tokenizer`: the words it can study and why the others were dropped.

    `tokenizer` is a callable text -> ids, or an object whose `encode(text)` returns ids or an
    encoding with `.ids` (tokenizers.Tokenizer, moelab's MoeTokenizer, transformers tokenizers);
    special tokens are not added where `encode` accepts `add_special_tokens`. A word is kept if
    " " + word encodes to one token and every sense has >= min_samples samples containing that token.
    """
    if not isinstance(min_samples, int) or min_samples < 1:
        raise MoelabError(f"min_samples={min_samples!r} must be a positive integer")
    encode = _encoder(tokenizer)
    entries = read_contextual_words(source)
    kept: list[tuple[ContextualWord, int, list[list[tuple[str, list[int], list[int]]]]]] = []
    dropped: dict[str, str] = {}
    for entry in entries:
        ids = encode(" " + entry.word)
        if len(ids) != 1:
            dropped[entry.word] = f"' {entry.word}' is {len(ids)} tokens in this tokenizer"
            continue
        tid = ids[0]
        per_sense = [_encode_sense(sense, tid, encode) for sense in entry.senses]
        short = [
            f"sense '{sense.name}' has {len(enc)} usable samples < {min_samples}"
            for sense, enc in zip(entry.senses, per_sense, strict=True)
            if len(enc) < min_samples
        ]
        if short:
            dropped[entry.word] = "; ".join(short)
        else:
            kept.append((entry, tid, per_sense))
    for word, reason in dropped.items():
        log.warning("contextual set: dropped '%s': %s", word, reason)
    log.info("contextual set: kept %d of %d words", len(kept), len(entries))
    return ContextualSet(
        words=[e.word for e, _, _ in kept],
        token_ids=[tid for _, tid, _ in kept],
        senses=[[s.name for s in e.senses] for e, _, _ in kept],
        glosses=[[s.gloss for s in e.senses] for e, _, _ in kept],
        n_samples=[[len(enc) for enc in per_sense] for _, _, per_sense in kept],
        dropped=dropped,
        _all_words=[e.word for e in entries],
        _encoded=[per_sense for _, _, per_sense in kept],
    )


def _encode_sense(
    sense: Sense, tid: int, encode: Callable[[str], list[int]]
) -> list[tuple[str, list[int], list[int]]]:
    """(text, ids, positions of tid) for each sample whose encoding holds the word's token."""
    out = []
    for text in sense.samples:
        ids = encode(text)
        positions = [i for i, t in enumerate(ids) if t == tid]
        if positions:
            out.append((text, ids, positions))
    return out


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """A text -> list[int] function from any of the tokenizer shapes load_contextual_set accepts."""
    method = getattr(tokenizer, "encode", None)
    if callable(method):
        fn = method
        if _accepts(method, "add_special_tokens"):

            def fn(text: str) -> Sequence[int]:
                return method(text, add_special_tokens=False)

    elif callable(tokenizer):
        fn = tokenizer
    else:
        raise TypeError(
            f"tokenizer must be callable or have an encode method, not {type(tokenizer).__name__}"
        )

    def encode(text: str) -> list[int]:
        out = fn(text)
        return [int(i) for i in getattr(out, "ids", out)]

    return encode


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
