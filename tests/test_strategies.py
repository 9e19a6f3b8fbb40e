"""Every built-in strategy x every kind of quantization it claims x every task it claims, on real models.

causal-lm runs on the real SmolLM2-135M; sequence-classification on the real all-MiniLM-L6-v2.
For each case: a training step changes the trainable weights and only those; a save -> load round
trip reproduces the outputs; plain PEFT loads the PEFT-backed strategies' directories.

The kinds are none, 8-bit and 4-bit: nf4 stands for both 4-bit data types, as fp4 runs the same code
(bitsandbytes' Linear4bit, another quantization table). An alias such as qlora (lora with another
default quantization) is lora on that base. The conformance kit checks every declared cell, fp4 and
the aliases included, on random:tiny (test_plugin_kit.py), and test_cli.py trains qlora on the real
SmolLM2 and loads it with plain PEFT.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import adapters
from adapters.contract import traits
from adapters.host.manager import DEFAULT_PLUGINS

LABELS = ["asyncio", "email", "http", "logging", "unittest", "xml"]
MODEL_FOR = {"causal-lm": "smollm2-135m", "sequence-classification": "minilm-l6"}
PEFT_BACKED = {"lora", "qlora", "prefix-tuning"}


def _cases():
    registry = adapters.get_registry()
    for entry in registry.entries():
        if entry.plugin not in DEFAULT_PLUGINS or entry.plugin == "adapters_peft_methods":
            continue  # PEFT's methods, on the kit's tiny model and SmolLM2: tests/test_peft_methods.py
        s = entry.strategy
        if traits(s).default_quantization != "none":
            continue  # an alias of a strategy with another default quantization, tested as that strategy
        quants = sorted(s.supported_quantization - {"fp4"} if "nf4" in s.supported_quantization
                        else s.supported_quantization)
        for task in sorted(s.supported_tasks):
            for q in quants:
                yield pytest.param(s.name, q, task, id=f"{s.name}@{q}-{task}")


@functools.cache
def _pristine(task: str, quantization: str) -> adapters.BaseModel:
    labels = LABELS if task == "sequence-classification" else None
    return adapters.load_base_model(MODEL_FOR[task], quantization=quantization, task=task, labels=labels)


def fresh_base(task: str, quantization: str) -> adapters.BaseModel:
    """A private copy of a real base; loading (and quantizing) happens once per session."""
    return copy.deepcopy(_pristine(task, quantization))


def batch(task: str, base: adapters.BaseModel) -> dict[str, torch.Tensor]:
    texts = ["Return the number of items in a container.", "The try statement specifies handlers."]
    enc = [base.tokenizer.encode(t, add_special_tokens=False)[:12] for t in texts]
    ids = torch.tensor([e + [base.tokenizer.pad_token_id] * (12 - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (12 - len(e)) for e in enc])
    if task == "causal-lm":
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 3])}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("name,quantization,task", list(_cases()))
def test_train_save_load(name, quantization, task, tmp_path):
    strategy = adapters.get_strategy(name)
    config = strategy.config_class()
    base = fresh_base(task, quantization)
    inputs = batch(task, base)
    torch.manual_seed(0)
    model = strategy.apply(base.model, config)
    trainable = {n for n, _ in adapters.trainable_parameters(model)}
    assert trainable, "the strategy left nothing trainable"
    counts = adapters.count_parameters(model)
    assert counts.trainable < counts.total or name == "full-finetune"

    before = snapshot(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    # Two steps: LoRA's B starts at zero, so its A receives a gradient only from the second step on.
    for _ in range(2):
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    unchanged = [n for n in trainable if torch.equal(before[n], after[n].detach())]
    changed_frozen = [n for n in before if n not in trainable and not torch.equal(before[n], after[n].detach())]
    assert not unchanged, f"trainable parameters did not change: {unchanged[:5]}"
    assert not changed_frozen, f"frozen parameters changed: {changed_frozen[:5]}"

    expected = logits(model, inputs)
    out = tmp_path / "saved"
    adapters.save(model, out, strategy=strategy, config=config, base=base)
    restored = adapters.load(out, base=fresh_base(task, quantization))
    assert torch.equal(logits(restored.model, inputs), expected)
    assert restored.manifest["quantization"] == quantization and restored.manifest["strategy"] == name

    if name in PEFT_BACKED:
        from peft import PeftModel

        plain = PeftModel.from_pretrained(fresh_base(task, quantization).model, out)
        assert torch.equal(logits(plain, inputs), expected)
