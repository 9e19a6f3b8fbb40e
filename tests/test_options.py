"""Tests for adapters.options (--set parsing, typed strategy options) and TOML run settings."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import adapters
from adapters.options import build_config, describe_options, parse_assignments, read_toml
from adapters.resolver import resolve
from adapters.runspec import RunSpec as TrainSettings
from adapters.runspec import spec_from as settings_from

STRATEGIES = ("lora", "qlora", "prefix-tuning", "linear-probe", "full-finetune")


def lora_options() -> type:
    return adapters.get_strategy("lora").config_class


def prefix_options() -> type:
    return adapters.get_strategy("prefix-tuning").config_class


@dataclass
class Assorted:
    """Every kind of field the converter handles, beyond what the built-ins use."""

    name: str = "x"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[float, ...] = (0.5,)
    limit: int | None = None
    scale: float | None = None
    either: int | str = 0


@dataclass
class Checked:
    r: int = 4

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be positive, got {self.r}")


# -------------------------------------------------------------------------------- parse_assignments


def test_parse_assignments():
    parsed = parse_assignments(["r=8", " alpha = 16 ", "target_modules=q_proj,v_proj", "expr=a=b", "empty="])
    assert parsed == {"r": "8", "alpha": "16", "target_modules": "q_proj,v_proj", "expr": "a=b", "empty": ""}
    assert parse_assignments([]) == {}
    assert parse_assignments(("r=1", "r=2")) == {"r": "2"}  # the last one wins, as on a command line


@pytest.mark.parametrize("pair", ["r", "=8", "  =8", "", "r8"])
def test_parse_assignments_rejects_what_is_not_key_value(pair):
    with pytest.raises(adapters.AdaptersError, match=r"is not key=value.*--set r=8") as err:
        parse_assignments(["alpha=1", pair])
    assert repr(pair) in str(err.value)


# ------------------------------------------------------------------------------------- build_config


def test_build_config_defaults():
    for name in STRATEGIES:
        cls = adapters.get_strategy(name).config_class
        assert build_config(cls, {}, name) == cls()


@pytest.mark.parametrize("given, expected", [
    ({"r": "8"}, 8), ({"r": 8}, 8), ({"r": 8.0}, 8), ({"r": " 8"}, 8), ({"r": "+12"}, 12),
])
def test_int_options(given, expected):
    config = build_config(lora_options(), given, "lora")
    assert config.r == expected and type(config.r) is int


@pytest.mark.parametrize("value", ["eight", "8.0", "8.5", 8.5, True, "", None, [8]])
def test_int_option_rejects(value):
    with pytest.raises(adapters.AdaptersError, match=r"option 'r' takes"):
        build_config(lora_options(), {"r": value}, "lora")


@pytest.mark.parametrize("given, expected", [("0.1", 0.1), (0.25, 0.25), (0, 0.0), ("1e-2", 0.01), (" 0.5 ", 0.5)])
def test_float_options(given, expected):
    config = build_config(lora_options(), {"dropout": given}, "lora")
    assert config.dropout == expected and type(config.dropout) is float


@pytest.mark.parametrize("value", ["a lot", False, "", [0.1]])
def test_float_option_rejects(value):
    with pytest.raises(adapters.AdaptersError, match=r"option 'dropout' takes"):
        build_config(lora_options(), {"dropout": value}, "lora")


@pytest.mark.parametrize("value, expected", [
    ("true", True), ("TRUE", True), ("yes", True), ("1", True), ("on", True), (True, True),
    ("false", False), ("No", False), ("0", False), ("off", False), (False, False),
])
def test_bool_options(value, expected):
    config = build_config(prefix_options(), {"projection": value}, "prefix-tuning")
    assert config.projection is expected


@pytest.mark.parametrize("value", ["maybe", "", 1, 0, "2", None])
def test_bool_option_rejects(value):
    with pytest.raises(adapters.AdaptersError, match=r"option 'projection' takes true or false"):
        build_config(prefix_options(), {"projection": value}, "prefix-tuning")


@pytest.mark.parametrize("value, expected", [
    ("all-linear", "all-linear"),
    ("q_proj,v_proj", "q_proj,v_proj"),  # kept as written; the strategy splits it
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),  # a TOML list
    (("k_proj",), ["k_proj"]),
    ([" o_proj "], ["o_proj"]),
])
def test_str_or_list_option(value, expected):
    config = build_config(lora_options(), {"target_modules": value}, "lora")
    assert config.target_modules == expected and type(config.target_modules) is type(expected)


@pytest.mark.parametrize("value", [5, [1, 2], ["q_proj", 3], {"a": 1}, True])
def test_str_or_list_option_rejects(value):
    with pytest.raises(adapters.AdaptersError, match=r"option 'target_modules' takes"):
        build_config(lora_options(), {"target_modules": value}, "lora")


@pytest.mark.parametrize("form", ["string", "list"])
def test_target_modules_in_both_forms_reach_the_model(form):
    from peft.tuners.lora import LoraLayer

    value = "q_proj, v_proj" if form == "string" else ["q_proj", "v_proj"]
    strategy = adapters.get_strategy("lora")
    config = build_config(strategy.config_class, {"target_modules": value, "r": "2"}, "lora")
    base = adapters.load_base_model("random:tiny")
    model = strategy.apply(base.model, config)
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == {"q_proj", "v_proj"}
    assert all(m.r["default"] == 2 for m in model.modules() if isinstance(m, LoraLayer))


def test_other_field_kinds():
    config = build_config(Assorted, {"name": "abc", "sizes": "3, 4,5", "pair": "0.5,1", "limit": "7",
                                     "scale": "2.5", "either": "word"})
    assert config == Assorted(name="abc", sizes=[3, 4, 5], pair=(0.5, 1.0), limit=7, scale=2.5, either="word")
    assert build_config(Assorted, {"either": "12"}).either == 12  # the union's first type that fits
    assert build_config(Assorted, {"sizes": [6, 7]}).sizes == [6, 7]
    for none in ("none", "None", "null", None):
        assert build_config(Assorted, {"limit": none, "scale": none}) == Assorted()


@pytest.mark.parametrize("key, value", [
    ("name", 5), ("name", ["a"]), ("sizes", "1,x"), ("sizes", 3), ("pair", "a,b"), ("limit", "lots"),
    ("scale", "big"), ("either", 1.5),
])
def test_other_field_kinds_reject_naming_the_key(key, value):
    with pytest.raises(adapters.AdaptersError, match=rf"option '{key}' takes"):
        build_config(Assorted, {key: value}, "assorted")


def test_unknown_option_names_it_the_strategy_and_the_options():
    with pytest.raises(adapters.AdaptersError) as err:
        build_config(lora_options(), {"rank": "8", "r": "4"}, "lora")
    message = str(err.value)
    assert "'rank'" in message and "'lora'" in message
    for f in dataclasses.fields(lora_options()):
        assert f.name in message

    probe = adapters.get_strategy("linear-probe").config_class
    with pytest.raises(adapters.AdaptersError, match=r"unknown option 'r' for strategy 'linear-probe'.*\(none\)"):
        build_config(probe, {"r": "8"}, "linear-probe")


@pytest.mark.parametrize("options", [{"r": "0"}, {"r": "-2"}, {"alpha": "0"}, {"dropout": "1.5"},
                                     {"dropout": "-0.1"}, {"dropout": "nan"}])
def test_lora_option_ranges_are_checked_when_options_are_built(options):
    key = next(iter(options))
    with pytest.raises(adapters.AdaptersError, match=rf"invalid options for strategy 'lora'.*\b{key}\b"):
        build_config(lora_options(), options, "lora")


def test_values_the_config_itself_rejects():
    assert build_config(Checked, {"r": "3"}, "checked").r == 3
    with pytest.raises(adapters.AdaptersError, match=r"invalid options for strategy 'checked': r must be positive"):
        build_config(Checked, {"r": "0"}, "checked")


# --------------------------------------------------------------------------------- describe_options


@pytest.mark.parametrize("name", STRATEGIES)
def test_describe_options_matches_each_strategys_config(name):
    cls = adapters.get_strategy(name).config_class
    rows = describe_options(cls)
    defaults = cls()
    assert [r["name"] for r in rows] == [f.name for f in dataclasses.fields(cls)]
    for row in rows:
        assert row["default"] == getattr(defaults, row["name"])
        assert isinstance(row["type"], str) and row["type"]
    json.dumps(rows)  # `adapters strategies --json` prints them


def test_describe_options_type_names():
    types = {r["name"]: r["type"] for r in describe_options(lora_options())}
    assert types["r"] == "int" and types["alpha"] == "int" and types["dropout"] == "float"
    assert "str" in types["target_modules"] and "list[str]" in types["target_modules"]
    assert {r["name"]: r["type"] for r in describe_options(prefix_options())}["projection"] == "bool"

    rows = {r["name"]: r for r in describe_options(Assorted)}
    assert rows["sizes"]["default"] == [1, 2]  # from the default_factory
    assert rows["sizes"]["type"] == "list[int]"
    assert "int" in rows["limit"]["type"] and "None" in rows["limit"]["type"]
    assert "float" in rows["scale"]["type"] and "typing." not in rows["scale"]["type"]


# ------------------------------------------------------------------------------ TOML: settings_from


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_settings_without_a_file():
    settings = settings_from(None, {"model": "random:tiny", "max_steps": 3}, {"r": "8"})
    assert settings == TrainSettings(model="random:tiny", max_steps=3, options={"r": "8"})


def test_settings_from_toml_with_hyphens_and_underscores(tmp_path):
    path = write(tmp_path, """
model = "random:tiny"
strategy = "qlora"
max-steps = 5
batch_size = 3
learning-rate = 0.001
gradient-checkpointing = true
seq_len = 64
output = "out/run1"

[options]
r = 4
target_modules = ["q_proj", "v_proj"]
dropout = 0.0
""")
    settings = settings_from(str(path), {}, {})
    expected = TrainSettings(model="random:tiny", strategy="qlora", max_steps=5, batch_size=3, learning_rate=0.001,
                             gradient_checkpointing=True, seq_len=64, output="out/run1",
                             options={"r": 4, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0})
    assert settings == expected
    assert type(settings.max_steps) is int and type(settings.learning_rate) is float
    assert settings.gradient_checkpointing is True


def test_toml_values_are_converted_to_the_setting_types(tmp_path):
    path = write(tmp_path, 'learning-rate = 1\nmax-steps = "7"\noverwrite = "yes"\n')
    settings = settings_from(str(path), {}, {})
    assert settings.learning_rate == 1.0 and type(settings.learning_rate) is float
    assert settings.max_steps == 7 and settings.overwrite is True


def test_command_line_beats_the_file(tmp_path):
    path = write(tmp_path, 'model = "random:tiny"\nmax-steps = 5\nseed = 3\n[options]\nr = 4\nalpha = 8\n')
    settings = settings_from(str(path), {"max_steps": 9, "seed": 0}, {"r": "16"})
    assert settings.max_steps == 9 and settings.seed == 0  # given, even when equal to the default
    assert settings.model == "random:tiny"  # only in the file
    assert settings.options == {"r": "16", "alpha": 8}


def test_file_options_reach_the_strategy_config(tmp_path):
    path = write(tmp_path, 'model = "random:tiny"\nstrategy = "lora"\n[options]\nr = 4\n'
                           'target_modules = ["q_proj", "v_proj"]\n')
    run = resolve(settings_from(str(path), {}, {"alpha": "12"}))
    assert run.config == lora_options()(r=4, alpha=12, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("text, key", [
    ("max-step = 5\n", "max-step"),
    ("lora_r = 8\n", "lora_r"),
    ("[model]\nname = 'x'\n", "model"),  # model is a known key, but takes a string
])
def test_unknown_or_misplaced_keys(text, key, tmp_path):
    path = write(tmp_path, text)
    with pytest.raises(adapters.AdaptersError) as err:
        settings_from(str(path), {}, {})
    assert f"'{key}'" in str(err.value)


def test_unknown_key_error_names_the_file_and_known_keys(tmp_path):
    path = write(tmp_path, "max-step = 5\n")
    with pytest.raises(adapters.AdaptersError) as err:
        settings_from(str(path), {}, {})
    message = str(err.value)
    assert str(path) in message
    assert "max-steps" in message and "learning-rate" in message and "[options]" in message


def test_options_must_be_a_table(tmp_path):
    path = write(tmp_path, "options = 3\n")
    with pytest.raises(adapters.AdaptersError, match=r"`options` must be a table") as err:
        settings_from(str(path), {}, {})
    assert str(path) in str(err.value)


@pytest.mark.parametrize("text", ["max-steps = \n", "model = 'unterminated\n", "[options\nr = 1\n",
                                  "seed = 1\nseed = 2\n"])
def test_bad_toml_names_the_file(text, tmp_path):
    path = write(tmp_path, text, "broken.toml")
    with pytest.raises(adapters.AdaptersError, match=r"not valid TOML") as err:
        settings_from(str(path), {}, {})
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(adapters.AdaptersError, match=r"file not found") as err:
        read_toml(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(err.value)


@pytest.mark.parametrize("text, key", [("max-steps = 'many'\n", "max-steps"), ("gradient-checkpointing = 2\n",
                                                                             "gradient-checkpointing")])
def test_toml_values_of_the_wrong_type(text, key, tmp_path):
    path = write(tmp_path, text)
    with pytest.raises(adapters.AdaptersError, match=rf"'{key}'"):
        settings_from(str(path), {}, {})


def test_toml_value_of_the_wrong_type_names_the_file(tmp_path):
    path = write(tmp_path, "max-steps = 'many'\n")
    with pytest.raises(adapters.AdaptersError, match="max-steps") as err:
        settings_from(str(path), {}, {})
    assert str(path) in str(err.value)
