"""The `moelab-trace/1` format as read: a `Trace` holds one trace directory's arrays and its meta.json.

`Trace.open` memory-maps a directory written by `moelab trace` (the writer is `moelab.interp.trace`)
after checking meta.json (`_check_meta`) and every array's dtype and shape against what meta.json
promises (`_expected_arrays`), so a damaged or stale trace fails here, with a message naming the file
and the command that rewrites it, rather than inside a metric. `Trace.from_arrays` builds the same
object from numpy or torch arrays, for tests and notebooks. The metrics are in `moelab.interp.metrics`
(which re-exports `Trace`); docs/METRICS.md describes the format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError

FORMAT = "moelab-trace/1"

_CONTEXT_ARRAYS = ("context_word", "context_sense", "context_target")
_PREDICTION_ARRAYS = ("predicted_ids", "next_ids")


def _expected_arrays(meta: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """File stem -> (dtype, shape) that meta.json promises."""
    T, L, E, k = meta["n_tokens"], meta["n_layers"], meta["n_experts"], meta["top_k"]
    spec = {
        "token_ids": (np.int32, (T,)),
        "doc_ids": (np.int64, (T,)),
        "positions": (np.int32, (T,)),
        "domains": (np.int16, (T,)),
        "topk_ids": (np.int16, (L, T, k)),
        "topk_weights": (np.float32, (L, T, k)),
    }
    if meta["has_router_probs"]:
        spec["router_probs"] = (np.float16, (L, T, E))
    if meta["has_predictions"]:
        spec.update(predicted_ids=(np.int32, (T,)), next_ids=(np.int32, (T,)))
    if meta["contextual"] is not None:
        spec.update(
            context_word=(np.int16, (T,)), context_sense=(np.int16, (T,)), context_target=(np.bool_, (T,))
        )
    return {name: (np.dtype(dtype), shape) for name, (dtype, shape) in spec.items()}


def _check_meta(meta: object, where: str) -> dict:
    """Refuse a meta.json that does not describe a moelab-trace/1 directory."""

    def bad(what: str) -> MoelabError:
        return MoelabError(f"{where}: {what}; re-run `moelab trace` to rewrite the trace")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    if meta.get("format") != FORMAT:
        raise bad(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("n_tokens", "n_layers", "n_experts", "top_k"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise bad(f"{key} must be a positive integer, got {value!r}")
    # a tree's slots (top_k paths x depth, unused ones -1) may outnumber its edges; a flat router's not
    if meta["top_k"] > meta["n_experts"] and "tree" not in meta:
        raise bad(f"top_k {meta['top_k']} exceeds n_experts {meta['n_experts']}")
    domains = meta.get("domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise bad("domains must be a list of names")
    if not isinstance(meta.get("has_router_probs", False), bool):
        raise bad("has_router_probs must be true or false")
    if not isinstance(meta.get("has_predictions", False), bool):
        raise bad("has_predictions must be true or false")
    ctx = meta.get("contextual")
    if ctx is not None:
        try:
            words, senses = ctx["words"], ctx["senses"]
            ok = (
                isinstance(words, list)
                and isinstance(senses, list)
                and len(words) == len(senses)
                and all(isinstance(s, list) for s in senses)
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise bad(
                "contextual must be null or {'words': [...], 'token_ids': [...], 'senses': [[...], ...]}"
            )
    _check_structure(meta, bad)
    return {
        **meta,
        "domains": domains,
        "has_router_probs": bool(meta.get("has_router_probs")),
        "has_predictions": bool(meta.get("has_predictions")),
        "contextual": ctx,
    }


def _is_int(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_structure(meta: dict, bad) -> None:
    """The optional structure entries: `expert_widths` (one list of E positive widths per MoE layer) and
    `tree` ({"branches": b >= 2, "depth": D >= 1, optional "paths": k paths per token} with
    E = b + b² + … + b^D experts, one per edge)."""
    L, E = meta["n_layers"], meta["n_experts"]
    widths = meta.get("expert_widths")
    if widths is not None and not (
        isinstance(widths, list)
        and len(widths) == L
        and all(isinstance(row, list) and len(row) == E and all(_is_int(w, 1) for w in row) for row in widths)
    ):
        raise bad(f"expert_widths must be {L} lists (one per MoE layer) of {E} positive integers")
    tree = meta.get("tree")
    if tree is not None:
        ok = isinstance(tree, dict) and _is_int(tree.get("branches"), 2) and _is_int(tree.get("depth"), 1)
        if not ok or not (
            _is_int(tree.get("paths", 1), 1) and tree.get("paths", 1) <= tree["branches"] ** tree["depth"]
        ):
            raise bad('tree must be {"branches": integer >= 2, "depth": integer >= 1, "paths": 1 .. b^depth}')
        b, depth = tree["branches"], tree["depth"]
        edges = sum(b**d for d in range(1, depth + 1))
        if edges != E:
            raise bad(
                f"a tree of {b} branches and depth {depth} has {edges} experts (edges), not n_experts {E}"
            )


def _not_a_trace(path: Path) -> str:
    """Why `path` is no trace, and the command that makes one (never one that would write into a run)."""
    make = "create one with `moelab trace MODEL --data DATA --out TRACE_DIR`"
    if path.is_file():
        return f"{path} is a file, not a trace directory; pass a directory `moelab trace` wrote, or {make}"
    if not path.exists():
        return f"trace {path} does not exist; {make.replace('TRACE_DIR', str(path))}"
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        if (path / "trace" / "meta.json").is_file():
            return f"{path} is a run directory, not a trace; its trace is {path / 'trace'}: analyze that"
        return (
            f"{path} is a run directory, not a trace; trace it with `moelab trace {path} --data DATA "
            f"--out {path / 'trace'}` and analyze that, or run `moelab analyze {path} --saturation`"
        )
    if (path / "model.safetensors").is_file() or (path / "config.json").is_file():
        return f"{path} is a model, not a trace; trace it: `moelab trace {path} --data DATA --out TRACE_DIR`"
    return f"{path} has no meta.json, so it is not a trace; {make}"


def _numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class Trace:
    """The arrays of one trace and its metadata; memory-mapped when opened from a directory.

    Attributes (None where absent): `topk_ids` (L, T, k), `topk_weights` (L, T, k), `router_probs`
    (L, T, E), `token_ids`, `doc_ids`, `positions`, `domains`, `context_word`, `context_sense`,
    `context_target`, `predicted_ids`, `next_ids` (T,); `meta` (meta.json), `name` (the directory,
    for messages).
    """

    def __init__(self, arrays: dict[str, np.ndarray | None], meta: dict, name: str = "<in-memory trace>"):
        self.meta, self.name = meta, name
        self._repeats: dict[int, bool] = {}  # layer -> some token repeats an id (see metrics._check_layer)
        self.topk_ids = arrays["topk_ids"]
        for key in (
            "token_ids",
            "doc_ids",
            "positions",
            "domains",
            "topk_weights",
            "router_probs",
            *_CONTEXT_ARRAYS,
            *_PREDICTION_ARRAYS,
        ):
            setattr(self, key, arrays.get(key))

    n_tokens = property(lambda self: self.meta["n_tokens"])
    n_layers = property(lambda self: self.meta["n_layers"])
    n_experts = property(lambda self: self.meta["n_experts"])
    top_k = property(lambda self: self.meta["top_k"])
    domain_names = property(lambda self: tuple(self.meta["domains"]))
    contextual = property(lambda self: self.meta["contextual"])

    def __repr__(self) -> str:
        return (
            f"Trace({self.name!r}, n_tokens={self.n_tokens}, n_layers={self.n_layers}, "
            f"n_experts={self.n_experts}, top_k={self.top_k})"
        )

    @classmethod
    def open(cls, dir: str | Path) -> Trace:
        """Memory-map a trace directory, checking every array's shape and dtype against meta.json."""
        dir = Path(dir)
        meta_path = dir / "meta.json"
        if not meta_path.is_file():
            raise MoelabError(_not_a_trace(dir))
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoelabError(f"{meta_path} is damaged ({e}); re-run `moelab trace`") from None
        meta = _check_meta(raw, str(meta_path))
        arrays = {}
        for stem, (dtype, shape) in _expected_arrays(meta).items():
            path = dir / f"{stem}.npy"
            if not path.is_file():
                raise MoelabError(f"{path} is missing (meta.json expects it); re-run `moelab trace`")
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise MoelabError(
                    f"{path} is not a readable .npy file ({e}); re-run `moelab trace`"
                ) from None
            if arr.shape != shape or arr.dtype != dtype:
                raise MoelabError(
                    f"{path} holds {arr.dtype} {tuple(arr.shape)} but meta.json implies {dtype} {shape}; "
                    "re-run `moelab trace`"
                )
            arrays[stem] = arr
        return cls(arrays, meta, name=str(dir))

    @classmethod
    def from_arrays(
        cls,
        topk_ids,
        token_ids=None,
        doc_ids=None,
        domains=None,
        domain_names: Sequence[str] = (),
        topk_weights=None,
        router_probs=None,
        n_experts: int | None = None,
        contextual: dict | None = None,
        context_word=None,
        context_sense=None,
        context_target=None,
        positions=None,
        predicted_ids=None,
        next_ids=None,
        name: str = "<in-memory trace>",
        meta: dict | None = None,
    ) -> Trace:
        """A trace built from arrays (numpy or torch), for tests and notebooks.

        topk_ids (L, T, k) integers (-1 = no expert); the (T,) arrays are optional. n_experts defaults
        to the largest id + 1; domain names default to "0", "1", ...; `contextual` is the meta.json
        entry {"words", "token_ids", "senses"} and goes with the three context_* arrays;
        `predicted_ids` and `next_ids` (T,) go together (-1 = no next token); `meta`: more
        meta.json entries (e.g. "expert_widths", "tree").
        """
        ids = _numpy(topk_ids)
        if ids.ndim != 3 or ids.dtype.kind not in "iu" or 0 in ids.shape:
            raise MoelabError(
                f"topk_ids must be a non-empty (L, T, k) integer array, got {ids.dtype} {ids.shape}"
            )
        L, T, k = ids.shape
        if n_experts is None:
            if ids.max() < 0:
                raise MoelabError("topk_ids holds no expert id; pass n_experts")
            n_experts = int(ids.max()) + 1
        arrays = {
            "topk_ids": ids,
            "token_ids": _numpy(token_ids),
            "doc_ids": _numpy(doc_ids),
            "positions": _numpy(positions),
            "domains": _numpy(domains),
            "topk_weights": _numpy(topk_weights),
            "router_probs": _numpy(router_probs),
            "context_word": _numpy(context_word),
            "context_sense": _numpy(context_sense),
            "context_target": _numpy(context_target),
            "predicted_ids": _numpy(predicted_ids),
            "next_ids": _numpy(next_ids),
        }
        shapes = {"topk_weights": (L, T, k), "router_probs": (L, T, n_experts)}
        for key, arr in arrays.items():
            want = shapes.get(key, (T,) if key != "topk_ids" else ids.shape)
            if arr is not None and arr.shape != want:
                raise MoelabError(f"{key} has shape {arr.shape}, expected {want} (topk_ids is {ids.shape})")
        has_ctx = [arrays[key] is not None for key in _CONTEXT_ARRAYS]
        if (contextual is not None) != all(has_ctx) or (contextual is None and any(has_ctx)):
            raise MoelabError("a contextual trace needs `contextual` and all of context_word/_sense/_target")
        if (arrays["predicted_ids"] is None) != (arrays["next_ids"] is None):
            raise MoelabError("predicted_ids and next_ids go together: pass both or neither")
        names = list(domain_names)
        if not names and arrays["domains"] is not None and arrays["domains"].size:
            names = [str(d) for d in range(int(arrays["domains"].max()) + 1)]
        meta = {
            **(meta or {}),
            "format": FORMAT,
            "model": None,
            "source": "moelab",
            "checkpoint_step": None,
            "tokenizer_hash": None,
            "n_tokens": T,
            "n_layers": L,
            "n_experts": int(n_experts),
            "top_k": k,
            "domains": names,
            "has_router_probs": arrays["router_probs"] is not None,
            "has_predictions": arrays["predicted_ids"] is not None,
            "contextual": contextual,
            "data": None,
        }
        return cls(arrays, _check_meta(meta, name), name=name)
