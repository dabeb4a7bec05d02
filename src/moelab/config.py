"""Typed configuration: dataclasses, YAML loading, `--set a.b=c` overrides, validation.

A config file is YAML with one section per dataclass below (`model`, `moe`, ...). Every value is
checked against its field's type; unknown keys are refused with a did-you-mean; `validate()` checks
relations between fields.

The `model:` section belongs to the architecture: `model.arch` is resolved first, then the section is
parsed against that architecture's own config dataclass (a subclass of `ModelConfig` declared in its
model file as `Model.config_class`), so a new field lives next to the code that uses it. Errors are
`ConfigError`s whose message names the field, the bad value and what is allowed, so the CLI can print
them as one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from moelab.errors import ConfigError


@dataclass
class ModelConfig:
    """Architecture of the transformer. Defaults are OLMoE-1B-7B-0924."""

    arch: str = "olmoe"  # a registered architecture name (moelab.models) or a path to a model .py file
    vocab_size: int = 50304  # embedding rows (tokenizer vocab padded up)
    d_model: int = 2048  # residual stream width
    n_layers: int = 16  # MoE layers (after the dense ones)
    n_dense_layers: int = 0  # dense SwiGLU layers placed first
    d_dense: int = 0  # hidden width of the dense layers' MLP
    n_heads: int = 16  # attention heads (no GQA); head dim = d_model / n_heads
    d_expert: int = 1024  # hidden width of one routed (and one shared) expert
    n_experts: int = 64  # routed experts per MoE layer
    top_k: int = 8  # routed experts per token
    n_shared_experts: int = 0  # experts applied to every token, weight 1
    norm_topk_prob: bool = False  # renormalise the k mixing weights to sum to 1
    qk_norm: bool = True  # RMSNorm over the full q/k projections, before the head split
    rope_theta: float = 10000.0  # rotary embedding base
    rms_norm_eps: float = 1e-5  # epsilon of every RMSNorm
    max_seq_len: int = 4096  # longest sequence (bounds generation)
    pad_token_id: int = 1  # its embedding row is zero at init
    eos_token_id: int = 50279  # ends generation
    init_std: float = 0.02  # std of the normal init of every matrix
    init: Literal["normal", "truncated_normal"] = "normal"  # truncated at ±3 std
    attention: Literal["sdpa", "eager"] = "sdpa"  # eager is the readable reference
    expert_widths: list[float] = field(default_factory=list)  # mixed widths: int(r·d_expert) per equal group

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_total_layers(self) -> int:
        return self.n_dense_layers + self.n_layers

    def validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "d_expert", "n_experts", "top_k")
        _positive(self, "max_seq_len", "rope_theta", "rms_norm_eps", "init_std")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"choose n_heads among the divisors of d_model"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.d_model/n_heads={self.head_dim} must be even for rotary embeddings")
        if self.top_k > self.n_experts:
            raise ConfigError(
                f"model.top_k={self.top_k} is larger than model.n_experts={self.n_experts}; "
                f"top_k must be between 1 and n_experts"
            )
        if self.n_dense_layers < 0 or self.n_shared_experts < 0:
            raise ConfigError("model.n_dense_layers and model.n_shared_experts must be >= 0")
        if self.n_dense_layers > 0 and self.d_dense <= 0:
            raise ConfigError(
                f"model.n_dense_layers={self.n_dense_layers} needs model.d_dense > 0 (got {self.d_dense})"
            )
        for name in ("pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"model.{name}={value} is outside the vocabulary [0, {self.vocab_size})")
        if self.expert_widths:
            widths = self.expert_widths
            if self.n_experts % len(widths):
                raise ConfigError(
                    f"model.expert_widths has {len(widths)} groups but model.n_experts={self.n_experts} "
                    f"does not split into {len(widths)} equal groups; give a divisor of n_experts entries"
                )
            bad = [r for r in widths if not (math.isfinite(r) and int(r * self.d_expert) >= 1)]
            if bad:
                raise ConfigError(
                    f"model.expert_widths entry {bad[0]} gives hidden width int({bad[0]}*{self.d_expert}) "
                    f"< 1; widths are positive fractions of model.d_expert"
                )


@dataclass
class MoEConfig:
    """Routing, dispatch and balancing: shared by every architecture."""

    dispatch: Literal["loop", "sorted", "grouped"] = "grouped"  # grouped falls back to sorted where unusable
    load_balance: Literal["per_layer", "hf_concat", "none"] = "per_layer"  # convention (moe/losses.py)
    load_balance_coef: float = 0.01  # weight of the load-balancing loss
    z_loss_coef: float = 0.001  # weight of the router z-loss
    lflb: bool = False  # loss-free balancing: a per-expert bias on the selection scores
    lflb_rate: float = 0.001  # the bias moves by ±rate per optimizer step
    lflb_bias_on: Literal["scores", "logits"] = "scores"  # softmax scores, or pre-softmax logits
    lflb_bias_clamp: float = 1.0  # |bias| bound, applied only with lflb_bias_on=logits
    router_orthogonality_coef: float = 0.0  # >0: losses["router_orthogonality"], ‖ŴŴᵀ − I‖_F / (E·√D)
    topk_gap_coef: float = 0.0  # >0: losses["topk_gap"], −log(min(p_(k) − p_(k+1), cap) + 1e-8)
    topk_gap_cap: float = 0.1  # the gap counts up to this value (larger gaps earn nothing more)
    router_init: Literal["normal", "orthogonal"] = "normal"  # orthogonal: nn.init.orthogonal_ on routers
    expert_output_orthogonality_coef: float = 0.0  # >0: losses["expert_output_orthogonality"], ‖C − I‖_F / k
    expert_output_norm: Literal["none", "learned", "frozen"] = "none"  # RMSNorm of each expert's output
    expert_size_penalty: float = 0.0  # >0: losses["expert_size"], Σ_e p_e · I_e / d_expert per token
    # global_batch: the load-balance fractions f count the tokens of the whole optimizer step (every
    # micro-batch of every rank; detached; P stays the micro-batch's), so N ranks give one process's loss
    load_balance_scope: Literal["micro_batch", "global_batch"] = "micro_batch"  # f: micro-batch or step

    def validate(self) -> None:
        names = ("load_balance_coef", "z_loss_coef", "lflb_rate", "lflb_bias_clamp")
        regularisers = ("router_orthogonality_coef", "topk_gap_coef", "expert_output_orthogonality_coef")
        for name in (*names, *regularisers, "expert_size_penalty"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):  # written so that NaN fails too
                raise ConfigError(f"moe.{name}={value} must be a finite number >= 0")
        if not (self.topk_gap_cap > 0 and math.isfinite(self.topk_gap_cap)):
            raise ConfigError(f"moe.topk_gap_cap={self.topk_gap_cap} must be a finite number > 0")


@dataclass
class DataConfig:
    """Where training batches come from: a directory written by `moelab data tokenize`."""

    path: str = "data/tokens"  # relative paths are taken from the working directory
    seq_len: int = 4096  # tokens per training sequence
    train_split: str = "train"  # split name in the tokenized directory
    val_split: str = "val"  # skipped (with a warning) when the data has no such split

    def validate(self) -> None:
        _positive(self, "seq_len")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing of `moelab train`."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch over all ranks (each rank takes batch_size / world size)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 4e-4  # peak learning rate
    min_lr: float = 4e-5  # end of the cosine decay, held afterwards
    warmup_steps: int = 100  # linear warmup from 0
    decay_steps: int = 0  # cosine decay length after warmup (0 = until the last step), then hold min_lr
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    eps: float = 1e-8  # AdamW
    weight_decay: float = 0.1  # AdamW, on matrices only
    no_decay: list[str] = field(default_factory=lambda: ["norm", "embed"])  # name parts without decay
    clip_experts: float = 1.0  # gradient-norm clip of routed-expert parameters (0 = off)
    clip_rest: float = 1.0  # gradient-norm clip of everything else, shared experts included (0 = off)
    load_balance_decay_steps: int = 0  # >0: moe.load_balance_coef decays linearly to 0 over these steps
    seed: int = 0  # one seed: init, data order, sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (costs 20-30 s to start)
    activation_checkpointing: bool = False  # recompute block activations in backward
    loss_chunk_tokens: int = 0  # >0: training ce through lm_head this many tokens at a time (no full logits)
    log_every: int = 1  # steps between metrics.jsonl lines
    eval_every: int = 200  # steps between validations (0 = only at the end)
    eval_batches: int = 20  # validation batches (0 = the whole validation split)
    save_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_last: int = 3  # checkpoints kept (the newest ones)
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    tensorboard: bool = False  # also log to RUN_DIR/tensorboard (pip install moelab[logging])
    wandb: bool = False  # also log to W&B (WANDB_MODE=offline works without network)
    wandb_project: str = "moelab"  # W&B project name

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "lr", "keep_last", "max_nonfinite", "log_every")
        _positive(self, "eps")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("weight_decay", "clip_experts", "clip_rest"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0 (0 = off)")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} must be between 0 and train.lr={self.lr}")
        for name in ("warmup_steps", "decay_steps", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0 = off)")


@dataclass
class ParallelConfig:
    """Where the model runs beyond one device (docs/SCALING.md): expert placement in one process, and
    data / expert parallelism across the ranks of a torchrun job."""

    data_parallel: Literal["ddp", "fsdp"] = "ddp"  # non-expert weights: ddp replicas, or fsdp (FSDP2) shards
    ep: int = 1  # expert-parallel degree: routed experts split across groups of ep ranks
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    expert_devices: list[str] = field(default_factory=list)  # expert e on entry e mod len ([] = off)

    def validate(self) -> None:
        if self.ep < 1:
            raise ConfigError(f"parallel.ep={self.ep} must be >= 1")
        if self.expert_devices:
            from moelab.moe.placement import parse_devices

            parse_devices(self.expert_devices)  # one-line ConfigError for a bad entry
            if self.ep > 1:
                raise ConfigError("parallel.expert_devices (one process) cannot be used with parallel.ep > 1")


@dataclass
class Config:
    """A whole experiment: one section per dataclass above."""

    model: ModelConfig = field(default_factory=lambda: default_model_config())  # the arch's own subclass
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> Config:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.moe.topk_gap_coef > 0 and self.model.top_k >= self.model.n_experts:
            raise ConfigError(
                f"moe.topk_gap_coef > 0 needs model.top_k < model.n_experts (the gap p_(k) − p_(k+1)); "
                f"got top_k={self.model.top_k}, n_experts={self.model.n_experts}"
            )
        if self.model.n_experts % self.parallel.ep:
            raise ConfigError(
                f"parallel.ep={self.parallel.ep} must divide model.n_experts={self.model.n_experts} "
                f"(each expert-parallel rank holds n_experts / ep whole experts)"
            )
        return self


def default_model_config() -> ModelConfig:
    """The `model:` section of the default architecture (olmoe), imported late: models import this module."""
    from moelab.models import config_class

    return config_class(ModelConfig.arch)()


# ----------------------------------------------------------------------------- loading


def load_config(
    source: str | Path | dict | Config | None = None, overrides: list[str] = (), base_dir: Path | None = None
) -> Config:
    """Config from a YAML path, a dict or a Config, with `a.b=c` overrides applied, validated.

    A `model.arch` that is a relative path to a model file is found from `base_dir` (default: the
    config file's directory).
    """
    if isinstance(source, Config):
        data = to_dict(source)
    elif isinstance(source, dict):
        data = source
    elif source is None:
        data = {}
    else:
        path = Path(source)
        data = read_yaml(path)
        if base_dir is None:
            base_dir = path if path.is_dir() else path.parent
    data = apply_overrides(data, overrides)
    return config_from_dict(data, base_dir).validate()


def config_from_dict(data: dict, base_dir: Path | None = None) -> Config:
    """Build a Config; the `model:` section is parsed against its architecture's own dataclass."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, got {data!r}")
    data = dict(data)
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a mapping, got {model!r}")
    arch = model.get("arch", ModelConfig.arch)
    if not isinstance(arch, str):
        raise ConfigError(f"model.arch={arch!r} must be an architecture name or a path to a model .py file")
    from moelab.models import config_class  # the registry imports this module: import it late

    config = from_dict(Config, data)
    config.model = from_dict(config_class(arch, base_dir), model, "model.")
    return config


def read_yaml(path: Path) -> dict:
    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:  # an empty file would silently mean every default: the 6.9B OLMoE-1B-7B
        raise ConfigError(
            f"{path} is empty; write its sections (model:, data:, train:, ...), or `{{}}` to take "
            "every default (OLMoE-1B-7B) on purpose"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, moe:, ...)")
    return data


def save_config(config: Config, path: Path) -> None:
    from moelab.io import atomic_file

    with atomic_file(path) as fh:
        fh.write(yaml.safe_dump(to_dict(config), sort_keys=False))


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings to a nested dict (values are typed later, by from_dict)."""
    data = _deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.top_k=2)")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # an empty YAML section (`train:`) reads as None
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_scalar(value.strip())
    return data


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    return data


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a dict, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, f"{name}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}={value!r} has the wrong type")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={value!r} must be a list")
        return origin(_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r} must be a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r} must be a string")
    return value


def _positive(section: Any, *names: str) -> None:
    prefix = next((n for cls, n in SECTION_NAMES.items() if isinstance(section, cls)), type(section).__name__)
    for name in names:
        value = getattr(section, name)
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{prefix}.{name}={value!r} must be a finite number > 0")


SECTION_NAMES = {
    ModelConfig: "model",
    MoEConfig: "moe",
    DataConfig: "data",
    TrainConfig: "train",
    ParallelConfig: "parallel",
}


def reference_markdown() -> str:
    """The config reference (docs/TRAINING.md): every field with its type, default and comment, then
    each built-in architecture's own `model:` fields.

    Read from the dataclasses' own source, so the docs cannot drift (a test compares them).
    """
    from moelab.models import ARCHITECTURES, config_class

    lines = []
    for cls, section in SECTION_NAMES.items():
        lines += [f"### `{section}`", "", (cls.__doc__ or "").strip(), ""]
        lines += _field_table(cls, section, dataclasses.fields(cls))
    for arch in ARCHITECTURES:
        cls = config_class(arch)
        base = {f.name for f in dataclasses.fields(ModelConfig)}
        own = [f for f in dataclasses.fields(cls) if f.name not in base]
        lines += [f"### `model` fields of `arch: {arch}`", "", (cls.__doc__ or "").strip(), ""]
        lines += _field_table(cls, "model", own) if own else []
    return "\n".join(lines)


def _field_table(cls: type, section: str, fields) -> list[str]:
    import inspect
    import re

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    comments = {}
    for src_line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", src_line)
        if m:
            comments[m.group(1)] = (m.group(2) or "").strip()
    hints = typing.get_type_hints(cls)
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        tp = hints[f.name]
        tp_name = " \\| ".join(map(str, typing.get_args(tp))) if typing.get_origin(tp) is Literal else tp
        tp_name = getattr(tp_name, "__name__", str(tp_name)).replace("typing.", "")
        lines.append(f"| `{section}.{f.name}` | {tp_name} | `{default}` | {comments.get(f.name, '')} |")
    lines.append("")
    return lines
