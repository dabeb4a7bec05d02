"""OLMoE <-> transformers: the one table of names, the config mapping, state dicts both ways, and
reading transformers folders (moelab.convert writes converted folders with them).

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
from torch import nn

from moelab.config import Config, DataConfig, ModelConfig, load_config
from moelab.errors import ConfigError, MoelabError

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
