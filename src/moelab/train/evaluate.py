"""Validation: loss, perplexity, MaxVio over the whole evaluated set, per-domain loss.

Used by the trainer every `eval_every` steps and by `moelab eval`. The same windows are evaluated
every time (a fresh loader with a fixed seed), so validation curves compare like with like.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from moelab.data.loader import PackedLoader, TokenDataset
from moelab.errors import MoelabError
from moelab.train.device import autocast_for
from moelab.train.telemetry import max_violation

log = logging.getLogger(__name__)


class ValLoader:
    """Recreates the same validation batches on every call (fixed seed, from the start)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int = 0):
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        PackedLoader(dataset, seq_len, batch_size, seed=seed)  # refuse a too-small split now, not later

    def batches(self, max_batches: int):
        loader = PackedLoader(
            self.dataset, self.seq_len, self.batch_size, seed=self.seed, return_doc_ids=True
        )
        n = len(loader)  # batches in one pass over the split
        if max_batches:
            n = min(n, max_batches)
        it = iter(loader)
        for _ in range(n):
            yield next(it)

    @property
    def domain_names(self) -> list[str]:
        return list(self.dataset.domain_names)


def make_val_loader(config, splits) -> ValLoader | None:
    """The validation loader of a run; None (with a warning) when `splits` (the data's) lack it."""
    dc, tc = config.data, config.train
    if dc.val_split not in splits:  # a damaged split is an error (TokenDataset says which file)
        log.warning("%s has no '%s' split; validation is skipped", dc.path, dc.val_split)
        return None
    dataset = TokenDataset(dc.path, dc.val_split)
    seq_len = min(dc.seq_len, max(1, dataset.n_tokens - 1))
    return ValLoader(dataset, seq_len, tc.batch_size, seed=tc.seed)


@torch.no_grad()
def evaluate(model, val: ValLoader, max_batches: int, device, autocast=None) -> dict:
    """Mean token loss, perplexity, MaxVio_global per MoE layer, and loss per domain.

    autocast None = the precision the model was trained in (bf16 autocast on GPU, fp32 on CPU).
    """
    model.eval()
    n_domains = len(val.domain_names)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    dom_sum = torch.zeros(max(n_domains, 1), dtype=torch.float64, device=device)
    dom_n = torch.zeros_like(dom_sum)
    counts = None
    precision = autocast or autocast_for(model.config.train, torch.device(device))
    for batch in val.batches(max_batches):  # at least one: ValLoader refuses a split smaller than a batch
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        with precision:
            out = model(input_ids)
        token_loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.reshape(-1), reduction="none")
        loss_sum += token_loss.sum()
        n_tok += token_loss.numel()
        counts = out.expert_counts if counts is None else counts + out.expert_counts
        if n_domains and "domains" in batch:
            dom = batch["domains"].to(device).reshape(-1)
            known = dom >= 0
            dom_sum.scatter_add_(0, dom.clamp(min=0), token_loss.double() * known)
            dom_n.scatter_add_(0, dom.clamp(min=0), known.double())
    loss = (loss_sum / n_tok).item()
    result = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": int(n_tok.item()),
        "max_vio_global": max_violation(counts).tolist(),
    }
    if n_domains:
        per, seen = (dom_sum / dom_n.clamp(min=1)).tolist(), dom_n.tolist()
        result["domain_loss"] = {name: per[i] for i, name in enumerate(val.domain_names) if seen[i] > 0}
    return result


def open_evaluation(checkpoint, data, split: str, batch_size: int, seq_len: int = 0):
    """(checkpoint dir, model on the best device, ValLoader, device) for `moelab eval` and `moelab ablate`.

    Refuses data tokenized with another tokenizer than the checkpoint's, and a seq_len beyond the
    model's positions (model.max_seq_len: its loss would mean nothing). seq_len 0 = the checkpoint's
    data.seq_len, capped by the model's positions and the split's length.
    """
    from moelab.checkpoint import CONFIG, TOKENIZER, load, resolve_checkpoint
    from moelab.config import load_config
    from moelab.data.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(checkpoint)
    dataset = TokenDataset(data, split)
    if (ckpt / TOKENIZER).is_file():
        dataset.check_tokenizer(load_tokenizer(ckpt / TOKENIZER).hash)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if seq_len and (ckpt / CONFIG).is_file():  # before loading the weights: refusals are instant
        positions = load_config(ckpt / CONFIG).model.max_seq_len
        if seq_len > positions:
            raise MoelabError(
                f"--seq-len {seq_len} is longer than the {positions} positions of {ckpt} "
                f"(model.max_seq_len); give --seq-len <= {positions}"
            )
    model = load(ckpt, device=device)
    mc = model.config
    seq_len = min(seq_len or mc.data.seq_len, mc.model.max_seq_len, dataset.n_tokens - 1)
    return ckpt, model, ValLoader(dataset, seq_len, batch_size), device
