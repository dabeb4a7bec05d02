"""`moelab trace`: record what the router did, token by token, as memory-mappable arrays.

The model runs exactly as trained: a moelab checkpoint with its balancing biases (they live in the
router), or a transformers MoE folder through `hf_models`. Tokens stream through in batches and are
written straight into pre-sized .npy files, so memory stays bounded whatever the trace's length.
Padding is never traced. The format is described in docs/METRICS.md ("Trace format").
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moelab.errors import MoelabError, require_at_least
from moelab.io import atomic_dir, disk_full, free_bytes, reserve
from moelab.models.base import model_routers
from moelab.moe.routing import RoutingInfo
from moelab.train.device import autocast_for
from moelab.train.telemetry import expert_widths

log = logging.getLogger(__name__)
FORMAT = "moelab-trace/1"


# ----------------------------------------------------------------------------- models


@dataclass
class Router:
    """Anything that routes: `route(input_ids, attention_mask)` -> one RoutingInfo per MoE layer."""

    route: object
    n_layers: int
    n_experts: int
    top_k: int
    vocab_size: int
    device: torch.device
    name: str
    source: str
    checkpoint_step: int | None
    tokenizer_path: Path | None
    seq_len: int  # default window
    seq_len_limit: int  # positions the model supports
    router_similarity: list | None = None  # (L, L) effective-router similarity, models that expose it
    expert_widths: list | None = None  # (L, E) hidden width of each routed expert, when they differ
    tree: dict | None = None  # {"branches", "depth"} of tree-routed models
    # predict(input_ids, attention_mask) -> (routing, (B, N) argmax of the logits at every position)
    predict: object | None = None


def open_router(path: str | Path, device: str | torch.device | None = None) -> Router:
    """A moelab run/checkpoint dir or a transformers MoE folder, ready to route."""
    from moelab.interp.hf_models import is_hf_moe_dir, load_hf_moe

    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if is_hf_moe_dir(path):
        hf = load_hf_moe(path, device=device)
        return Router(
            route=lambda ids, mask: hf.route(ids, mask, with_logits=False)[1],
            predict=lambda ids, mask: _argmax_last(*reversed(hf.route(ids, mask, with_logits=True))),
            n_layers=hf.n_layers,
            n_experts=hf.n_experts,
            top_k=hf.top_k,
            vocab_size=hf.vocab_size,
            device=device,
            name=str(path),
            source=f"transformers:{hf.model_type}",
            checkpoint_step=None,
            tokenizer_path=hf.tokenizer_path,
            seq_len=min(2048, hf.max_positions),
            seq_len_limit=hf.max_positions,
        )
    from moelab.checkpoint import TOKENIZER, checkpoint_step, load, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    model = load(ckpt, device=device)
    precision = autocast_for(model.config.train, device)  # as trained: bf16 autocast on GPU
    full_head = [False]  # set while `predict` runs: the LM head then sees every position
    if isinstance(getattr(model, "lm_head", None), torch.nn.Module):
        # routing needs no logits: let the LM head see only the last position ((B, N, V) is large)
        model.lm_head.register_forward_pre_hook(
            lambda _module, args: None if full_head[0] else (args[0][:, -1:],)
        )

    @torch.no_grad()
    def route(ids, mask):
        with precision:
            return model(ids, attention_mask=mask).routing

    @torch.no_grad()
    def predict(ids, mask):
        full_head[0] = True
        try:
            with precision:
                out = model(ids, attention_mask=mask)
        finally:
            full_head[0] = False
        return _argmax_last(out.routing, out.logits)

    cfg = model.config
    tok = ckpt / TOKENIZER
    return Router(
        route=route,
        n_layers=len(model_routers(model)),
        n_experts=cfg.model.n_experts,
        top_k=cfg.model.top_k,
        vocab_size=cfg.model.vocab_size,
        device=device,
        name=str(ckpt),
        source="moelab",
        checkpoint_step=checkpoint_step(ckpt),
        tokenizer_path=tok if tok.is_file() else None,
        seq_len=min(cfg.data.seq_len, cfg.model.max_seq_len),
        seq_len_limit=cfg.model.max_seq_len,
        router_similarity=_router_similarity(model),
        expert_widths=expert_widths(model),
        tree=_tree(cfg.model),
        predict=predict,
    )


def _argmax_last(routing, logits: torch.Tensor):
    """(routing, (B, N) argmax of (B, N, V) logits over the vocabulary)."""
    if logits is None or logits.dim() != 3:
        raise MoelabError("--predictions needs the model's logits at every position; this model gave none")
    return routing, logits.argmax(dim=-1)


def _tree(model_cfg) -> dict | None:
    """{"branches": b, "depth": D, "paths": top_k} for a model config with `tree_branches` and
    `tree_depth` (tree routing: the experts are the edges of a perfect b-ary tree, and each token takes
    its top_k root-to-leaf paths), else None."""
    branches, depth = getattr(model_cfg, "tree_branches", None), getattr(model_cfg, "tree_depth", None)
    if branches is None or depth is None:
        return None
    return {"branches": int(branches), "depth": int(depth), "paths": int(model_cfg.top_k)}


def _router_similarity(model) -> list | None:
    """metrics.router_similarity of the model's effective routers, for models with
    `effective_router_weights()` (cross-layer routing); None otherwise."""
    if not callable(getattr(model, "effective_router_weights", None)):
        return None
    from moelab.interp.metrics import router_similarity

    with torch.no_grad():
        weights = [w.float().cpu().numpy() for w in model.effective_router_weights()]
    return router_similarity(weights).tolist()


# ----------------------------------------------------------------------------- token sources


@dataclass
class Chunk:
    """One forward pass worth of tokens: (B, N) ids with a mask, and per-token labels of real tokens."""

    input_ids: torch.Tensor  # (B, N) long
    attention_mask: torch.Tensor | None  # (B, N) 1 = real, None = no padding
    doc_ids: np.ndarray  # (n_real,) in row-major order of the real tokens
    positions: np.ndarray
    domains: np.ndarray
    context: dict[str, np.ndarray] | None = None  # context_word / context_sense / context_target


def data_chunks(dataset, seq_len: int, batch_size: int, n_tokens: int):
    """Consecutive non-overlapping windows of the first n_tokens of a split, in order (no padding)."""
    starts = np.arange(0, n_tokens, seq_len)
    full = starts[starts + seq_len <= n_tokens]
    for i in range(0, len(full), batch_size):
        yield _window_chunk(dataset, full[i : i + batch_size], seq_len)
    rest = n_tokens - len(full) * seq_len
    if rest:
        yield _window_chunk(dataset, np.array([len(full) * seq_len]), rest)


def _window_chunk(dataset, starts: np.ndarray, length: int) -> Chunk:
    positions = starts[:, None] + np.arange(length)  # (B, N) token positions in the split
    ids = torch.from_numpy(np.asarray(dataset.tokens[positions], dtype=np.int64))
    docs = dataset.doc_ids(positions).reshape(-1)
    return Chunk(
        input_ids=ids,
        attention_mask=None,
        doc_ids=docs,
        positions=np.broadcast_to(np.arange(length), positions.shape).reshape(-1),
        domains=dataset.domains[docs],
    )


def contextual_chunks(samples: list, batch_size: int, pad_id: int):
    """The contextual-token samples, right-padded into batches; each sample is one document."""
    for i in range(0, len(samples), batch_size):
        group = samples[i : i + batch_size]
        width = max(len(s.token_ids) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        doc, pos, word, sense, target = [], [], [], [], []
        for row, s in enumerate(group):
            n = len(s.token_ids)
            ids[row, :n] = torch.tensor(s.token_ids)
            mask[row, :n] = 1
            doc.append(np.full(n, i + row))
            pos.append(np.arange(n))
            word.append(np.full(n, s.word_index))
            sense.append(np.full(n, s.sense_index))
            is_target = np.zeros(n, dtype=bool)
            is_target[list(s.target_positions)] = True
            target.append(is_target)
        yield Chunk(
            input_ids=ids,
            attention_mask=mask,
            doc_ids=np.concatenate(doc),
            positions=np.concatenate(pos),
            domains=np.full(int(mask.sum()), -1),
            context={
                "context_word": np.concatenate(word),
                "context_sense": np.concatenate(sense),
                "context_target": np.concatenate(target),
            },
        )


# ----------------------------------------------------------------------------- writing


def _next_and_predicted(chunk: Chunk, predicted: torch.Tensor, valid: torch.Tensor | None):
    """(n_real,) next_ids and predicted_ids of a chunk's real tokens: the next real token of the same
    row (-1 after a row's last real token) and the argmax the model gave at each position."""
    ids = chunk.input_ids.cpu()
    mask = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid.cpu().reshape(ids.shape)
    nxt = torch.full_like(ids, -1)
    # rows are right-padded (contextual) or unpadded (windows): a real token's successor is real or padding
    has_next = mask[:, :-1] & mask[:, 1:]
    nxt[:, :-1] = torch.where(has_next, ids[:, 1:], torch.full_like(ids[:, 1:], -1))
    keep = mask.reshape(-1)
    pred = predicted.reshape(-1).cpu()
    return nxt.reshape(-1)[keep].numpy(), pred[keep].numpy()


def trace_arrays(
    n_tokens: int, router: Router, router_probs: bool, contextual: bool, k: int, predictions: bool = False
) -> dict[str, tuple[tuple[int, ...], type]]:
    """Name -> (shape, dtype) of the arrays a trace holds (see TraceWriter)."""
    L, T, E = router.n_layers, n_tokens, router.n_experts
    shapes = {
        "token_ids": ((T,), np.int32),
        "doc_ids": ((T,), np.int64),
        "positions": ((T,), np.int32),
        "domains": ((T,), np.int16),
        "topk_ids": ((L, T, k), np.int16),
        "topk_weights": ((L, T, k), np.float32),
    }
    if router_probs:
        shapes["router_probs"] = ((L, T, E), np.float16)
    if predictions:
        shapes.update(predicted_ids=((T,), np.int32), next_ids=((T,), np.int32))
    if contextual:
        shapes.update(
            context_word=((T,), np.int16), context_sense=((T,), np.int16), context_target=((T,), np.bool_)
        )
    return shapes


def trace_bytes(arrays: dict[str, tuple[tuple[int, ...], type]]) -> int:
    """Disk space the .npy files take: data, header, and a block of slack each (plus meta.json)."""
    data = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in arrays.values())
    return data + 4096 * (len(arrays) + 1) + (1 << 20)


class TraceWriter:
    """Pre-sized .npy files filled chunk by chunk (np.lib.format.open_memmap). Their blocks are
    allocated up front (`reserve`), so a disk that fills fails here, not as SIGBUS mid-trace."""

    def __init__(
        self,
        directory: Path,
        n_tokens: int,
        router: Router,
        router_probs: bool,
        contextual: bool,
        k: int,
        predictions: bool = False,
    ):
        """k: the columns of topk_ids (top_k, or top_k · depth for a tree router's distinct experts);
        predictions: also predicted_ids and next_ids (T,) int32 (`add` then needs the predicted ids)."""
        shapes = trace_arrays(n_tokens, router, router_probs, contextual, k, predictions)
        self.arrays = {}
        for name, (shape, dtype) in shapes.items():
            path = directory / f"{name}.npy"
            self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            reserve(path)
        self.filled = 0

    def add(self, chunk: Chunk, routing: list[RoutingInfo], predicted: torch.Tensor | None = None) -> int:
        """Write the real tokens of a chunk (predicted: (B, N) argmax ids, with predictions); returns
        how many."""
        valid = None if chunk.attention_mask is None else chunk.attention_mask.reshape(-1).bool()
        ids = chunk.input_ids.reshape(-1)
        if valid is not None:
            ids = ids[valid.to(ids.device)]
        n = ids.numel()
        s = slice(self.filled, self.filled + n)
        a = self.arrays
        a["token_ids"][s] = ids.cpu().numpy()
        if "predicted_ids" in a:
            a["next_ids"][s], a["predicted_ids"][s] = _next_and_predicted(chunk, predicted, valid)
        a["doc_ids"][s], a["positions"][s], a["domains"][s] = chunk.doc_ids, chunk.positions, chunk.domains
        for name, values in (chunk.context or {}).items():
            a[name][s] = values
        for layer, r in enumerate(routing):
            keep = slice(None) if valid is None else valid.to(r.topk_ids.device)
            a["topk_ids"][layer, s] = r.topk_ids[keep].cpu().numpy()
            a["topk_weights"][layer, s] = r.topk_weights[keep].float().cpu().numpy()
            if "router_probs" in a:
                a["router_probs"][layer, s] = r.router_logits[keep].float().softmax(-1).half().cpu().numpy()
        self.filled += n
        return n

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()


def trace(
    model: str | Path | Router,
    out: str | Path,
    data: str | Path | None = None,
    split: str = "val",
    contextual: bool = False,
    max_tokens: int = 0,
    seq_len: int = 0,
    batch_size: int = 8,
    router_probs: bool = False,
    progress: bool = True,
    predictions: bool = False,
) -> Path:
    """Trace `model` on a tokenized split (`data`) or on the contextual-token set; returns `out`.

    predictions: also record predicted_ids (argmax of the logits at each position) and next_ids (the
    following token of the same window or sample, -1 at its last token)."""
    from tqdm.auto import tqdm

    from moelab.data.tokenizer import load_tokenizer

    require_at_least(
        ("--max-tokens", max_tokens, 0), ("--seq-len", seq_len, 0), ("--batch-size", batch_size, 1)
    )
    if contextual and (data is not None or max_tokens or seq_len):
        raise MoelabError(
            "--contextual traces the built-in contextual-token set; drop --data, --max-tokens, --seq-len"
        )
    out = Path(out)
    if out.exists() and not (out / "meta.json").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise MoelabError(f"{out} exists and is not a trace; choose a new --out (e.g. {out}/trace)")
    router = model if isinstance(model, Router) else open_router(model)
    slots = router.top_k * router.tree["depth"] if router.tree else router.top_k  # topk_ids columns
    if predictions and router.predict is None:
        raise MoelabError(f"{router.name}: --predictions needs the model's logits, which this router lacks")
    if seq_len > router.seq_len_limit:
        raise MoelabError(f"--seq-len {seq_len} is longer than the model's {router.seq_len_limit} positions")
    tokenizer = load_tokenizer(router.tokenizer_path) if router.tokenizer_path else None
    meta = {
        "format": FORMAT,
        "model": router.name,
        "source": router.source,
        "checkpoint_step": router.checkpoint_step,
        "tokenizer_hash": tokenizer.hash if tokenizer else None,
        "n_layers": router.n_layers,
        "n_experts": router.n_experts,
        "top_k": slots,
        "domains": [],
        "has_router_probs": router_probs,
        "has_predictions": predictions,
        "contextual": None,
        "data": None,
    }
    if router.router_similarity is not None:
        meta["router_similarity"] = router.router_similarity
    if router.expert_widths is not None:
        meta["expert_widths"] = router.expert_widths
    if router.tree is not None:
        meta["tree"] = router.tree
    if contextual:
        from moelab.interp.contextual import load_contextual_set

        if tokenizer is None:
            raise MoelabError(
                f"{router.name} has no tokenizer.json; the contextual set needs the model's tokenizer"
            )
        cset = load_contextual_set(tokenizer)
        if not cset.words:
            raise MoelabError(
                f"no contextual word is a single token in {router.tokenizer_path}; nothing to trace"
            )
        samples = list(cset.samples())
        n_tokens = sum(len(s.token_ids) for s in samples)
        chunks = contextual_chunks(samples, batch_size, tokenizer.pad_id)
        meta["contextual"] = {**cset.meta(), "dropped": cset.dropped}
        meta["data"] = "contextual"
    else:
        from moelab.data.loader import TokenDataset

        if data is None:
            raise MoelabError("pass --data DIR (a tokenized split) or --contextual")
        dataset = TokenDataset(data, split)
        if tokenizer is not None:
            dataset.check_tokenizer(tokenizer.hash)
        if dataset.vocab_size > router.vocab_size:
            raise MoelabError(f"{data} has vocab {dataset.vocab_size} > the model's {router.vocab_size}")
        n_tokens = min(dataset.n_tokens, max_tokens) if max_tokens else dataset.n_tokens
        chunks = data_chunks(dataset, seq_len or router.seq_len, batch_size, n_tokens)
        meta["domains"], meta["data"] = list(dataset.domain_names), f"{data}:{split}"
    needed = trace_bytes(trace_arrays(n_tokens, router, router_probs, contextual, slots, predictions))
    if needed > free_bytes(out.parent):  # checked before pre-sizing: see TraceWriter
        hint = "free some space, choose another --out, or trace fewer tokens (--max-tokens)"
        raise disk_full(out, needed=needed, hint=hint, before=True)
    with atomic_dir(out) as tmp:
        writer = TraceWriter(tmp, n_tokens, router, router_probs, contextual, slots, predictions)
        with tqdm(total=n_tokens, desc="trace", unit="tok", unit_scale=True, disable=not progress) as bar:
            for chunk in chunks:
                ids = chunk.input_ids.to(router.device)
                mask = None if chunk.attention_mask is None else chunk.attention_mask.to(router.device)
                if predictions:
                    bar.update(writer.add(chunk, *router.predict(ids, mask)))
                else:
                    bar.update(writer.add(chunk, router.route(ids, mask)))
        if writer.filled != n_tokens:  # an internal invariant, not a user error
            raise RuntimeError(f"traced {writer.filled} tokens, expected {n_tokens}")
        writer.close()
        meta["n_tokens"] = n_tokens
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def cmd_trace(args) -> None:
    from moelab.cli import show_progress

    out = trace(
        args.model,
        args.out,
        data=args.data,
        split=args.split,
        contextual=args.contextual,
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        router_probs=args.router_probs,
        predictions=getattr(args, "predictions", False),
        progress=show_progress(args),
    )
    meta = json.loads((out / "meta.json").read_text())
    print(
        f"traced {meta['n_tokens']:,} tokens x {meta['n_layers']} MoE layers "
        f"({meta['n_experts']} experts, top-{meta['top_k']}) -> {out}"
    )
    print(f"next: moelab analyze {out}")
