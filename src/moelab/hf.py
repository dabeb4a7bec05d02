"""OLMoE <-> transformers: the one table of names, the config mapping, and folder conversion both ways.

A transformers OLMoE folder holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json). Two weight layouts exist:
  fused       (transformers 5.x) model.layers.{i}.mlp.experts.gate_up_proj (E, 2I, D) = [gate; up],
              model.layers.{i}.mlp.experts.down_proj (E, D, I)
  per-expert  (transformers 4.x, and what 5.x `save_pretrained` writes for OLMoE)
              model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight (I, D), .down_proj.weight (D, I)
moelab stores experts as (in, out) matrices: gate_up (E, D, 2I) = [gate | up], down (E, I, D), so
expert tensors are the fused ones with the last two dims swapped. Everything else is a rename.

Conversions are exact (renames, transposes and concatenations only): moelab -> transformers -> moelab
gives back the very same tensors, in the dtype they were saved in. Configs transformers' OLMoE cannot
represent are refused rather than approximated. transformers itself is not needed here.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moelab.checkpoint import CONFIG, WEIGHTS, assign_state, copy_tokenizer, resolve_checkpoint, write_model
from moelab.config import Config, DataConfig, ModelConfig, load_config
from moelab.errors import ConfigError, MoelabError
from moelab.io import atomic_dir
from moelab.models import build

log = logging.getLogger(__name__)

HF_CONFIG, HF_WEIGHTS, HF_INDEX, TOKENIZER = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
)
LAYOUTS = ("fused", "per-expert")

# ----------------------------------------------------------------------------- the mapping table

# moelab name, transformers (5.x fused) name, swap the last two dims. {i} is the layer index.
PARAMS: tuple[tuple[str, str, bool], ...] = (
    ("embed.weight", "model.embed_tokens.weight", False),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("blocks.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight", False),
    ("blocks.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight", False),
    ("blocks.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight", False),
    ("blocks.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight", False),
    ("blocks.{i}.attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight", False),
    ("blocks.{i}.attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight", False),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("blocks.{i}.mlp.router.weight", "model.layers.{i}.mlp.gate.weight", False),  # (E, D) both
    (
        "blocks.{i}.mlp.experts.gate_up",
        "model.layers.{i}.mlp.experts.gate_up_proj",
        True,
    ),  # (E,D,2I)|(E,2I,D)
    ("blocks.{i}.mlp.experts.down", "model.layers.{i}.mlp.experts.down_proj", True),  # (E,I,D)|(E,D,I)
    ("norm.weight", "model.norm.weight", False),
    ("lm_head.weight", "lm_head.weight", False),
)
# moelab-only state: the loss-free balancing bias. Zero on import; a non-zero one is exported only when
# dropped on purpose (drop_balance_bias): transformers' OLMoE selects experts without it.
BALANCE_BIAS = "blocks.{i}.mlp.router.balance_bias"
# transformers keys that carry no weights (old checkpoints saved the RoPE frequencies).
_IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")

# moelab ModelConfig field, OlmoeConfig field. rope_theta and the balancing coefficient are handled
# apart (rope_theta moved into rope_parameters in transformers 5.x; the coefficient lives in `moe`).
CONFIG_FIELDS: tuple[tuple[str, str], ...] = (
    ("vocab_size", "vocab_size"),
    ("d_model", "hidden_size"),
    ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"),
    ("d_expert", "intermediate_size"),
    ("n_experts", "num_experts"),
    ("top_k", "num_experts_per_tok"),
    ("norm_topk_prob", "norm_topk_prob"),
    ("rms_norm_eps", "rms_norm_eps"),
    ("max_seq_len", "max_position_embeddings"),
    ("pad_token_id", "pad_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("init_std", "initializer_range"),
)
_REQUIRED_HF = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "num_experts", "num_experts_per_tok")  # fmt: skip


def param_names(n_layers: int) -> list[tuple[str, str, bool]]:
    """The table expanded for n_layers: (moelab name, transformers fused name, transpose)."""
    names = []
    for ours, theirs, transpose in PARAMS:
        layers = range(n_layers) if "{i}" in ours else [None]
        names += [(ours.format(i=i), theirs.format(i=i), transpose) for i in layers]
    return names


def _expert_prefix(i: int) -> str:
    return f"model.layers.{i}.mlp.experts"


# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict) -> Config:
    """A moelab Config from a transformers OLMoE config.json dict; refuses what moelab cannot run."""
    model_type = hf.get("model_type")
    if model_type != "olmoe":
        raise MoelabError(
            f"config.json has model_type={model_type!r}; only OLMoE (model_type olmoe) converts"
        )
    missing = [k for k in _REQUIRED_HF if hf.get(k) is None]
    if missing:
        raise MoelabError(f"config.json lacks {', '.join(missing)}; it is not a complete OLMoE config")
    if hf.get("clip_qkv") is not None:
        raise MoelabError(f"config.json sets clip_qkv={hf['clip_qkv']}; moelab's OLMoE does not clip q/k/v")
    if hf.get("attention_bias"):
        raise MoelabError("config.json sets attention_bias=true; moelab's OLMoE has bias-free attention")
    kv_heads = hf.get("num_key_value_heads")
    if kv_heads not in (None, hf["num_attention_heads"]):
        raise MoelabError(
            f"config.json has num_key_value_heads={kv_heads} != num_attention_heads="
            f"{hf['num_attention_heads']} (grouped-query attention); moelab's OLMoE has none"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise MoelabError(f"config.json has hidden_act={hf['hidden_act']!r}; OLMoE experts use silu")
    head_dim = hf.get("head_dim")
    if head_dim not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
        raise MoelabError(
            f"config.json sets head_dim={head_dim}; moelab uses hidden_size / num_attention_heads"
        )

    model = {ours: hf[theirs] for ours, theirs in CONFIG_FIELDS if hf.get(theirs) is not None}
    if isinstance(model.get("eos_token_id"), list):
        model["eos_token_id"] = model["eos_token_id"][0]
    model["rope_theta"] = _rope_theta_from_hf(hf)
    moe = {}
    if hf.get("router_aux_loss_coef") is not None:
        moe["load_balance_coef"] = hf["router_aux_loss_coef"]
    try:
        data = {}  # data.seq_len (a default of 4096) no longer than the positions the model has
        positions = model.get("max_seq_len")
        if isinstance(positions, int) and 0 < positions < DataConfig.seq_len:
            data["seq_len"] = positions
        return load_config({"model": {"arch": "olmoe", **model}, "moe": moe, "data": data})
    except ConfigError as e:
        raise MoelabError(f"config.json does not give a valid moelab config: {e}") from None


def _rope_theta_from_hf(hf: dict) -> float:
    """rope_theta from 5.x `rope_parameters` or 4.x top-level `rope_theta`; only plain RoPE is accepted."""
    default = ModelConfig.rope_theta
    for key in ("rope_parameters", "rope_scaling"):
        rope = hf.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
            raise MoelabError(f"config.json sets {key}={rope}; moelab's OLMoE supports only plain RoPE")
        if rope.get("rope_theta") is not None:
            return float(rope["rope_theta"])
    return float(hf.get("rope_theta") or default)


def config_to_hf(config: Config, dtype: torch.dtype) -> dict:
    """The config.json of a transformers OlmoeForCausalLM (read by both 4.x and 5.x)."""
    check_exportable(config)
    cfg = config.model
    dtype_name = str(dtype).removeprefix("torch.")
    hf = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe"}
    hf.update({theirs: getattr(cfg, ours) for ours, theirs in CONFIG_FIELDS})
    hf.update(
        num_key_value_heads=cfg.n_heads,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        clip_qkv=None,
        bos_token_id=None,
        tie_word_embeddings=False,
        use_cache=True,
        output_router_logits=False,
        router_aux_loss_coef=config.moe.load_balance_coef,
        rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},  # 5.x
        rope_theta=cfg.rope_theta,  # 4.x
        rope_scaling=None,
        dtype=dtype_name,  # 5.x
        torch_dtype=dtype_name,  # 4.x
    )
    return hf


def check_exportable(config: Config) -> None:
    """Refuse configs transformers' OLMoE cannot represent (the checks that need no weights)."""
    cfg = config.model
    if cfg.arch != "olmoe":
        raise MoelabError(
            f"model.arch={cfg.arch!r}: only the built-in olmoe architecture converts to transformers"
        )
    if cfg.n_shared_experts > 0:
        raise MoelabError(
            f"model.n_shared_experts={cfg.n_shared_experts}: transformers' OLMoE has no shared experts, "
            f"so this model cannot be converted"
        )
    if cfg.n_dense_layers > 0:
        raise MoelabError(
            f"model.n_dense_layers={cfg.n_dense_layers}: transformers' OLMoE has no dense layers "
            f"(every layer is MoE), so this model cannot be converted"
        )
    if not cfg.qk_norm:
        raise MoelabError("model.qk_norm=false: transformers' OLMoE always applies q/k norms; cannot convert")
    if cfg.expert_widths and len(set(int(r * cfg.d_expert) for r in cfg.expert_widths)) > 1:
        raise MoelabError(
            f"model.expert_widths={cfg.expert_widths}: transformers' OLMoE has experts of one width only, "
            f"so this model cannot be converted"
        )
    if config.moe.expert_output_norm != "none":
        raise MoelabError(
            f"moe.expert_output_norm={config.moe.expert_output_norm}: transformers' OLMoE has no per-expert "
            f"output norm, so this model cannot be converted"
        )


def _check_no_balance_bias(state: dict[str, torch.Tensor], n_layers: int) -> None:
    names = [BALANCE_BIAS.format(i=i) for i in range(n_layers)]
    biased = torch.stack([state[n].float() for n in names]).ne(0).any(dim=-1)  # (L,)
    if biased.any():
        first = names[int(biased.nonzero()[0])]
        raise MoelabError(
            f"{first} is non-zero (loss-free balancing): transformers' OLMoE selects experts without a "
            f"bias, so it would route differently; pass --drop-balance-bias to export without it (it "
            f"reports how many tokens' experts change), or export a model trained with moe.lflb=false"
        )


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


# ----------------------------------------------------------------------------- state dicts


def per_expert_to_fused(state: dict[str, torch.Tensor], n_layers: int, n_experts: int) -> None:
    """In place: 4.x per-expert keys -> 5.x fused keys (sources are removed as each layer is fused)."""
    for i in range(n_layers):
        p = _expert_prefix(i)
        gate = torch.stack([_take(state, f"{p}.{e}.gate_proj.weight") for e in range(n_experts)])  # (E, I, D)
        up = torch.stack([_take(state, f"{p}.{e}.up_proj.weight") for e in range(n_experts)])  # (E, I, D)
        state[f"{p}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2I, D)
        state[f"{p}.down_proj"] = torch.stack(
            [_take(state, f"{p}.{e}.down_proj.weight") for e in range(n_experts)]
        )  # (E, D, I)


def fused_to_per_expert(state: dict[str, torch.Tensor], n_layers: int) -> None:
    """In place: 5.x fused keys -> 4.x per-expert keys. Each expert gets its own storage (safetensors
    refuses tensors that share memory)."""
    for i in range(n_layers):
        p = _expert_prefix(i)
        gate, up = _take(state, f"{p}.gate_up_proj").chunk(2, dim=1)  # (E, I, D) each
        down = _take(state, f"{p}.down_proj")  # (E, D, I)
        for e in range(gate.shape[0]):
            state[f"{p}.{e}.gate_proj.weight"] = gate[e].clone()
            state[f"{p}.{e}.up_proj.weight"] = up[e].clone()
            state[f"{p}.{e}.down_proj.weight"] = down[e].clone()


def _take(state: dict, key: str) -> torch.Tensor:
    try:
        return state.pop(key)
    except KeyError:
        raise MoelabError(f"weight {key} is missing; the folder does not match its config.json") from None


def hf_layout(keys) -> str:
    """'fused' or 'per-expert', detected from the weight names."""
    keys = list(keys)
    fused = any(k.endswith(".mlp.experts.gate_up_proj") for k in keys)
    per_expert = any(re.search(r"\.mlp\.experts\.\d+\.", k) for k in keys)
    if fused and per_expert:
        raise MoelabError(
            "the weights mix fused (5.x) and per-expert (4.x) expert tensors; re-save the folder"
        )
    if not (fused or per_expert):
        raise MoelabError("no OLMoE expert weights (mlp.experts.*) found; is this an OLMoE checkpoint?")
    return "fused" if fused else "per-expert"


def from_hf_state_dict(
    state: dict[str, torch.Tensor], config: Config, consume: bool = False
) -> dict[str, torch.Tensor]:
    """transformers OLMoE weights (either layout) -> moelab state dict, dtypes kept.

    consume=True pops the entries of `state` as they are converted, so a big model is not held twice.
    """
    cfg = config.model
    state = state if consume else dict(state)
    if hf_layout(state) == "per-expert":
        per_expert_to_fused(state, cfg.n_layers, cfg.n_experts)
    out = {}
    for ours, theirs, transpose in param_names(cfg.n_layers):
        t = _take(state, theirs)
        out[ours] = t.transpose(-1, -2).contiguous() if transpose else t
    for i in range(cfg.n_layers):
        out[BALANCE_BIAS.format(i=i)] = torch.zeros(cfg.n_experts)  # fp32, as the model builds it
    extra = sorted(k for k in state if not _IGNORED_HF.search(k))
    if extra:
        raise MoelabError(
            f"weight {extra[0]} ({len(extra)} unexpected in all) has no place in moelab's OLMoE; "
            f"the folder does not match its config.json"
        )
    return out


def to_hf_state_dict(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    config: Config | None = None,
    layout: str = "fused",
    consume: bool = False,
    drop_balance_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """moelab OLMoE weights -> transformers names in `layout`, contiguous, dtypes kept.

    Refuses (MoelabError) what transformers' OLMoE cannot represent, a non-zero loss-free balancing
    bias included unless drop_balance_bias (the export then routes without it: see
    `balance_bias_effect`). consume=True pops the entries of a given state dict as they are converted.
    """
    if layout not in LAYOUTS:
        raise MoelabError(f"layout={layout!r} is unknown; choose one of {', '.join(LAYOUTS)}")
    if isinstance(model_or_state, nn.Module):
        config = config or model_or_state.config
        state, consume = {k: v.detach() for k, v in model_or_state.state_dict().items()}, True
    else:
        state = model_or_state if consume else dict(model_or_state)
    if config is None:
        raise MoelabError("to_hf_state_dict needs the config of a bare state dict")
    check_exportable(config)
    n_layers = config.model.n_layers
    names = param_names(n_layers)
    expected = {ours for ours, _, _ in names} | {BALANCE_BIAS.format(i=i) for i in range(n_layers)}
    missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or extra:
        what = (
            f"lacks {missing[0]}"
            if missing
            else f"has {extra[0]}, which transformers' OLMoE has no place for"
        )
        raise MoelabError(f"the checkpoint {what}; it does not match an OLMoE config")
    if not drop_balance_bias:
        _check_no_balance_bias(state, n_layers)
    out = {}
    for ours, theirs, transpose in names:
        t = state.pop(ours)
        out[theirs] = (t.transpose(-1, -2) if transpose else t).contiguous()
    if layout == "per-expert":
        fused_to_per_expert(out, n_layers)
    return out


# ----------------------------------------------------------------------------- folders


def refuse_hf_folder(path: str | Path, command: str) -> None:
    """Point a transformers folder given where a moelab checkpoint is needed to `convert from-hf`
    (`moelab trace` reads such folders as they are; the other commands need a moelab checkpoint)."""
    path = Path(path)
    if (path / HF_CONFIG).is_file() and not (path / CONFIG).is_file():
        raise MoelabError(
            f"{path} is a transformers folder, not a moelab checkpoint; {command} needs one: convert it with "
            f"`moelab convert from-hf {path} --out CKPT_DIR` (`moelab trace` reads the folder as it is)"
        )


def load_hf_olmoe(hf_dir: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Read a transformers OLMoE folder: its moelab Config and the weights under moelab names."""
    hf_dir = Path(hf_dir)
    hf = _read_hf_config(hf_dir)
    config = config_from_hf(hf)
    state = _read_hf_weights(hf_dir)
    if (
        hf.get("tie_word_embeddings")
        and "lm_head.weight" not in state
        and "model.embed_tokens.weight" in state
    ):
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # moelab's lm_head is untied
    return config, from_hf_state_dict(state, config, consume=True)


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


def _read_hf_config(hf_dir: Path) -> dict:
    if not hf_dir.is_dir():
        raise MoelabError(
            f"{hf_dir} does not exist; pass a transformers OLMoE folder (config.json + weights)"
        )
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise MoelabError(f"{hf_dir} has no {HF_CONFIG}; pass a transformers OLMoE folder")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoelabError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise MoelabError(f"{path} must hold a JSON object")
    return hf


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards model.safetensors.index.json lists."""
    if (hf_dir / HF_WEIGHTS).is_file():
        files = [hf_dir / HF_WEIGHTS]
    elif (hf_dir / HF_INDEX).is_file():
        try:
            weight_map = json.loads((hf_dir / HF_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MoelabError(f"{hf_dir / HF_INDEX} is not a valid index (no weight_map)") from None
        files = [hf_dir / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise MoelabError(
                f"{hf_dir} lacks shard {absent[0]} listed in {HF_INDEX}; the download is incomplete"
            )
    else:
        raise MoelabError(
            f"{hf_dir} has neither {HF_WEIGHTS} nor {HF_INDEX}; only safetensors weights convert"
        )
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                    state[key] = fh.get_tensor(key)
        except MoelabError:
            raise
        except Exception as e:  # safetensors raises several types for corrupt files
            raise MoelabError(f"{f} could not be read ({e}); the file is corrupt") from None
    return state
