"""Model families beyond Llama: GPT-2, OPT, GPT-NeoX, Falcon, BLOOM, Phi-3, Qwen2, Gemma2, RoBERTa, Mamba.

Each is a tiny random model (hidden size 32, two layers) built here from its transformers config and
saved as a local model folder with a byte-level tokenizer, loaded the way a user's folder is.
Every strategy trains one real step on each, or is refused before any weight loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import adapters
from adapters import batches
from adapters import data as datasets
from adapters.contract import declared_trainable
from adapters.models import quiet_transformers
from adapters.runspec import StrategyRefused

from cli_helpers import assert_user_error, run_in_process

H = 32  # hidden size
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(family: str):
    import transformers as t

    small = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=300, **SPECIAL)
    return {
        "gpt2": lambda: t.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=128, vocab_size=300, **SPECIAL),
        "opt": lambda: t.OPTConfig(hidden_size=H, ffn_dim=64, word_embed_proj_dim=H, max_position_embeddings=128,
                                   **small),
        "gpt_neox": lambda: t.GPTNeoXConfig(hidden_size=H, intermediate_size=64, max_position_embeddings=128, **small),
        "falcon": lambda: t.FalconConfig(hidden_size=H, **small),  # multi-query: one key/value head
        "bloom": lambda: t.BloomConfig(hidden_size=H, n_layer=2, n_head=4, vocab_size=300, **SPECIAL),
        "phi3": lambda: t.Phi3Config(hidden_size=H, intermediate_size=64, max_position_embeddings=128, **small),
        "qwen2": lambda: t.Qwen2Config(hidden_size=H, intermediate_size=64, num_key_value_heads=2,
                                       max_position_embeddings=128, **small),
        "gemma2": lambda: t.Gemma2Config(hidden_size=H, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=128, **small),
        "roberta": lambda: t.RobertaConfig(hidden_size=H, intermediate_size=64, max_position_embeddings=130,
                                           **{**small, "pad_token_id": 1, "bos_token_id": 0}),
        "mamba": lambda: t.MambaConfig(hidden_size=H, num_hidden_layers=2, state_size=4, vocab_size=300, **SPECIAL),
    }[family]()


CAUSAL = ["gpt2", "opt", "gpt_neox", "falcon", "bloom", "phi3", "qwen2", "gemma2"]
FAMILIES = [*CAUSAL, "roberta"]  # RoBERTa as a sequence classifier
LABELS = ["negative", "positive"]


def byte_level_tokenizer(directory: Path) -> None:
    """A real tokenizer of 259 ids (three specials, then the 256 bytes), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>"])}
    vocab.update({char: i + 3 for i, char in enumerate(bytes_to_unicode().values())})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``folder(family)``: the family's tiny random model as a local model folder, built once."""
    from transformers import AutoModel, AutoModelForCausalLM

    root, built = tmp_path_factory.mktemp("families"), {}

    def make(family: str) -> Path:
        if family not in built:
            torch.manual_seed(0)
            cls = AutoModel if family == "roberta" else AutoModelForCausalLM  # RoBERTa: an encoder, no head
            built[family] = root / family
            with quiet_transformers():
                cls.from_config(_config(family)).save_pretrained(built[family])
            byte_level_tokenizer(built[family])
        return built[family]

    return make


def _load(folder, family: str) -> adapters.BaseModel:
    if family == "roberta":
        return adapters.load_base_model(str(folder(family)), task="sequence-classification", labels=LABELS)
    return adapters.load_base_model(str(folder(family)), task="causal-lm")


def _batch(base: adapters.BaseModel) -> dict[str, torch.Tensor]:
    texts = [e.text for e in datasets.default_dataset("causal-lm").train[:4]]
    if base.task == "causal-lm":
        blocks = batches.causal_lm_blocks(texts, base.tokenizer, 16)[:2]
        return {"input_ids": blocks, "labels": blocks}
    examples = [datasets.Example(text, LABELS[i % 2]) for i, text in enumerate(texts)]
    ids, mask, labels = batches.classification_batch_tensors(examples, LABELS, base.tokenizer, 16)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_one_step(name: str, base: adapters.BaseModel) -> None:
    """Apply the strategy, check its declared trainable count, and take one AdamW step that changes
    what it trains."""
    strategy = adapters.get_strategy(name)
    config = strategy.config_class()
    declared = declared_trainable(strategy, base.model, config)
    model = strategy.apply(base.model, config)
    trainable = dict(adapters.trainable_parameters(model))
    assert declared in (None, adapters.count_parameters(model).trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.0)
    loss = model(**_batch(base)).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert changed, f"{name}: one step changed none of {list(trainable)[:5]}"


@pytest.mark.parametrize("strategy", ["lora", "linear-probe", "full-finetune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_strategy_trains_a_step_on_each_family(family, strategy, folder):
    """Item 10: the task comes from transformers' auto mappings (GPT-2's GPT2LMHeadModel is a causal
    LM), GPT-2's Conv1D layers are linear layers, and RoBERTa's two-layer classification head is a head."""
    base = _load(folder, family)
    assert adapters.task_of(base.model) == base.task
    train_one_step(strategy, base)


@pytest.mark.parametrize("family", CAUSAL)
def test_prefix_tuning_trains_a_step_on_each_attention_family(family, folder):
    """Item 9: prefix tuning on GPT-2, BLOOM, Falcon (one key/value head), GPT-NeoX and OPT, as on the
    Llama-like families: its prefix gets gradients and trains."""
    adapters.resolve(adapters.RunSpec(model=str(folder(family)), strategy="prefix-tuning"), data=False)
    train_one_step("prefix-tuning", _load(folder, family))


def _no_weights_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(adapters.loading, "_load", refuse)


def test_prefix_tuning_refuses_mamba_before_loading(folder, capsys, monkeypatch):
    """Item 9: Mamba has no attention layers; train stops before loading and plan shows a refused row."""
    mamba = str(folder("mamba"))
    with pytest.raises(StrategyRefused, match="mamba models: it has no attention layers"):
        adapters.resolve(adapters.RunSpec(model=mamba, strategy="prefix-tuning"), data=False)
    _no_weights_load(monkeypatch)
    code, out, err = run_in_process(capsys, "train", "--model", mamba, "--strategy", "prefix-tuning")
    assert_user_error(code, out, err, "'prefix-tuning' cannot apply to mamba models", "Choose another strategy")
    code, out, err = run_in_process(capsys, "plan", "--model", mamba, "--strategies", "prefix-tuning,linear-probe",
                                    "--device", "cpu", "--json")
    assert code == 0, err
    rows = {p["strategy"]: p for p in json.loads(out)["plans"]}
    assert rows["prefix-tuning"]["status"] == "refused" and "no attention layers" in rows["prefix-tuning"]["message"]
    assert rows["linear-probe"]["status"] != "refused"


def test_prefix_tuning_refuses_hybrid_layers():
    """A model with some non-attention layers (Qwen3-Next's linear attention) is refused by its config."""
    from transformers import Qwen3NextConfig

    reason = adapters.get_strategy("prefix-tuning").refuses_model(Qwen3NextConfig())
    assert "layers other than attention (linear_attention)" in reason


def test_roberta_head_is_the_whole_classification_head(folder):
    """RoBERTa's head is a dense layer and out_proj: the probe trains both, and both are new weights."""
    base = _load(folder, "roberta")
    assert adapters.output_head_name(base.model) == "classifier"
    head = {n for n, _ in base.model.classifier.named_parameters()}
    assert head == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    assert base.new_weights == sorted(f"classifier.{n}" for n in head)
    assert adapters.head_parameters(base.model) == sum(p.numel() for p in base.model.classifier.parameters())
    # LoRA's all-linear adapts the encoder's dense layers, not the head's (PEFT trains a copy of the head).
    targets = adapters.match_targets(base.model, "all-linear")
    assert not [n for n, _ in adapters.targeted_linears(base.model, targets) if n.startswith("classifier")]


def test_gpt2_lora_trains_through_the_command_line(folder, capsys, tmp_path):
    """Item 10's reproduction: `adapters train` with LoRA on a GPT-2 folder completes (it said "cannot
    tell the task of GPT2LMHeadModel")."""
    code, out, err = run_in_process(capsys, "train", "--model", str(folder("gpt2")), "--strategy", "lora",
                                    "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
                                    "--output", str(tmp_path / "out"))
    assert code == 0, err
    assert adapters.load(tmp_path / "out").manifest.strategy == "lora"


def test_lora_on_mamba_is_one_clear_error_before_loading(folder, capsys, monkeypatch):
    """PEFT cannot adapt Mamba's out_proj; its own reason reaches the user, before any weight loads."""
    _no_weights_load(monkeypatch)
    code, out, err = run_in_process(capsys, "train", "--model", str(folder("mamba")), "--strategy", "lora",
                                    "--max-steps", "1")
    assert_user_error(code, out, err, "strategy 'lora' cannot apply to MambaForCausalLM", "out_proj",
                      "--set target_modules=")
