"""Training batches from tokenized data: a memory-mapped token file cut into packed windows.

A window is seq_len + 1 consecutive tokens starting at a multiple of seq_len (so neighbouring
windows share their boundary token and every token is predicted exactly once per epoch). Documents
are packed across windows, separated by their eos. Each epoch visits the windows in a shuffled
order fixed by (seed, epoch); data-parallel rank r takes every world_size-th window of that order,
so ranks never overlap and the windows consumed by all ranks together are always a prefix of the
epoch's order. The loader's position is that prefix length, which makes resume exact, even on
another number of ranks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from moelab.data.tokenize import token_dtype
from moelab.errors import MoelabError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TokenDataset:
    """One split of a `moelab data tokenize` output directory, validated against its metadata.json.

    `tokens` is a copy-on-write memory map of {split}.bin (pages are read on demand, the file is
    never modified), so `view()` hands out zero-copy tensors of any slice.
    """

    def __init__(self, dir: str | Path, split: str = "train"):
        self.dir, self.split = Path(dir), split
        meta_path = self.dir / "metadata.json"
        if not meta_path.is_file():
            raise MoelabError(
                f"{self.dir} has no metadata.json; create it with `moelab data tokenize ... --out {dir}`"
            )
        try:
            self.metadata = meta = json.loads(meta_path.read_text(encoding="utf-8"))
            counts = meta["splits"]
            self.vocab_size, self.eos_id, self.pad_id = meta["vocab_size"], meta["eos_id"], meta["pad_id"]
            self.tokenizer_hash, dtype_name = meta["tokenizer_hash"], meta["dtype"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoelabError(
                f"{meta_path} is damaged ({type(e).__name__}: {e}); re-run moelab data tokenize"
            ) from None
        if split not in counts:
            raise MoelabError(f"{self.dir} has no '{split}' split (it has: {', '.join(counts) or 'none'})")
        if (
            dtype_name not in ("uint16", "uint32")
            or np.dtype(dtype_name).itemsize < token_dtype(self.vocab_size).itemsize
        ):
            raise MoelabError(
                f"{meta_path}: dtype {dtype_name!r} cannot hold a vocabulary of {self.vocab_size}"
            )
        self.dtype = np.dtype(dtype_name)
        self.n_tokens, self.n_documents = int(counts[split]["tokens"]), int(counts[split]["documents"])
        self.bin_path = self.dir / f"{split}.bin"
        self.tokens = self._map_tokens()
        self.offsets, self.lengths = self._load_index()
        labels = self._load_npy(self.dir / f"{split}.labels.npy", (self.n_documents, 2))
        self.domains, self.sources = labels[:, 0].astype(np.int64), labels[:, 1].astype(np.int64)
        self.domain_names, self.source_names = list(meta.get("domains", [])), list(meta.get("sources", []))
        self._check_eos()

    def _map_tokens(self) -> np.memmap:
        if not self.bin_path.is_file():
            raise MoelabError(f"{self.bin_path} is missing; re-run moelab data tokenize")
        size, want = self.bin_path.stat().st_size, self.n_tokens * self.dtype.itemsize
        if size != want or self.n_tokens == 0:
            other = np.dtype("uint32" if self.dtype == np.uint16 else "uint16")
            hint = f" (it looks like {other.name} data)" if size == self.n_tokens * other.itemsize else ""
            raise MoelabError(
                f"{self.bin_path} has {size:,} bytes but metadata.json says {self.n_tokens:,} "
                f"{self.dtype.name} tokens ({want:,} bytes){hint}; the file is truncated or not from this "
                "tokenization: re-run moelab data tokenize"
            )
        return np.memmap(self.bin_path, dtype=self.dtype, mode="c", shape=(self.n_tokens,))

    def _load_npy(self, path: Path, shape: tuple[int, ...]) -> np.ndarray:
        try:
            array = np.load(path)
        except (OSError, ValueError) as e:
            raise MoelabError(f"{path} could not be read ({e}); re-run moelab data tokenize") from None
        if array.shape != shape:
            raise MoelabError(
                f"{path} has shape {array.shape}, expected {shape}; re-run moelab data tokenize"
            )
        return array

    def _load_index(self) -> tuple[np.ndarray, np.ndarray]:
        path = self.dir / f"{self.split}.idx.npy"
        index = self._load_npy(path, (self.n_documents, 2)).astype(np.int64)
        offsets, lengths = index[:, 0], index[:, 1]
        if (
            (lengths < 1).any()
            or lengths.sum() != self.n_tokens
            or (offsets != np.cumsum(lengths) - lengths).any()
        ):
            raise MoelabError(
                f"{path} does not tile {self.bin_path.name} ({self.n_tokens:,} tokens); re-run tokenize"
            )
        return offsets, lengths

    def _check_eos(self) -> None:
        """Every document ends with eos; checking up to 1,000 of them catches a shifted or foreign file."""
        docs = np.unique(np.linspace(0, self.n_documents - 1, min(self.n_documents, 1000)).astype(np.int64))
        ends = self.offsets[docs] + self.lengths[docs] - 1
        if (self.tokens[ends] != self.eos_id).any():
            raise MoelabError(
                f"{self.bin_path}: documents do not end with eos {self.eos_id}; re-run moelab data tokenize"
            )

    def __len__(self) -> int:
        return self.n_tokens

    def view(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as a zero-copy tensor (uint16 or uint32)."""
        return torch.from_numpy(self.tokens[start:stop])

    def document(self, i: int) -> torch.Tensor:
        """Document i including its trailing eos (zero-copy)."""
        return self.view(int(self.offsets[i]), int(self.offsets[i] + self.lengths[i]))

    def doc_ids(self, positions: np.ndarray) -> np.ndarray:
        """Document index of each token position (any shape), vectorised."""
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse data tokenized with another tokenizer. `tokenizer`: MoeTokenizer, content hash, or spec."""
        from moelab.data.tokenizer import MoeTokenizer, load_tokenizer

        if isinstance(tokenizer, str) and _HEX64.match(tokenizer):
            theirs, where = tokenizer, "given hash"
        else:
            tok = tokenizer if isinstance(tokenizer, MoeTokenizer) else load_tokenizer(tokenizer)
            theirs, where = tok.hash, tok.source or "in memory"
        if theirs != self.tokenizer_hash:
            ours = self.metadata.get("tokenizer_source") or "unknown"
            raise MoelabError(
                f"{self.dir} was tokenized with tokenizer {self.tokenizer_hash[:12]} ({ours}) but the model "
                f"uses {theirs[:12]} ({where}); re-tokenize the data with the model's tokenizer"
            )


class PackedLoader:
    """Infinite iterator of {"input_ids", "labels"} (B, seq_len) long batches over shuffled windows.

    `epoch` counts passes; `position` is how many windows of this epoch's order all ranks together
    have consumed. `state_dict()` after a batch + `load_state_dict()` into a fresh loader yields
    exactly the batches that would have come next (also with another world_size or batch_size).
    With return_doc_ids, batches also carry "doc_ids" and "domains" (B, seq_len) of each input token.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        return_doc_ids: bool = False,
    ):
        if seq_len < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise MoelabError(
                f"bad loader settings: seq_len={seq_len} batch_size={batch_size} rank={rank} "
                f"world_size={world_size} (need positive sizes and 0 <= rank < world_size)"
            )
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last, self.return_doc_ids = drop_last, return_doc_ids
        self.n_windows = (dataset.n_tokens - 1) // seq_len
        if self.n_windows == 0:
            raise MoelabError(
                f"seq_len {seq_len} needs at least {seq_len + 1} tokens but {dataset.bin_path} has "
                f"{dataset.n_tokens:,}; use a shorter seq_len or more data"
            )
        if len(self) == 0:
            raise MoelabError(
                f"{dataset.bin_path} gives {self.n_windows:,} windows of {seq_len + 1} tokens, fewer than "
                f"batch_size x world_size = {batch_size * world_size}; lower batch_size or seq_len"
            )
        self._offsets = np.arange(seq_len + 1)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per full epoch on this rank."""
        return self._n_batches(self.n_windows // self.world_size)

    def _n_batches(self, per_rank: int) -> int:
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        return self._order[1]

    def epoch_windows(self, epoch: int, start: int = 0) -> np.ndarray:
        """Window indices this rank visits in `epoch` after `start` windows were consumed, in order."""
        per_rank = (self.n_windows - start) // self.world_size
        stop = start + per_rank * self.world_size
        return self._permutation(epoch)[start + self.rank : stop : self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        remaining = self.epoch_windows(self.epoch, self.position)
        if self._n_batches(len(remaining)) == 0:  # epoch done: reshuffle
            self.epoch, self.position = self.epoch + 1, 0
            remaining = self.epoch_windows(self.epoch)
        windows = remaining[: self.batch_size]
        self.position += len(windows) * self.world_size
        return self._batch(windows)

    def _batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        positions = windows[:, None] * self.seq_len + self._offsets  # (B, L+1)
        tokens = torch.from_numpy(np.asarray(self.dataset.tokens[positions], dtype=np.int64))
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.return_doc_ids:
            doc_ids = self.dataset.doc_ids(positions[:, :-1])  # (B, L)
            batch["doc_ids"] = torch.from_numpy(doc_ids)
            batch["domains"] = torch.from_numpy(self.dataset.domains[doc_ids])
        return batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "n_tokens": self.dataset.n_tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "n_tokens": self.dataset.n_tokens,
        }
        for key, value in mine.items():
            if state.get(key) != value:
                raise MoelabError(
                    f"loader state was saved with {key}={state.get(key)} but this loader has {key}={value} "
                    f"({self.dataset.bin_path}); resume with the same data and settings"
                )
        if not 0 <= state["position"] <= self.n_windows:
            raise MoelabError(f"loader state position {state['position']} is outside [0, {self.n_windows}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
