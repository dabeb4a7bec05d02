"""Config loading, `--set` overrides, validation errors and the save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from moelab.config import Config, MoEConfig, load_config, save_config
from moelab.errors import ConfigError, MoelabError

ROOT = Path(__file__).resolve().parents[1]
OLMOE_YAML = ROOT / "configs" / "olmoe-1b-7b.yaml"


def test_olmoe_yaml_loads_every_value_of_the_file():
    cfg = load_config(OLMOE_YAML)
    raw = yaml.safe_load(OLMOE_YAML.read_text())
    # Every key written in the file arrives in the dataclass, with a value equal to the file's.
    for section, values in raw.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads) == (50304, 2048, 16, 16)
    assert (m.d_expert, m.n_experts, m.top_k, m.head_dim) == (1024, 64, 8, 128)
    assert isinstance(m.rms_norm_eps, float) and m.rms_norm_eps == 1e-5
    assert isinstance(m.rope_theta, float) and m.rope_theta == 10000.0
    assert cfg.moe.load_balance == "per_layer" and cfg.moe.lflb is False


def test_overrides_are_typed_by_the_field():
    cfg = load_config(
        OLMOE_YAML,
        [
            "model.top_k=2",
            "moe.lflb=true",
            "model.rms_norm_eps=1e-6",
            "moe.dispatch=loop",
            "moe.lflb_rate=0.01",
        ],
    )
    assert cfg.model.top_k == 2 and type(cfg.model.top_k) is int
    assert cfg.moe.lflb is True
    # YAML 1.1 reads "1e-6" as a string: the float field must still get a float.
    assert type(cfg.model.rms_norm_eps) is float and cfg.model.rms_norm_eps == 1e-6
    assert cfg.moe.dispatch == "loop"
    assert type(cfg.moe.lflb_rate) is float and cfg.moe.lflb_rate == 0.01
    # An int given to a float field becomes a float; other fields keep the file's values.
    cfg = load_config(OLMOE_YAML, ["model.rope_theta=500000"])
    assert type(cfg.model.rope_theta) is float and cfg.model.rope_theta == 500000.0
    assert cfg.model.d_model == 2048


def test_later_override_wins_and_none_source_gives_defaults():
    cfg = load_config(None, ["model.top_k=2", "model.top_k=3"])
    assert cfg.model.top_k == 3
    assert load_config(None) == Config()  # defaults are OLMoE-1B-7B and valid


def _error(overrides: list[str], source=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    assert isinstance(info.value, MoelabError)
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


def test_top_k_larger_than_n_experts_is_refused():
    message = _error(["model.n_experts=8", "model.top_k=9"])
    assert "model.top_k" in message and "9" in message and "n_experts" in message


def test_d_model_not_divisible_by_heads_is_refused():
    message = _error(["model.d_model=100", "model.n_heads=16"])
    assert "model.d_model" in message and "100" in message and "n_heads" in message and "16" in message


@pytest.mark.parametrize(
    ("override", "wrong", "suggestion"),
    [
        ("model.n_expert=4", "model.n_expert", "model.n_experts"),
        ("moe.lflb_rat=0.1", "moe.lflb_rat", "moe.lflb_rate"),
        ("modle.top_k=2", "modle", "model"),
    ],
)
def test_unknown_key_suggests_the_closest(override, wrong, suggestion):
    message = _error([override])
    assert wrong in message
    assert f"did you mean {suggestion}?" in message


def test_unknown_key_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_modle: 64\n")
    message = _error([], path)
    assert "model.d_modle" in message and "model.d_model" in message


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("moe.dispatch=fast", "moe.dispatch", "fast"),
        ("model.attention=flash", "model.attention", "flash"),
        ("moe.load_balance=global", "moe.load_balance", "global"),
    ],
)
def test_literal_outside_its_choices_is_refused(override, field, value):
    message = _error([override])
    assert field in message and value in message
    assert "choose one of" in message


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("model.top_k=two", "model.top_k", "two"),
        ("model.top_k=2.5", "model.top_k", "2.5"),
        ("model.top_k=true", "model.top_k", "True"),  # a bool is not an int
        ("moe.lflb=maybe", "moe.lflb", "maybe"),
        ("model.rms_norm_eps=tiny", "model.rms_norm_eps", "tiny"),
        ("model.arch=[1, 2]", "model.arch", "[1, 2]"),
    ],
)
def test_bad_type_is_refused(override, field, value):
    message = _error([override])
    assert field in message and value in message


@pytest.mark.parametrize("override", ["model.top_k", "=3", "model.top_k.x=3"])
def test_malformed_override_is_refused(override):
    _error([override])


def test_non_positive_and_out_of_vocab_values_are_refused():
    assert "model.top_k" in _error(["model.top_k=0"])
    assert "model.pad_token_id" in _error(
        ["model.vocab_size=128", "model.eos_token_id=2", "model.pad_token_id=128"]
    )
    assert "moe.lflb_rate" in _error(["moe.lflb_rate=-1"])


def test_missing_or_invalid_files_are_config_errors(tmp_path):
    assert str(tmp_path / "nope.yaml") in _error([], tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert str(bad) in _error([], bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert str(listing) in _error([], listing)


def test_save_then_load_round_trips_every_field(tmp_path):
    cfg = load_config(
        OLMOE_YAML,
        [
            "model.vocab_size=128",
            "model.d_model=64",
            "model.n_heads=4",
            "model.rms_norm_eps=1e-6",
            "model.init=truncated_normal",
            "model.eos_token_id=2",
            "model.n_dense_layers=1",
            "model.d_dense=96",
            "moe.lflb=true",
            "moe.lflb_bias_on=logits",
            "moe.dispatch=sorted",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    # Field by field too, with types (dataclass equality would accept 1 == 1.0).
    for section in dataclasses.fields(cfg):
        before, after = getattr(cfg, section.name), getattr(again, section.name)
        for f in dataclasses.fields(before):
            a, b = getattr(after, f.name), getattr(before, f.name)
            assert a == b and type(a) is type(b), f"{section.name}.{f.name}"
    # A directory holding config.yaml is accepted as the source too.
    assert load_config(tmp_path) == cfg


def test_load_config_accepts_dict_and_config_sources():
    data = {"model": {"top_k": 4}, "moe": {"lflb": True}}
    cfg = load_config(data, ["moe.dispatch=loop"])
    assert cfg.model.top_k == 4 and cfg.moe.lflb is True and cfg.moe.dispatch == "loop"
    assert data == {"model": {"top_k": 4}, "moe": {"lflb": True}}  # the caller's dict is not modified
    again = load_config(cfg, ["model.top_k=2"])
    assert again.model.top_k == 2 and cfg.model.top_k == 4 and again.moe == cfg.moe
    assert isinstance(again.moe, MoEConfig)


# ----------------------------------------------------------------------------- architecture-owned configs

SHARED_ROUTER = str(ROOT / "tests" / "archs" / "shared_router.py")


def test_the_model_section_is_parsed_against_the_architectures_own_dataclass():
    cfg = load_config(None, [f"model.arch={SHARED_ROUTER}", "model.router_norm_coef=0.25", "model.top_k=2"])
    assert type(cfg.model).__name__ == "SharedRouterConfig"
    assert (
        cfg.model.router_norm_coef == 0.25 and cfg.model.top_k == 2 and cfg.model.shared_router_scale == 1.0
    )
    assert type(load_config(None).model).__name__ == "OLMoEConfig"
    assert type(Config().model).__name__ == "OLMoEConfig"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ([f"model.arch={SHARED_ROUTER}", "model.router_norm_cof=1"], "did you mean model.router_norm_coef?"),
        ([f"model.arch={SHARED_ROUTER}", "model.router_norm_coef=lots"], "model.router_norm_coef='lots'"),
        (
            [f"model.arch={SHARED_ROUTER}", "model.shared_router_scale=0"],
            "shared_router_scale=0.0 must be > 0",
        ),
        (["model.router_norm_coef=1"], "unknown config key model.router_norm_coef"),  # not an olmoe field
        (["model.arch=3"], "must be an architecture name or a path"),
        (["model.arch=nope"], "known architecture (olmoe, crosslayer, hierarchical) nor a model .py file"),
        (["model.expert_widths=[0.5, 1.0, 2.0]"], "does not split into 3 equal groups"),
        (["model.expert_widths=[0.5, 0.0]"], "entry 0.0 gives hidden width"),
    ],
)
def test_architecture_fields_keep_typed_checks_and_one_line_errors(overrides, message):
    assert message in _error(overrides)
    assert "\n" not in _error(overrides)


def test_a_model_file_without_model_class_or_with_a_broken_import_is_a_config_error(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert "defines no `Model` class" in _error([f"model.arch={tmp_path / 'empty.py'}"])
    (tmp_path / "broken.py").write_text("import not_a_module_anywhere\n")
    assert "failed to import" in _error([f"model.arch={tmp_path / 'broken.py'}"])


def test_a_relative_model_file_is_found_beside_the_config_and_saved_as_given(tmp_path):
    (tmp_path / "model.py").write_text(Path(SHARED_ROUTER).read_text())
    (tmp_path / "config.yaml").write_text("model:\n  arch: model.py\n  router_norm_coef: 0.5\n")
    cfg = load_config(tmp_path)  # a directory: its config.yaml, model.py resolved beside it
    assert cfg.model.router_norm_coef == 0.5 and cfg.model.arch == "model.py"
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg
