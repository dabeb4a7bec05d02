"""`moelab lens`: an expert logit lens - which tokens each routed expert's mean output promotes.

For every MoE layer and routed expert e, over the (token, slot) pairs routed to e in N tokens of a
tokenized split:

    mean_e   = sum of e's output y(t, slot) / n_e        (each (token, slot) counted once)
    logits_e = lm_head(norm(mean_e))                      (the model's final norm and unembedding)

y is the expert's output before its mixing weight (after its per-expert output norm, when the model
has one), captured with a forward hook on each routed-expert module during the real forward pass: a
moelab `RoutedExperts` reruns its own kernel with `per_slot=True`; a transformers MoE folder (OLMoE,
Mixtral, Qwen2-MoE, Qwen3-MoE; see hf_models) has its experts module called once per top-k slot with
weight 1, so its own expert implementation gives y (a Qwen2-MoE shared expert is not a routed expert
and is left out). Passing a *mean direction* through the final RMSNorm is a choice: the norm was
trained on residual-stream states, not on one expert's average contribution; it fixes the scale (the
logits' ranking does not depend on it) and applies the norm's learned per-channel weight, which the
ranking does depend on. Experts that got no token are recorded as null. The model runs in float32 and
without autocast, whatever the device. Output: JSON (docs/METRICS.md, "Expert logit lens").
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch

from moelab.errors import MoelabError, require_at_least
from moelab.io import atomic_file, refuse_foreign_file

FORMAT = "moelab-lens/1"


class ExpertMeans:
    """Forward hooks on a model's routed-expert modules: per MoE layer, the sum (E, D) float64 and count
    (E,) of each expert's per-slot output. `per_slot(module, args, kwargs)` recomputes what the module
    just ran as (topk_ids (T, k), y (T, k, D)), y unweighted, ids -1 for empty slots."""

    def __init__(self, modules: list[torch.nn.Module], n_experts: int, per_slot):
        if not modules:
            raise MoelabError("the model has no routed experts; nothing to lens")
        self.modules, self.n_experts, self.per_slot = modules, n_experts, per_slot
        self.sums = [None] * len(modules)
        self.counts = [torch.zeros(n_experts, dtype=torch.long) for _ in modules]
        self.handles = [
            m.register_forward_hook(self._hook(layer), with_kwargs=True) for layer, m in enumerate(modules)
        ]

    def _hook(self, layer: int):
        def hook(module, args, kwargs, _out):
            ids, y = self.per_slot(module, args, kwargs)
            if ids is None:  # a nested call made by per_slot itself
                return
            valid = ids >= 0
            chosen = ids[valid].long().cpu()  # (n,)
            if self.sums[layer] is None:
                self.sums[layer] = torch.zeros(self.n_experts, y.shape[-1], dtype=torch.float64)
            self.sums[layer].index_add_(0, chosen, y[valid].double().cpu())
            self.counts[layer] += torch.bincount(chosen, minlength=self.n_experts)

        return hook

    def means(self, layer: int) -> list[torch.Tensor | None]:
        """Each expert's mean output (D,) float64, None for an expert that got no token."""
        sums, counts = self.sums[layer], self.counts[layer]
        return [None if c == 0 or sums is None else sums[e] / int(c) for e, c in enumerate(counts.tolist())]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def moelab_per_slot(module, args, kwargs):
    """per_slot for moelab's RoutedExperts: its own kernel with per_slot=True (after the per-expert
    output norm, when the model has one)."""
    from moelab.moe.dispatch import run_expert_groups
    from moelab.moe.routing import RoutingInfo

    names = ("x", "topk_ids", "topk_weights")
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    x, ids, weights = bound["x"], bound["topk_ids"], bound.get("topk_weights")
    if isinstance(ids, RoutingInfo):
        ids, weights = ids.topk_ids, ids.topk_weights
    _, y = run_expert_groups(x, ids, weights, module.groups(), "sorted", module.output_norm, per_slot=True)
    return ids, y  # y: (T, k, D), 0 where id is -1


def hf_per_slot():
    """per_slot for a transformers experts module `experts(hidden (T, D), top_k_index (T, k), top_k_weights
    (T, k))`: the module itself is called once per slot with that slot's ids and weight 1, so y is
    exactly what the model's own expert implementation computes, before the routing weight."""
    busy = [False]

    def per_slot(module, args, kwargs):
        if busy[0]:
            return None, None
        names = ("hidden_states", "top_k_index", "top_k_weights")
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        if set(bound) != set(names):
            raise MoelabError(
                f"{type(module).__name__} is not called as experts(hidden, top_k_index, top_k_weights); "
                "this transformers version is not supported (pip install 'moelab[hf]')"
            )
        x, ids, weights = bound["hidden_states"], bound["top_k_index"], bound["top_k_weights"]
        ones = torch.ones_like(weights[:, :1])  # (T, 1)
        busy[0] = True
        try:
            y = torch.stack([module(x, ids[:, s : s + 1], ones) for s in range(ids.shape[1])], dim=1)
        finally:
            busy[0] = False
        return ids, y  # y: (T, k, D)

    return per_slot


@dataclasses.dataclass
class Subject:
    """What the lens needs from a model, whatever its origin."""

    forward: Callable[[torch.Tensor], None]  # (B, N) token ids -> runs the model once (logits unused)
    experts: list[torch.nn.Module]  # the routed-expert module of each MoE layer, in order
    per_slot: Callable
    norm: torch.nn.Module  # the final norm
    head: torch.nn.Module  # the unembedding
    n_experts: int
    vocab_size: int
    seq_len: int  # default window
    seq_len_limit: int  # positions the model supports
    tokenizer_path: Path | None
    name: str
    checkpoint_step: int | None


def _moelab_subject(run: Path, device: torch.device) -> Subject:
    from moelab.checkpoint import TOKENIZER, checkpoint_step, load, resolve_checkpoint
    from moelab.moe.experts import RoutedExperts

    ckpt = resolve_checkpoint(run)
    model = load(ckpt, device=device).float().eval()
    for name in ("norm", "lm_head"):
        if not isinstance(getattr(model, name, None), torch.nn.Module):
            raise MoelabError(
                f"{type(model).__name__} has no `{name}`; lens needs the final norm and lm_head"
            )
    # the forward needs no logits: let the LM head see only the last position ((B, N, V) is large);
    # expert_logits' (1, D) inputs pass unchanged
    model.lm_head.register_forward_pre_hook(
        lambda _module, args: (args[0][:, -1:],) if args[0].dim() == 3 else None
    )
    cfg = model.config
    return Subject(
        forward=model,
        experts=[m for m in model.modules() if isinstance(m, RoutedExperts)],
        per_slot=moelab_per_slot,
        norm=model.norm,
        head=model.lm_head,
        n_experts=cfg.model.n_experts,
        vocab_size=cfg.model.vocab_size,
        seq_len=min(cfg.data.seq_len, cfg.model.max_seq_len),
        seq_len_limit=cfg.model.max_seq_len,
        tokenizer_path=ckpt / TOKENIZER if (ckpt / TOKENIZER).is_file() else None,
        name=str(ckpt),
        checkpoint_step=checkpoint_step(ckpt),
    )


def _hf_subject(path: Path, device: torch.device) -> Subject:
    from moelab.interp.hf_models import load_hf_moe

    hf = load_hf_moe(path, device=device, dtype=torch.float32)
    model = hf.model
    norm = getattr(getattr(model, "model", None), "norm", None)
    head = model.get_output_embeddings()
    if not isinstance(norm, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise MoelabError(f"{path}: no final norm (model.norm) or output embeddings; lens cannot read it")
    return Subject(
        forward=lambda ids: model(ids, use_cache=False, logits_to_keep=1),
        experts=[block.experts for block in hf.blocks],
        per_slot=hf_per_slot(),
        norm=norm,
        head=head,
        n_experts=hf.n_experts,
        vocab_size=hf.vocab_size,
        seq_len=min(2048, hf.max_positions),
        seq_len_limit=hf.max_positions,
        tokenizer_path=hf.tokenizer_path,
        name=str(path),
        checkpoint_step=None,
    )


@torch.no_grad()
def expert_logits(norm: torch.nn.Module, head: torch.nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """head(norm(mean)) (V,) float32 for one mean output direction (D,)."""
    ref = head.weight
    return head(norm(mean.to(device=ref.device, dtype=ref.dtype)[None]))[0].float().cpu()


def _ranked(ids: torch.Tensor, logits: torch.Tensor, tokenizer) -> list[dict]:
    rows = []
    for i in ids.tolist():
        row = {"id": int(i), "logit": float(logits[i])}
        if tokenizer is not None:
            row["token"] = tokenizer.decode([int(i)])
        rows.append(row)
    return rows


def lens(
    run: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    split: str = "val",
    max_tokens: int = 0,
    top: int = 10,
    seq_len: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict:
    """The expert logit lens of a moelab run/checkpoint or a transformers MoE folder on a tokenized split;
    written to `out` (default RUN/lens.json; required for a transformers folder) and returned."""
    from tqdm.auto import tqdm

    from moelab.data.loader import TokenDataset
    from moelab.data.tokenizer import load_tokenizer
    from moelab.interp.hf_models import is_hf_moe_dir
    from moelab.interp.trace import data_chunks

    require_at_least(
        ("--max-tokens", max_tokens, 0), ("--top", top, 1), ("--seq-len", seq_len, 0),
        ("--batch-size", batch_size, 1),
    )  # fmt: skip
    run = Path(run)
    hf = is_hf_moe_dir(run)
    if hf and out is None:
        raise MoelabError(
            f"{run} is a transformers folder; pass --out FILE for the lens (nothing is written there)"
        )
    out = Path(out) if out is not None else run / "lens.json"
    refuse_foreign_file(out, f'"format": "{FORMAT}"', "moelab lens")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    subject = _hf_subject(run, device) if hf else _moelab_subject(run, device)
    tokenizer = load_tokenizer(subject.tokenizer_path) if subject.tokenizer_path else None
    dataset = TokenDataset(data, split)
    if tokenizer is not None:
        dataset.check_tokenizer(tokenizer.hash)
    if dataset.vocab_size > subject.vocab_size:
        raise MoelabError(f"{data} has vocab {dataset.vocab_size} > the model's {subject.vocab_size}")
    window = seq_len or subject.seq_len
    if window > subject.seq_len_limit:
        raise MoelabError(f"--seq-len {window} is longer than the model's {subject.seq_len_limit} positions")
    n_tokens = min(dataset.n_tokens, max_tokens) if max_tokens else dataset.n_tokens
    capture = ExpertMeans(subject.experts, subject.n_experts, subject.per_slot)
    try:
        with torch.no_grad(), tqdm(total=n_tokens, desc="lens", unit="tok", disable=not progress) as bar:
            for chunk in data_chunks(dataset, window, batch_size, n_tokens):
                subject.forward(chunk.input_ids.to(device))
                bar.update(chunk.input_ids.numel())
    finally:
        capture.remove()
    top = min(top, subject.vocab_size)
    layers = []
    for layer in range(len(capture.modules)):
        experts = []
        for e, mean in enumerate(capture.means(layer)):
            if mean is None:
                experts.append(None)
                continue
            logits = expert_logits(subject.norm, subject.head, mean)
            order = torch.argsort(logits, descending=True, stable=True)
            experts.append(
                {
                    "expert": e,
                    "n_tokens": int(capture.counts[layer][e]),
                    "mean_norm": float(mean.norm()),
                    "promoted": _ranked(order[:top], logits, tokenizer),
                    "suppressed": _ranked(order.flip(0)[:top], logits, tokenizer),
                }
            )
        layers.append({"layer": layer, "experts": experts})
    result = {
        "format": FORMAT,
        "model": subject.name,
        "source": "transformers" if hf else "moelab",
        "checkpoint_step": subject.checkpoint_step,
        "data": f"{data}:{split}",
        "n_tokens": n_tokens,
        "n_layers": len(layers),
        "n_experts": subject.n_experts,
        "top": top,
        "tokenizer_hash": tokenizer.hash if tokenizer else None,
        "layers": layers,
    }
    with atomic_file(out) as fh:
        json.dump(result, fh, indent=1)
    return result


def read_lens(path: str | Path, n_layers: int, n_experts: int) -> dict:
    """A lens file checked against the trace it is shown with (same MoE layers and experts)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoelabError(
            f"{path} does not exist; write it with `moelab lens RUN --data DIR --out {path}`"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MoelabError(f"{path} is not a lens file ({type(e).__name__}); re-run moelab lens") from None
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise MoelabError(f"{path} is not a lens file (format {FORMAT}); re-run moelab lens")
    if (result.get("n_layers"), result.get("n_experts")) != (n_layers, n_experts):
        raise MoelabError(
            f"{path} has {result.get('n_layers')} MoE layers x {result.get('n_experts')} experts, the trace "
            f"{n_layers} x {n_experts}: a lens of another model"
        )
    return result


def summarize(result: dict, per_expert: int = 5) -> str:
    """A few lines: each expert's most promoted tokens."""
    lines = []
    for layer in result["layers"]:
        for e, ex in enumerate(layer["experts"]):
            if ex is None:
                lines.append(f"L{layer['layer']} E{e}: no tokens")
                continue
            shown = ", ".join(repr(r.get("token", r["id"])) for r in ex["promoted"][:per_expert])
            lines.append(f"L{layer['layer']} E{e} ({ex['n_tokens']:,}): {shown}")
    return "\n".join(lines)


def cmd_lens(args) -> None:
    from moelab.cli import show_progress

    result = lens(
        args.run,
        args.data,
        out=args.out,
        split=args.split,
        max_tokens=args.max_tokens,
        top=args.top,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        progress=show_progress(args),
    )
    print(summarize(result))
    out = Path(args.out) if args.out else Path(args.run) / "lens.json"
    print(f"lens of {result['n_layers']} MoE layers x {result['n_experts']} experts on "
          f"{result['n_tokens']:,} tokens -> {out}")  # fmt: skip
