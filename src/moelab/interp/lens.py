"""`moelab lens`: an expert logit lens - which tokens each routed expert's mean output promotes.

For every MoE layer and routed expert e, over the (token, slot) pairs routed to e in N tokens of a
tokenized split:

    mean_e   = sum of e's output y(t, slot) / n_e        (each (token, slot) counted once)
    logits_e = lm_head(norm(mean_e))                      (the model's final norm and unembedding)

y is the expert's output before its mixing weight (after its per-expert output norm, when the model
has one), captured with a forward hook on each `RoutedExperts` module that reruns the layer's experts
with `per_slot=True`. Passing a *mean direction* through the final RMSNorm is a choice: the norm was
trained on residual-stream states, not on one expert's average contribution; it fixes the scale (the
logits' ranking does not depend on it) and applies the norm's learned per-channel weight, which the
ranking does depend on. Experts that got no token are recorded as null. The model runs in float32 and
without autocast, whatever the device. Output: JSON (docs/METRICS.md, "Expert logit lens").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moelab.errors import MoelabError, require_at_least
from moelab.io import atomic_file

FORMAT = "moelab-lens/1"


class ExpertMeans:
    """Forward hooks on every RoutedExperts of a model: per layer, the sum (E, D) float64 and count (E,)
    of each expert's per-slot output. Layers are numbered in module order."""

    def __init__(self, model: torch.nn.Module):
        from moelab.moe.experts import RoutedExperts

        self.modules = [m for m in model.modules() if isinstance(m, RoutedExperts)]
        if not self.modules:
            raise MoelabError(f"{type(model).__name__} has no routed experts; nothing to lens")
        self.sums = [None] * len(self.modules)
        self.counts = [torch.zeros(m.n_experts, dtype=torch.long) for m in self.modules]
        self.handles = [
            m.register_forward_hook(self._hook(layer), with_kwargs=True)
            for layer, m in enumerate(self.modules)
        ]

    def _hook(self, layer: int):
        def hook(module, args, kwargs, _out):
            from moelab.moe.dispatch import run_expert_groups
            from moelab.moe.routing import RoutingInfo

            names = ("x", "topk_ids", "topk_weights")
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            x, ids, weights = bound["x"], bound["topk_ids"], bound.get("topk_weights")
            if isinstance(ids, RoutingInfo):
                ids, weights = ids.topk_ids, ids.topk_weights
            _, y = run_expert_groups(
                x, ids, weights, module.groups(), "sorted", module.output_norm, per_slot=True
            )  # y: (T, k, D), 0 where id is -1
            valid = ids >= 0
            chosen = ids[valid].long()  # (n,)
            if self.sums[layer] is None:
                self.sums[layer] = torch.zeros(module.n_experts, y.shape[-1], dtype=torch.float64)
            self.sums[layer].index_add_(0, chosen.cpu(), y[valid].double().cpu())
            self.counts[layer] += torch.bincount(chosen.cpu(), minlength=module.n_experts)

        return hook

    def means(self, layer: int) -> list[torch.Tensor | None]:
        """Each expert's mean output (D,) float64, None for an expert that got no token."""
        sums, counts = self.sums[layer], self.counts[layer]
        return [None if c == 0 or sums is None else sums[e] / int(c) for e, c in enumerate(counts.tolist())]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def expert_logits(model: torch.nn.Module, mean: torch.Tensor) -> torch.Tensor:
    """lm_head(norm(mean)) (V,) float32 for one mean output direction (D,)."""
    ref = model.lm_head.weight
    return model.lm_head(model.norm(mean.to(device=ref.device, dtype=ref.dtype)[None]))[0].float().cpu()


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
    """The expert logit lens of a moelab run/checkpoint on a tokenized split; written to `out` (default
    RUN/lens.json) and returned."""
    from tqdm.auto import tqdm

    from moelab.checkpoint import TOKENIZER, load, resolve_checkpoint
    from moelab.data.loader import TokenDataset
    from moelab.data.tokenizer import load_tokenizer
    from moelab.interp.hf_models import is_hf_moe_dir
    from moelab.interp.trace import data_chunks

    require_at_least(
        ("--max-tokens", max_tokens, 0), ("--top", top, 1), ("--seq-len", seq_len, 0),
        ("--batch-size", batch_size, 1),
    )  # fmt: skip
    run = Path(run)
    if is_hf_moe_dir(run):
        raise MoelabError(f"{run} is a transformers folder; lens supports moelab checkpoints only")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt = resolve_checkpoint(run)
    model = load(ckpt, device=device).float().eval()
    for name in ("norm", "lm_head"):
        if not isinstance(getattr(model, name, None), torch.nn.Module):
            raise MoelabError(
                f"{type(model).__name__} has no `{name}`; lens needs the final norm and lm_head"
            )
    cfg = model.config
    # the forward needs no logits: let the LM head see only the last position ((B, N, V) is large)
    head_hook = model.lm_head.register_forward_pre_hook(lambda _module, args: (args[0][:, -1:],))
    tok_path = ckpt / TOKENIZER
    tokenizer = load_tokenizer(tok_path) if tok_path.is_file() else None
    dataset = TokenDataset(data, split)
    if tokenizer is not None:
        dataset.check_tokenizer(tokenizer.hash)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise MoelabError(f"{data} has vocab {dataset.vocab_size} > the model's {cfg.model.vocab_size}")
    window = seq_len or min(cfg.data.seq_len, cfg.model.max_seq_len)
    if window > cfg.model.max_seq_len:
        raise MoelabError(f"--seq-len {window} is longer than the model's {cfg.model.max_seq_len} positions")
    n_tokens = min(dataset.n_tokens, max_tokens) if max_tokens else dataset.n_tokens
    capture = ExpertMeans(model)
    try:
        with torch.no_grad(), tqdm(total=n_tokens, desc="lens", unit="tok", disable=not progress) as bar:
            for chunk in data_chunks(dataset, window, batch_size, n_tokens):
                model(chunk.input_ids.to(device))
                bar.update(chunk.input_ids.numel())
    finally:
        capture.remove()
        head_hook.remove()
    top = min(top, cfg.model.vocab_size)
    layers = []
    for layer in range(len(capture.modules)):
        experts = []
        for e, mean in enumerate(capture.means(layer)):
            if mean is None:
                experts.append(None)
                continue
            logits = expert_logits(model, mean)
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
    step = re.fullmatch(r"step-(\d+)", ckpt.name)
    result = {
        "format": FORMAT,
        "model": str(ckpt),
        "checkpoint_step": int(step.group(1)) if step else None,
        "data": f"{data}:{split}",
        "n_tokens": n_tokens,
        "n_layers": len(layers),
        "n_experts": cfg.model.n_experts,
        "top": top,
        "tokenizer_hash": tokenizer.hash if tokenizer else None,
        "layers": layers,
    }
    out = Path(out) if out is not None else run / "lens.json"
    with atomic_file(out) as fh:
        json.dump(result, fh, indent=1)
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
    result = lens(
        args.run,
        args.data,
        out=args.out,
        split=args.split,
        max_tokens=args.max_tokens,
        top=args.top,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    print(summarize(result))
    out = Path(args.out) if args.out else Path(args.run) / "lens.json"
    print(f"lens of {result['n_layers']} MoE layers x {result['n_experts']} experts on "
          f"{result['n_tokens']:,} tokens -> {out}")  # fmt: skip
