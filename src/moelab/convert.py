"""`moelab convert from-hf | to-hf`: writing converted folders, and what an export changes.

The name table, config mapping and state-dict conversions live in moelab.hf; this module writes
folders with them. Every output is written atomically and carries a record (moelab-convert.json) of
the command that wrote it, so convert never replaces a directory it did not write (`--force` replaces
only its own earlier output). `to-hf` refuses a loss-free-balancing model unless its bias is dropped on
purpose; `balance_bias_effect` then measures how many tokens route to other experts without it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moelab.checkpoint import CONFIG, WEIGHTS, assign_state, copy_tokenizer, resolve_checkpoint, write_model
from moelab.config import Config, load_config
from moelab.errors import MoelabError
from moelab.hf import (
    HF_CONFIG,
    HF_WEIGHTS,
    LAYOUTS,
    TOKENIZER,
    check_exportable,
    config_to_hf,
    load_hf_olmoe,
    to_hf_state_dict,
)
from moelab.io import atomic_dir
from moelab.models import build

log = logging.getLogger(__name__)


def refuse_hf_folder(path: str | Path, command: str) -> None:
    """Point a transformers folder given where a moelab checkpoint is needed to `convert from-hf`
    (`moelab trace` reads such folders as they are; the other commands need a moelab checkpoint)."""
    path = Path(path)
    if (path / HF_CONFIG).is_file() and not (path / CONFIG).is_file():
        raise MoelabError(
            f"{path} is a transformers folder, not a moelab checkpoint; {command} needs one: convert it with "
            f"`moelab convert from-hf {path} --out CKPT_DIR` (`moelab trace` reads the folder as it is)"
        )


# The record convert leaves in each output; --force replaces only a directory holding it (and nothing
# but the files that conversion writes), so no other data can be overwritten by a typo in --out.
CONVERTED = "moelab-convert.json"
_WRITES = {
    "from-hf": {WEIGHTS, CONFIG, TOKENIZER, "tokenizer_meta.json", CONVERTED},
    "to-hf": {HF_WEIGHTS, HF_CONFIG, TOKENIZER, CONVERTED},
}


def check_convert_out(out: Path, command: str, source: Path, force: bool = False) -> None:
    """Refuse an --out that exists and is not empty, unless `force` and `command` itself wrote it."""
    flag = f"`moelab convert {command}`"
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise MoelabError(f"--out {out} would replace the input {source}; choose another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise MoelabError(f"--out {out} is a file; choose a directory that does not exist")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    try:
        record = json.loads((out / CONVERTED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("command") != command:
        raise MoelabError(
            f"--out {out} exists and was not written by {flag}; choose a new directory (nothing was changed)"
        )
    extra = [n for n in names if n not in _WRITES[command]]
    if extra:
        raise MoelabError(
            f"--out {out} holds {extra[0]}, which {flag} does not write; choose a new directory "
            f"(nothing was changed)"
        )
    if not force:
        raise MoelabError(f"--out {out} holds an earlier {flag} output; pass --force to replace it")


def _write_record(directory: Path, command: str, source: Path, **extra) -> None:
    record = {"format": "moelab-convert/1", "command": command, "source": str(source), **extra}
    (directory / CONVERTED).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def convert_from_hf(hf_dir: str | Path, out: str | Path, force: bool = False) -> Path:
    """transformers OLMoE folder -> moelab checkpoint directory (written atomically).

    An existing non-empty `out` is refused, unless `force` and it is an earlier from-hf output."""
    hf_dir, out = Path(hf_dir), Path(out)
    check_convert_out(out, "from-hf", hf_dir, force)
    config, state = load_hf_olmoe(hf_dir)
    with torch.device("meta"):  # no allocation: the loaded tensors become the parameters
        model = build(config)
    assign_state(model, state, f"{hf_dir} does not match its config.json")
    del state
    with atomic_dir(out) as tmp:
        write_model(tmp, model, config)
        if (hf_dir / TOKENIZER).is_file():
            copy_tokenizer(hf_dir / TOKENIZER, tmp)
        _write_record(tmp, "from-hf", hf_dir.absolute())
    log.info("converted %s -> %s", hf_dir, out)
    return out


def convert_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    layout: str = "fused",
    drop_balance_bias: bool = False,
    force: bool = False,
) -> Path:
    """moelab checkpoint (or run dir) -> folder that transformers' OlmoeForCausalLM.from_pretrained loads.

    layout="fused" writes 5.x expert tensors, "per-expert" the 4.x modules (5.x loads both).
    drop_balance_bias: export a loss-free-balancing model without its bias (refused otherwise, since
    transformers' OLMoE has none and routes differently; `balance_bias_effect` measures how much).
    An existing non-empty `out` is refused, unless `force` and it is an earlier to-hf output.
    """
    if layout not in LAYOUTS:
        raise MoelabError(f"--layout {layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    out = Path(out)
    check_convert_out(out, "to-hf", Path(checkpoint), force)
    refuse_hf_folder(checkpoint, "convert to-hf")
    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt / CONFIG)
    check_exportable(config)  # before reading weights: refusals are instant
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MoelabError(f"{ckpt / WEIGHTS} could not be read ({e}); the checkpoint is corrupt") from None
    dtype = state["embed.weight"].dtype if "embed.weight" in state else torch.float32
    hf_state = to_hf_state_dict(state, config, layout, consume=True, drop_balance_bias=drop_balance_bias)
    hf_config = config_to_hf(config, dtype)
    with atomic_dir(out) as tmp:
        save_file(hf_state, str(tmp / HF_WEIGHTS), metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        if (ckpt / TOKENIZER).is_file():
            (tmp / TOKENIZER).write_bytes((ckpt / TOKENIZER).read_bytes())
        _write_record(tmp, "to-hf", ckpt.absolute(), layout=layout, dropped_balance_bias=drop_balance_bias)
    log.info("converted %s -> %s (%s layout)", ckpt, out, layout)
    return out


def balance_bias_effect(checkpoint: str | Path, max_tokens: int = 4096, seed: int = 0) -> dict:
    """How routing changes when the loss-free balancing bias is dropped, as `to-hf --drop-balance-bias`
    exports it: a sample of tokens runs through the model with and without the bias (end to end, so a
    change at one layer propagates to the next), and each token's top-k set is compared per layer.

    The sample is the first `max_tokens` tokens of the run's validation split (the config's data.path and
    data.val_split), when that directory is reachable from here and was tokenized with the checkpoint's
    tokenizer; otherwise seeded random token ids. Returns {"biased": whether any bias is non-zero (if
    not, nothing is routed and nothing changes), "source": what the sample is, "n_tokens", "changed":
    tokens whose set differs in at least one layer, "per_layer": [tokens changed per layer]}.
    """
    from moelab.checkpoint import TOKENIZER, load

    ckpt = resolve_checkpoint(checkpoint)
    model = load(ckpt)
    config = model.config
    biases = [buf for name, buf in model.named_buffers() if name.endswith("balance_bias")]
    if not any(bool(b.ne(0).any()) for b in biases):
        return {"biased": False, "source": None, "n_tokens": 0, "changed": 0, "per_layer": []}
    seq_len = max(1, min(config.data.seq_len, config.model.max_seq_len, max_tokens))
    ids, source = _validation_sample(config, ckpt / TOKENIZER, max_tokens)
    if ids is None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(config.model.vocab_size, (max_tokens,), generator=g)
        source = f"random token ids; {source}"
    n = ids.numel() // seq_len * seq_len or ids.numel()  # whole windows only
    windows = ids[:n].reshape(-1, min(seq_len, n))  # (B, N)

    def route() -> list[torch.Tensor]:
        sets = None
        with torch.inference_mode():
            for batch in windows.split(8):
                out = [r.topk_ids.sort(dim=-1).values for r in model(batch).routing]  # L x (B·N, k)
                sets = out if sets is None else [torch.cat([a, b]) for a, b in zip(sets, out)]
        return sets

    with_bias = route()
    with torch.no_grad():
        for buf in biases:
            buf.zero_()
    without = route()
    per_layer = [(a != b).any(dim=-1) for a, b in zip(with_bias, without)]  # L x (T,)
    changed = torch.stack(per_layer).any(dim=0)
    return {
        "biased": True,
        "source": source,
        "n_tokens": int(changed.numel()),
        "changed": int(changed.sum()),
        "per_layer": [int(c.sum()) for c in per_layer],
    }


def _validation_sample(config: Config, tokenizer: Path, max_tokens: int) -> tuple[torch.Tensor | None, str]:
    """(the first max_tokens of the run's validation split, where from) or (None, why not)."""
    from moelab.data.loader import TokenDataset

    where = f"{config.data.path}:{config.data.val_split}"
    try:
        data = TokenDataset(config.data.path, config.data.val_split)
        if tokenizer.is_file():
            data.check_tokenizer(tokenizer)
    except MoelabError as e:
        return None, f"the run's validation data is not usable here: {e}"
    ids = data.view(0, min(max_tokens, data.n_tokens)).long()
    if int(ids.max()) >= config.model.vocab_size:
        return None, f"{where} holds ids outside the model's vocabulary"
    return ids, f"the run's validation data {where}"
