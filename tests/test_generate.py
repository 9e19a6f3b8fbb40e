"""`adapters generate`: a run's continuation of a prompt, greedy or sampled, streamed, with --chat and
--compare-base; on the real SmolLM2-135M-Instruct where the text matters, on random:tiny otherwise.

An untrained LoRA (its B matrices are zero) changes nothing, so it must say exactly what the base
says; a LoRA whose B is not zero must say something else, and its disabled adapter the base again.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch

import adapters
from adapters.errors import TokenizerFallback
from adapters.evaluation import Opened, inspect_run
from adapters.generate import Generator, NothingGenerated, generate
from adapters.options import build_config

from cli_helpers import assert_user_error, run_in_process

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


def _save_lora(name: str, out: Path, **options) -> Opened:
    """A LoRA applied to a freshly loaded ``name`` and saved untrained to ``out``; returned as loaded."""
    base = adapters.load_base_model(name)
    strategy = adapters.get_strategy("lora")
    config = build_config(strategy.config_class, options, "lora")
    model = strategy.apply(base.model, config)
    adapters.save(model, out, strategy=strategy, config=config, base=base)
    model.eval()
    return Opened(inspect_run(out), model, base)


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory) -> Generator:
    """An untrained LoRA on the real SmolLM2, saved; its generator uses the model still in memory."""
    return Generator(_save_lora("smollm2-135m", tmp_path_factory.mktemp("smol") / "run"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    _save_lora("random:tiny", out, r=4)
    return out


@torch.no_grad()
def base_greedy(smollm2, ids: list[int], n: int) -> str:
    """The plain transformers model's greedy continuation of ``ids``, decoded as generate decodes it."""
    out = smollm2.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=smollm2.tokenizer.pad_token_id)
    return smollm2.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def lora_b(generator: Generator) -> list[torch.nn.Parameter]:
    return [p for n, p in generator.opened.model.named_parameters() if "lora_B" in n]


@pytest.mark.slow
def test_an_untrained_lora_says_exactly_what_the_base_says(smol_run, smollm2):
    assert lora_b(smol_run) and all(not p.detach().any() for p in lora_b(smol_run))
    pieces = list(generate(smol_run, PROMPT, max_new_tokens=12))
    text = "".join(pieces)
    assert text == base_greedy(smollm2, smollm2.tokenizer.encode(PROMPT), 12)
    assert "Paris" in text
    assert len(pieces) >= 3, pieces  # streamed, not one block at the end


@pytest.mark.slow
def test_the_adapter_is_on_and_compare_base_turns_it_off(smol_run, smollm2):
    """A LoRA whose B is not zero changes the text; ``base=True`` (PEFT's disable_adapter) gives the base's."""
    assert smol_run.uses_peft and smol_run.base_source == "adapter disabled"
    want = base_greedy(smollm2, smollm2.tokenizer.encode(PROMPT), 8)
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for p in lora_b(smol_run):
                p.copy_(torch.randn(p.shape, generator=generator))
        adapted = "".join(generate(smol_run, PROMPT, max_new_tokens=8))
        base = "".join(generate(smol_run, PROMPT, max_new_tokens=8, base=True))
    finally:
        with torch.no_grad():
            for p in lora_b(smol_run):
                p.zero_()
    assert adapted != want
    assert base == want


@pytest.mark.slow
def test_text_streams_as_the_tokens_are_generated(smol_run):
    """The first piece reaches the caller while generation is still under way: from the sixth forward
    on, the model waits until the caller has it (and would wait in vain if the text came at the end)."""
    received, waits, forwards = threading.Event(), [], [0]

    def hold(module, args, kwargs):
        forwards[0] += 1
        if forwards[0] >= 6:
            waits.append(received.wait(timeout=30))

    handle = smol_run.opened.base.model.register_forward_pre_hook(hold, with_kwargs=True)
    try:
        pieces = generate(smol_run, PROMPT, max_new_tokens=12)
        first = next(pieces)
        received.set()
        rest = list(pieces)
    finally:
        handle.remove()
    assert first and rest and forwards[0] >= 6
    assert waits and all(waits)


@pytest.mark.slow
def test_chat_renders_the_prompt_with_the_tokenizers_template(smol_run, smollm2):
    tokenizer = smollm2.tokenizer
    templated = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                              tokenize=True)["input_ids"]
    assert smol_run.prompt_ids(QUESTION, chat=True) == list(templated)
    chat = "".join(generate(smol_run, QUESTION, chat=True, max_new_tokens=12))
    assert chat == base_greedy(smollm2, list(templated), 12)
    assert "Paris" in chat and "<|im_end|>" not in chat  # the end-of-turn token ends it and is not shown
    # A run saved without training records no chat data: plain text, where the instruct model ends at once.
    assert not smol_run.chat_default and smol_run.prompt_ids(QUESTION) == tokenizer.encode(QUESTION)
    with pytest.raises(NothingGenerated, match="give --chat"):
        "".join(generate(smol_run, QUESTION, max_new_tokens=12))


@pytest.mark.slow
def test_sampling_is_seeded_and_differs_from_greedy(smol_run, smollm2):
    def sample(seed: int) -> str:
        return "".join(generate(smol_run, PROMPT, max_new_tokens=8, temperature=1.2, top_p=0.95, seed=seed))

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other
    assert first != base_greedy(smollm2, smollm2.tokenizer.encode(PROMPT), 8)


@pytest.mark.slow
def test_generate_command_streams_the_run_and_then_the_base(smol_run, smollm2, capsys):
    """The command loads RUN from disk (adapters.load), not the model in memory."""
    run = smol_run.info.path
    code, out, err = run_in_process(capsys, "generate", str(run), "--prompt", PROMPT, "--max-new-tokens", "8",
                                    "--compare-base")
    assert code == 0, err
    want = base_greedy(smollm2, smollm2.tokenizer.encode(PROMPT), 8)
    assert out == f"--- lora on smollm2-135m ---\n{want}\n--- base: adapter disabled ---\n{want}\n"
    assert "Paris" in want


# ------------------------------------------------------------------------------------ random:tiny


def test_a_strategy_that_changes_the_base_compares_with_the_base_loaded_again(tmp_path):
    base = adapters.load_base_model("random:tiny")
    strategy = adapters.get_strategy("linear-probe")
    config = build_config(strategy.config_class, {}, "linear-probe")
    model = strategy.apply(base.model, config)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    adapters.save(model, tmp_path / "probe", strategy=strategy, config=config, base=base)
    generator = Generator(tmp_path / "probe")
    assert not generator.uses_peft and generator.base_source == "reloaded random:tiny"
    probe = "".join(generate(generator, "def f", max_new_tokens=8))
    compared = "".join(generate(generator, "def f", max_new_tokens=8, base=True))
    plain = "".join(generate(Generator(Opened(inspect_run(tmp_path / "probe"), *_plain("random:tiny"))),
                        "def f", max_new_tokens=8))
    assert compared == plain
    assert probe != plain


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_prefix_tuning_generates_with_its_prefix(tmp_path):
    """PEFT hands the prefix over as a cache, which transformers 5's generate drops: the text must still
    be the prefixed model's (greedy over full forward passes), not the base's."""
    base = adapters.load_base_model("random:tiny")
    strategy = adapters.get_strategy("prefix-tuning")
    config = build_config(strategy.config_class, {"num_virtual_tokens": 4}, "prefix-tuning")
    model = strategy.apply(base.model, config)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p[1].copy_(torch.randn(p[1].shape, generator=torch.Generator().manual_seed(2)) * 3)
    adapters.save(model, tmp_path / "prefix", strategy=strategy, config=config, base=base)
    generator = Generator(tmp_path / "prefix")
    ids = torch.tensor([generator.prompt_ids("def f(x):")])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, generator.opened.model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=-1)
    want = generator.opened.tokenizer.decode(ids[0, -6:].tolist())
    got = "".join(generate(generator, "def f(x):", max_new_tokens=6))
    assert got == want
    assert got != "".join(generate(generator, "def f(x):", max_new_tokens=6, base=True))


def _plain(name: str):
    base = adapters.load_base_model(name)
    return base.model.eval(), base


def test_a_merged_checkpoint_generates_what_its_run_generates(tiny_run, tmp_path):
    """A plain transformers folder (config.json, no adapters.json) is accepted as RUN."""
    loaded = adapters.load(tiny_run)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    run_text = "".join(generate(Opened(inspect_run(tiny_run), loaded.model.eval(), loaded.base), "import ",
                                max_new_tokens=12))
    loaded.model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenizerFallback)  # random:tiny has no tokenizer files to save
        merged = Generator(tmp_path / "merged")
    assert merged.info.kind == "checkpoint" and not merged.uses_peft
    assert "".join(generate(merged, "import ", max_new_tokens=12)) == run_text


def _classification_run(tmp_path: Path) -> Path:
    base = adapters.load_base_model("random:tiny", task="sequence-classification", labels=["a", "b"])
    strategy = adapters.get_strategy("lora")
    config = build_config(strategy.config_class, {"r": 4}, "lora")
    out = tmp_path / "classify"
    adapters.save(strategy.apply(base.model, config), out, strategy=strategy, config=config, base=base)
    return out


def test_a_classification_run_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    run = _classification_run(tmp_path)
    monkeypatch.setattr("adapters.generate.open_run", _no_loading)
    code, out, err = run_in_process(capsys, "generate", str(run), "--prompt", "hello")
    assert_user_error(code, out, err, str(run), "sequence-classification", "adapters eval")
    assert out == ""


def test_a_classification_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    base = adapters.load_base_model("random:tiny", task="sequence-classification", labels=["a", "b"])
    base.model.save_pretrained(tmp_path / "merged")
    capsys.readouterr()
    monkeypatch.setattr("adapters.generate.open_run", _no_loading)
    code, out, err = run_in_process(capsys, "generate", str(tmp_path / "merged"), "--prompt", "hello")
    assert_user_error(code, out, err, "sequence-classification checkpoint", "adapters eval")


def _no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the error")


def test_chat_without_a_template_is_a_clear_error(tiny_run, capsys):
    code, out, err = run_in_process(capsys, "generate", str(tiny_run), "--prompt", "hello", "--chat")
    assert_user_error(code, out, err, "no chat template", "Drop --chat")
    assert out == ""


@pytest.mark.parametrize(("args", "needles"), [
    (["--seed", "3"], ["--seed applies to sampling", "--temperature"]),
    (["--top-p", "0.5", "--seed", "3"], ["--top-p and --seed apply to sampling"]),
    (["--temperature", "-1"], ["--temperature -1.0", "0 (greedy)"]),
    (["--temperature", "0.7", "--top-p", "0"], ["--top-p 0.0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens must be at least 1"]),
    (["--prompt", ""], ["--prompt is empty"]),
], ids=["seed-without-temperature", "top-p-and-seed", "negative-temperature", "top-p-0", "no-tokens", "empty"])
def test_decoding_flags_are_checked_before_loading(args, needles, tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("adapters.generate.open_run", _no_loading)
    monkeypatch.setattr("adapters.store.load", _no_loading)
    prompt = [] if "--prompt" in args else ["--prompt", "hello"]
    code, out, err = run_in_process(capsys, "generate", str(tiny_run), *prompt, *args)
    assert_user_error(code, out, err, *needles)


@pytest.mark.parametrize("what", ["missing", "not-a-run"])
def test_a_run_that_is_not_there_is_one_line(what, tmp_path, capsys):
    path = tmp_path / "nothing"
    if what == "not-a-run":
        path.mkdir()
    code, out, err = run_in_process(capsys, "generate", str(path), "--prompt", "hello")
    assert_user_error(code, out, err, str(path))
