"""Routing capture for published transformers MoE models (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE).

The analysis tools read `RoutingInfo` lists; this module produces them for a transformers checkpoint
without editing the model: a forward hook on each sparse block's router (`mlp.gate`) records what it
returned during the real forward pass. In transformers 5.x every family's router returns
(router_logits, routing_weights, expert_ids) and the experts module is called with exactly those ids
and weights, so the recorded ids are the ones the model used. Where a router returns only logits
(transformers 4.x, whose `mlp.gate` is a Linear and the block does softmax/top-k itself), the
family's selection rule is applied to those logits: `select_experts`.

Family rules (transformers 5.24): softmax in fp32 over all E logits, top-k of the probabilities;
OLMoE and Qwen-MoE renormalise the k weights only when config.norm_topk_prob; Mixtral always does,
which equals a softmax over the k selected logits. Qwen2-MoE's shared expert (and its sigmoid
`shared_expert_gate`) is always on and is not a routed expert. Qwen-MoE layers listed in
mlp_only_layers, or off the decoder_sparse_step grid, are dense MLPs and have no routing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from moelab.checkpoint import CONFIG as MOELAB_CONFIG
from moelab.errors import MoelabError
from moelab.moe.routing import RoutingInfo

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
SUPPORTED = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _read_hf_config(path: Path) -> dict | None:
    try:
        return json.loads((path / HF_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def is_hf_moe_dir(path: str | Path) -> bool:
    """True for a transformers folder of a supported MoE family (and not a moelab checkpoint)."""
    path = Path(path)
    if not path.is_dir() or (path / MOELAB_CONFIG).exists():
        return False
    config = _read_hf_config(path)
    return isinstance(config, dict) and config.get("model_type") in SUPPORTED


def moe_layer_indices(config) -> list[int]:
    """Decoder layers that hold a sparse MoE block, from a transformers config (dense ones skipped)."""
    n = config.num_hidden_layers
    if config.model_type not in ("qwen2_moe", "qwen3_moe"):
        return list(range(n))
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    experts = getattr(config, "num_experts", 0) or 0
    return [i for i in range(n) if i not in dense and experts > 0 and (i + 1) % step == 0]


def renormalizes(config) -> bool:
    """Whether the family rescales the k selected weights to sum to 1 (Mixtral always does)."""
    return config.model_type == "mixtral" or bool(getattr(config, "norm_topk_prob", False))


def select_experts(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The family selection rule: fp32 softmax over E, top-k, optional renormalisation.

    router_logits: (T, E) -> topk_ids (T, k) long, topk_weights (T, k) fp32.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def routing_from_router_output(output, top_k: int, normalize: bool) -> RoutingInfo:
    """A RoutingInfo from what a router module returned: (logits, weights, ids) or logits alone."""
    if isinstance(output, tuple) and len(output) == 3:
        logits, weights, ids = output
        logits = logits.reshape(-1, logits.shape[-1]).float()  # (T, E)
        ids = ids.reshape(logits.shape[0], -1).long()  # (T, k)
        return RoutingInfo(logits, ids, weights.reshape(ids.shape))
    if isinstance(output, torch.Tensor):
        logits = output.reshape(-1, output.shape[-1]).float()  # (T, E)
        return RoutingInfo(logits, *select_experts(logits, top_k, normalize))
    raise MoelabError(
        f"unexpected router output {type(output).__name__}; this transformers version is not supported "
        "(pip install 'moelab[hf]')"
    )


def _sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks in forward order: modules holding both a `gate` router and `experts`."""
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "gate", None), nn.Module) and hasattr(m, "experts")
    ]


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise MoelabError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")


class HFMoE:
    """A transformers MoE causal LM in eval mode, with its routing captured on every forward pass.

    n_layers counts MoE layers only; `layer_indices[l]` is the decoder layer of MoE layer l.
    """

    def __init__(self, model: nn.Module, path: str | Path | None = None):
        self.model, self.config, self.path = model, model.config, path
        self.model_type: str = self.config.model_type
        self.layer_indices = moe_layer_indices(self.config)
        self.blocks = _sparse_blocks(model)  # each holds `gate` (the router) and `experts`
        self._routers = [block.gate for block in self.blocks]
        if len(self._routers) != len(self.layer_indices):
            raise MoelabError(
                f"{path}: found {len(self._routers)} sparse MoE blocks but the config describes "
                f"{len(self.layer_indices)}; this transformers version is not supported "
                "(pip install 'moelab[hf]')"
            )
        self.n_layers = len(self.layer_indices)
        self.n_experts = int(self.config.num_experts)
        self.top_k = int(self.config.num_experts_per_tok)
        self.vocab_size = int(self.config.vocab_size)
        self.normalize = renormalizes(self.config)

    @property
    def max_positions(self) -> int:
        """Positions the model supports (config.max_position_embeddings; 2048 when it gives none)."""
        return int(getattr(self.config, "max_position_embeddings", 2048) or 2048)

    @property
    def tokenizer_path(self) -> Path | None:
        """The folder's tokenizer.json, when it has one."""
        tok = Path(self.path) / "tokenizer.json" if self.path is not None else None
        return tok if tok is not None and tok.is_file() else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def route(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, with_logits: bool = True
    ) -> tuple[torch.Tensor | None, list[RoutingInfo]]:
        """Run the model once: logits (B, N, V) and one RoutingInfo (T = B·N rows) per MoE layer.

        attention_mask (B, N), 1 = real token: positions count real tokens only, so valid rows equal an
        unpadded run for right or left padding; rows of padded tokens are routed but meaningless.
        with_logits=False skips the LM head on all but the last position (logits is then None): traces
        of large-vocabulary models need only the routing.
        """
        input_ids = input_ids.to(self.device)
        kwargs = {"use_cache": False}
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            kwargs["attention_mask"] = attention_mask
            # positions count real tokens, as in an unpadded run (RoPE is shift-invariant only up to rounding)
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, N)
        if not with_logits:
            kwargs["logits_to_keep"] = 1
        outputs: list = [None] * self.n_layers
        hooks = [
            router.register_forward_hook(lambda _m, _inp, out, slot=slot: outputs.__setitem__(slot, out))
            for slot, router in enumerate(self._routers)
        ]
        try:
            logits = self.model(input_ids, **kwargs).logits
        finally:
            for hook in hooks:
                hook.remove()
        missing = [self.layer_indices[i] for i, out in enumerate(outputs) if out is None]
        if missing:
            raise MoelabError(f"{self.path}: the routers of layers {missing} did not run; unsupported model")
        routing = [routing_from_router_output(out, self.top_k, self.normalize) for out in outputs]
        for info, layer in zip(routing, self.layer_indices, strict=True):
            info.extra["layer_index"] = layer
        return (logits if with_logits else None), routing


def load_hf_moe(path: str | Path, device: str | torch.device = "cpu", dtype=None) -> HFMoE:
    """Load a local transformers MoE folder (no network) as an HFMoE, in eval mode on `device`.

    dtype: None or "auto" keeps the checkpoint's dtype; else a torch.dtype or "float32"/"bfloat16"/"float16".
    """
    path = Path(path)
    if not path.is_dir():
        raise MoelabError(f"{path} is not a directory; pass a transformers model folder with {HF_CONFIG}")
    config = _read_hf_config(path)
    if not isinstance(config, dict):
        raise MoelabError(f"{path / HF_CONFIG} is missing or not JSON; pass a transformers model folder")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise MoelabError(
            f"{path / HF_CONFIG} has model_type={model_type!r}; "
            f"supported MoE families: {', '.join(SUPPORTED)}"
        )
    torch_dtype = _resolve_dtype(dtype)
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MoelabError(f"reading {path} needs transformers: pip install 'moelab[hf]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoelabError(f"{path}: transformers could not load the model ({first})") from None
    model = model.to(device).eval()
    hf = HFMoE(model, path)
    log.info(
        "loaded %s from %s: %d MoE layers, %d experts, top-%d",
        model_type, path, hf.n_layers, hf.n_experts, hf.top_k,
    )  # fmt: skip
    return hf
