"""The plugin host and the strategy registry: naming rules, conflicts, validation, third-party strategies."""
from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types

import adapters_peft_methods as peft_methods
import pluggy
import pytest
import torch

import adapters
import adapters.host.manager
from adapters.cli import main as cli_main

# --------------------------------------------------------------------------------------------
# Helpers: a minimal valid strategy, and a plugin object that registers given strategies.


@dataclasses.dataclass
class NoOptions:
    pass


class Minimal:
    """The smallest declaration that satisfies the contract; tests break one thing at a time."""

    description = "a test strategy"
    config_class = NoOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def __init__(self, name: str = "minimal-test") -> None:
        self.name = name

    def apply(self, model, config):
        return model


def plugin_registering(*strategies):
    """A plugin object whose register_strategies hook registers ``strategies``."""

    class Plugin:
        @adapters.hookimpl
        def register_strategies(self, register):
            for s in strategies:
                register(s)

    return Plugin()


def tokens(n: int = 12) -> torch.Tensor:
    return torch.arange(3, 3 + n).unsqueeze(0)


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=x).logits


# --------------------------------------------------------------------------------------------
# Names


@pytest.mark.parametrize("bad", ["My_Strategy", "my_strategy", "My-Strategy", "my--strategy", "my-strategy-",
                                 "-strategy", "2-strategy", "my strategy", ""])
def test_name_must_be_lowercase_words_joined_by_hyphens(register_plugin, bad):
    register_plugin(plugin_registering(Minimal(bad)), name="test_badname_plugin")
    with pytest.raises(adapters.AdaptersError) as info:
        adapters.get_registry()
    message = str(info.value)
    assert "test_badname_plugin" in message
    assert repr(bad) in message
    assert "lowercase words joined by hyphens" in message


@pytest.mark.parametrize("good", ["x", "my-strategy", "lora2", "a1-b2-c3"])
def test_valid_names_register(register_plugin, good):
    register_plugin(plugin_registering(Minimal(good)), name="test_goodname_plugin")
    registry = adapters.get_registry()
    assert good in registry.names()
    assert registry.entry(good).plugin == "test_goodname_plugin"


def test_a_builtin_name_stays_the_builtins_and_the_collision_names_both_plugins(register_plugin):
    register_plugin(plugin_registering(Minimal("lora")), name="test_dup_plugin")
    with pytest.warns(adapters.host.manager.PluginWarning) as caught:
        registry = adapters.get_registry()
    assert registry.entry("lora").plugin == "adapters_lora"  # the built-in wins
    message = str(caught[0].message)
    assert "'lora'" in message
    assert "adapters_lora" in message
    assert "test_dup_plugin" in message
    assert "the built-in wins" in message


class AnyQuantization(Minimal):
    supported_quantization = frozenset(adapters.QUANTIZATIONS)


def plugin_aliasing(strategy, aliases):
    class Plugin:
        @adapters.hookimpl
        def register_strategies(self, register):
            register(strategy, aliases=aliases)

    return Plugin()


def test_a_third_party_alias_is_the_strategy_with_its_own_default_quantization(register_plugin):
    strategy = AnyQuantization("norms-test")
    register_plugin(plugin_aliasing(strategy, {"norms-test-4bit": "nf4"}), name="test_alias_plugin")
    registry = adapters.get_registry()
    alias = registry.entry("norms-test-4bit")
    assert alias.plugin == "test_alias_plugin" and alias.alias_of == "norms-test"
    assert adapters.traits(alias.strategy).default_quantization == "nf4"
    assert adapters.traits(registry.get("norms-test")).default_quantization == "none"
    assert alias.strategy.apply.__self__ is strategy  # the same object under another name
    assert "norms-test-4bit" not in {e.strategy.name for e in registry.entries(aliases=False)}
    run = adapters.resolve(adapters.RunSpec(model="random:tiny", strategy="norms-test-4bit"), data=False)
    assert (run.strategy.name, run.quantization) == ("norms-test-4bit", "nf4")


def test_an_alias_must_name_a_supported_quantization(register_plugin):
    register_plugin(plugin_aliasing(Minimal("only-none"), {"only-none-4bit": "nf4"}), name="test_bad_alias")
    with pytest.raises(adapters.AdaptersError, match="test_bad_alias.*invalid alias 'only-none-4bit'"):
        adapters.get_registry()


def test_a_third_party_alias_that_collides_with_a_builtin_is_dropped_alone(register_plugin):
    register_plugin(plugin_aliasing(AnyQuantization("own-name"), {"qlora": "nf4", "own-name-8bit": "int8"}),
                    name="test_alias_collision")
    with pytest.warns(adapters.host.manager.PluginWarning, match="'qlora'.*the built-in wins"):
        registry = adapters.get_registry()
    assert registry.entry("qlora").plugin == "adapters_lora"
    assert registry.entry("own-name").plugin == registry.entry("own-name-8bit").plugin == "test_alias_collision"


def test_two_third_party_plugins_with_one_name_name_both(register_plugin):
    register_plugin(plugin_registering(Minimal("dup-name")), name="test_dup_plugin_a")
    register_plugin(plugin_registering(Minimal("dup-name")), name="test_dup_plugin_b")
    with pytest.raises(adapters.AdaptersError) as info:
        adapters.get_registry()
    message = str(info.value)
    assert "'dup-name'" in message and "test_dup_plugin_a" in message and "test_dup_plugin_b" in message
    assert "twice" in message


def test_duplicate_within_one_plugin_is_rejected(register_plugin):
    register_plugin(plugin_registering(Minimal("twin"), Minimal("twin")), name="test_twin_plugin")
    with pytest.raises(adapters.AdaptersError, match="twin.*registered twice"):
        adapters.get_registry()


def test_registry_is_clean_again_after_a_test_plugin_is_unregistered():
    # The register_plugin fixture of the tests above must not leak test strategies into later tests.
    names = adapters.get_registry().names()
    assert names == sorted(["full-finetune", "linear-probe", "lora", "prefix-tuning", "qlora",
                            *(s.name for s in peft_methods.strategies())])


# --------------------------------------------------------------------------------------------
# Lookup


def test_unknown_name_suggests_a_close_match_and_lists_all():
    with pytest.raises(adapters.UnknownStrategyError) as info:
        adapters.get_strategy("lorra")
    exc = info.value
    assert isinstance(exc, KeyError) and isinstance(exc, adapters.AdaptersError)
    message = str(exc)
    assert message.startswith("unknown strategy 'lorra'")  # not wrapped in quotes like a plain KeyError
    assert "Did you mean 'lora'?" in message
    for name in adapters.get_registry().names():
        assert name in message


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(KeyError) as info:
        adapters.get_registry().get("zzzzzzzz")
    message = str(info.value)
    assert "Did you mean" not in message
    assert "Available: " + ", ".join(adapters.get_registry().names()) + "." in message


def test_known_names_resolve_to_their_plugins():
    registry = adapters.get_registry()
    assert registry.entry("lora").plugin == "adapters_lora"
    assert registry.entry("qlora").plugin == "adapters_lora"
    assert registry.entry("prefix-tuning").plugin == "adapters_prefix"
    assert registry.entry("linear-probe").plugin == "adapters_probe"
    assert registry.entry("full-finetune").plugin == "adapters_full"
    assert adapters.get_strategy("qlora").default_quantization == "nf4"
    assert "lora" in registry and "nope" not in registry


# --------------------------------------------------------------------------------------------
# A third-party strategy written against the public API only.

THIRD_PARTY_SOURCE = textwrap.dedent('''
    """BitFit-style strategy: train only the bias and normalization weights."""
    from dataclasses import dataclass

    import adapters


    @dataclass
    class BiasNormOptions:
        biases: bool = True  # train every `.bias`
        norms: bool = True  # train the weights of normalization layers


    class BiasNorm:
        name = "bias-norm"
        description = "trains only bias and normalization weights"
        config_class = BiasNormOptions
        supported_quantization = frozenset({"none", "nf4"})
        supported_tasks = frozenset(adapters.TASKS)
        default_learning_rate = 1e-2

        def apply(self, model, config):
            chosen = []
            for module_name, module in model.named_modules():
                is_norm = "norm" in type(module).__name__.lower()
                for param_name, param in module.named_parameters(recurse=False):
                    if (config.biases and param_name == "bias") or (config.norms and is_norm):
                        chosen.append(param)
            if not chosen:
                raise adapters.AdaptersError("bias-norm found no bias or norm weights; enable biases or norms.")
            adapters.freeze(model)
            for param in chosen:
                param.requires_grad_(True)
            return model


    @adapters.hookimpl
    def register_strategies(register):
        register(BiasNorm())
''')


@pytest.fixture
def third_party(tmp_path, register_plugin):
    """The third-party plugin, imported from its own file and registered like an entry point would be."""
    path = tmp_path / "adapters_bias_norm_test.py"
    path.write_text(THIRD_PARTY_SOURCE)
    spec = importlib.util.spec_from_file_location("adapters_bias_norm_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register_plugin(module, name="adapters_bias_norm_test")
    return module


def test_third_party_source_uses_only_the_public_api():
    tree = ast.parse(THIRD_PARTY_SOURCE)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"adapters", "dataclasses", "dataclass"}
    used = {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "adapters"}
    assert used and used <= set(adapters.__all__)
    assert len(THIRD_PARTY_SOURCE.strip().splitlines()) <= 45


def expected_bias_norm_count(model) -> int:
    c = model.config
    return c.hidden_size * (2 * c.num_hidden_layers + 1)  # two RMSNorms per layer plus the final one; no biases


def test_third_party_strategy_registers_and_is_listed(third_party, capsys):
    registry = adapters.get_registry()
    assert "bias-norm" in registry.names()
    entry = registry.entry("bias-norm")
    assert entry.plugin == "adapters_bias_norm_test"
    assert isinstance(entry.strategy, adapters.Strategy)

    with pytest.raises(SystemExit) as info:
        cli_main(["strategies", "--json"])
    assert info.value.code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["bias-norm"]
    assert row["plugin"] == "adapters_bias_norm_test"
    assert row["supported_quantization"] == ["nf4", "none"]
    assert row["default_quantization"] == "none"  # core default for an attribute the plugin left out
    assert [o["name"] for o in row["options"]] == ["biases", "norms"]


def test_third_party_strategy_trains_saves_and_loads(third_party, tmp_path):
    out = tmp_path / "bias-norm-run"
    result = adapters.train(
        adapters.TrainSettings(model="random:tiny", strategy="bias-norm", max_steps=2, batch_size=2, seq_len=32,
                               eval_batches=1, output=str(out)),
        progress=False,
    )
    assert result.strategy == "bias-norm" and result.steps == 2 and len(result.losses) == 2
    base = adapters.load_base_model("random:tiny")
    assert result.parameters.trainable == expected_bias_norm_count(base.model)
    assert result.parameters.total == adapters.count_parameters(base.model).total
    assert all(v == v for v in result.after.values())  # finite, not NaN

    # The core's default save: one safetensors file with exactly the trainable weights.
    manifest = json.loads((out / "adapters.json").read_text())
    assert manifest["strategy"] == "bias-norm"
    assert manifest["config"] == {"biases": True, "norms": True}
    assert "weights.safetensors" in manifest["files"]
    saved = adapters.read_safetensors(out / "weights.safetensors")
    assert all("norm" in k for k in saved) and sum(t.numel() for t in saved.values()) == result.parameters.trainable

    # The core's default load restores those weights: they moved away from the base's (all ones).
    loaded = adapters.load(out)
    state = dict(loaded.model.named_parameters())
    for name, tensor in saved.items():
        assert torch.equal(state[name].detach(), tensor)
        assert not torch.equal(tensor, torch.ones_like(tensor))
    x = tokens()
    assert not torch.equal(logits(loaded.model, x), logits(base.model, x))


def test_third_party_default_save_load_round_trip_reproduces_logits(third_party, tmp_path):
    strategy = adapters.get_strategy("bias-norm")
    base = adapters.load_base_model("random:tiny")
    config = strategy.config_class()
    model = strategy.apply(base.model, config)
    assert adapters.count_parameters(model).trainable == expected_bias_norm_count(model)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for _, p in adapters.trainable_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    x = tokens()
    before = logits(model, x)

    directory = adapters.save(model, tmp_path / "saved", strategy=strategy, config=config, base=base)
    loaded = adapters.load(directory)
    assert loaded.strategy.name == "bias-norm" and loaded.manifest["files"] == ["weights.safetensors"]
    assert torch.equal(logits(loaded.model, x), before)
    fresh = adapters.load_base_model("random:tiny").model
    assert not torch.equal(logits(fresh, x), before)


def test_third_party_option_errors_are_user_errors(third_party):
    with pytest.raises(adapters.AdaptersError, match="unknown option 'rank' for strategy 'bias-norm'"):
        adapters.train(adapters.TrainSettings(model="random:tiny", strategy="bias-norm", options={"rank": "2"}),
                       progress=False)


# --------------------------------------------------------------------------------------------
# Invalid declarations


class NoApply(Minimal):
    apply = None


@dataclasses.dataclass
class Required:
    rank: int  # no default


class RequiredOption(Minimal):
    config_class = Required


class NotADataclass(Minimal):
    config_class = dict


class BadQuant(Minimal):
    supported_quantization = frozenset({"none", "int3"})


class BadTask(Minimal):
    supported_tasks = frozenset({"translation"})


class BadDefaultQuant(Minimal):
    default_quantization = "nf4"


class NoDescription:
    name = "no-description"
    config_class = NoOptions
    supported_quantization = frozenset({"none"})
    supported_tasks = frozenset({"causal-lm"})

    def apply(self, model, config):
        return model


@pytest.mark.parametrize(
    "strategy, problem",
    [
        (NoApply("no-apply"), "has no `apply(model, config)` method"),
        (RequiredOption("required-option"), "config option `rank` has no default"),
        (NotADataclass("not-a-dataclass"), "config_class is not a dataclass"),
        (BadQuant("bad-quant"), "supported_quantization has unknown values ['int3']"),
        (BadTask("bad-task"), "supported_tasks has unknown values ['translation']"),
        (BadDefaultQuant("bad-default"), "default_quantization is not in supported_quantization"),
        (NoDescription(), "has no `description`"),
    ],
)
def test_invalid_strategy_is_rejected_naming_the_problem(register_plugin, strategy, problem):
    register_plugin(plugin_registering(strategy), name="test_invalid_plugin")
    with pytest.raises(adapters.AdaptersError) as info:
        adapters.get_registry()
    message = str(info.value)
    assert problem in message
    assert "test_invalid_plugin" in message
    assert strategy.name in message


# --------------------------------------------------------------------------------------------
# Hook names


def misspelled_plugin() -> types.ModuleType:
    module = types.ModuleType("adapters_misspelled_test")

    @adapters.hookimpl
    def register_strategy(register):  # the hook is register_strategies
        register(Minimal("never-registered"))

    module.register_strategy = register_strategy
    return module


def test_misspelled_hook_is_rejected_at_registration_naming_the_plugin(register_plugin):
    pm = adapters.get_plugin_manager()
    pm.check_pending()  # the built-ins are fine
    with pytest.raises(adapters.AdaptersError) as info:
        register_plugin(misspelled_plugin(), name="adapters_misspelled_test")
    assert "register_strategy" in str(info.value)
    assert "adapters_misspelled_test" in str(info.value)
    assert "did you mean 'register_strategies'?" in str(info.value)
    assert pm.get_plugin("adapters_misspelled_test") is None  # rejected, so never registered
    pm.check_pending()
    assert "never-registered" not in adapters.get_registry().names()


def test_plugin_manager_turns_a_misspelled_hook_into_a_user_error(monkeypatch):
    monkeypatch.setattr(adapters.host.manager, "_pm", None)
    monkeypatch.setitem(sys.modules, "adapters_misspelled_test", misspelled_plugin())
    monkeypatch.setattr(adapters.host.manager, "DEFAULT_PLUGINS",
                        adapters.host.manager.DEFAULT_PLUGINS + ("adapters_misspelled_test",))
    with pytest.raises(adapters.AdaptersError) as info:
        adapters.host.manager.get_plugin_manager()
    message = str(info.value)
    assert "adapters_misspelled_test" in message and "register_strategy" in message
    assert "adapters.host.hookspecs" in message
    assert adapters.host.manager._pm is None  # a broken manager is never cached


# --------------------------------------------------------------------------------------------
# Built-ins


def test_builtins_are_registered_by_module_name_through_pm_register(monkeypatch):
    calls = []
    original = pluggy.PluginManager.register

    def spy(self, plugin, name=None):
        calls.append((plugin, name))
        return original(self, plugin, name)

    monkeypatch.setattr(pluggy.PluginManager, "register", spy)
    monkeypatch.setattr(adapters.host.manager, "_pm", None)
    pm = adapters.host.manager.get_plugin_manager()
    assert [name for _, name in calls] == list(adapters.host.manager.DEFAULT_PLUGINS)
    for plugin, name in calls:
        assert plugin is importlib.import_module(name)
        assert pm.get_plugin(name) is plugin
        assert pm.get_name(plugin) == name


STRATEGY_BUILTINS = {"adapters_lora", "adapters_prefix", "adapters_probe", "adapters_full", "adapters_peft_methods"}


def test_builtins_come_from_default_plugins():
    pm = adapters.get_plugin_manager()
    # The strategies, the report formats and the data readers: each registered through its hook.
    hooks = {**dict.fromkeys(STRATEGY_BUILTINS, "register_strategies"),
             "adapters.reports.renderers": "register_report_renderers",
             "adapters.data.formats": "register_data_readers"}
    assert set(adapters.host.manager.DEFAULT_PLUGINS) == set(hooks)
    for name, hook in hooks.items():
        module = sys.modules[name]
        assert pm.get_plugin(name) is module
        assert [h.name for h in pm.get_hookcallers(module)] == [hook]
    # Every strategy, format and reader comes from one of them (no test plugins are loaded here).
    assert {e.plugin for e in adapters.get_registry().entries()} == STRATEGY_BUILTINS
    assert {f.plugin for f in adapters.host.get_renderers().entries()} == {"adapters.reports.renderers"}
    assert {f.plugin for f in adapters.host.get_readers().entries()} == {"adapters.data.formats"}
    rows = {r["name"]: r for r in adapters.host.manager.list_plugins()}
    for name in adapters.host.manager.DEFAULT_PLUGINS:
        assert rows[name]["builtin"] is True
        assert rows[name]["distribution"] == "adapters-lab"


def test_no_generic_top_level_plugins_package_is_installed(tmp_path):
    # Run from an empty directory, so the repository checkout itself is not on sys.path.
    code = ("import importlib.util, sys\n"
            "missing = importlib.util.find_spec('plugins') is None\n"
            "found = all(importlib.util.find_spec(m) for m in ('adapters_lora', 'adapters_full'))\n"
            "sys.exit(0 if missing and found else 1)\n")
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------
# Parameter counting


def expected_total(config) -> int:
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * config.head_dim
    q = config.num_attention_heads * config.head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + h


@pytest.mark.parametrize("quantization", ["nf4", "fp4"])
def test_count_parameters_counts_4bit_packed_weights_as_the_weights_they_hold(quantization):
    plain = adapters.load_base_model("random:tiny").model
    packed = adapters.load_base_model("random:tiny", quantization=quantization).model
    total = adapters.count_parameters(plain).total
    assert total == expected_total(plain.config) == sum(p.numel() for p in plain.parameters())
    # The 4-bit model really is packed: its storage holds fewer elements than it has weights.
    assert any(getattr(p, "quant_state", None) is not None for p in packed.parameters())
    assert sum(p.numel() for p in packed.parameters()) < total
    assert adapters.count_parameters(packed).total == total


def test_count_parameters_splits_trainable_and_frozen():
    model = adapters.load_base_model("random:tiny").model
    adapters.freeze(model)
    assert adapters.count_parameters(model).trainable == 0
    model.model.norm.weight.requires_grad_(True)
    count = adapters.count_parameters(model)
    assert count.trainable == model.config.hidden_size
    assert count.fraction == pytest.approx(count.trainable / count.total)
