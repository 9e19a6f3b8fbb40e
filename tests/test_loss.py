"""The chunked causal-LM loss (adapters.loss): the same loss and gradients as transformers' ``labels=`` loss for
every built-in strategy, without ever holding the whole batch's logits.

Tolerance, in fp32 on the CPU: the loss within rtol 1e-5 / atol 1e-6 and each gradient within rtol 1e-4 /
atol 1e-6 of transformers' (the chunks only sum in another order; LoRA's dropout draws the same masks, since
the forward is the same and checkpointing restores the random state for the recomputation).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adapters
from adapters.loss import loss, loss_path, output_head
from adapters.rules import DEFAULT_LOSS_CHUNK

from cli_helpers import assert_user_error, run_in_process

LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}
STRATEGIES = {  # every built-in strategy, as a run applies it
    "lora": {}, "prefix-tuning": {"num_virtual_tokens": 5}, "linear-probe": {}, "full-finetune": {},
}


def strategy_model(strategy: str, model: str = "random:tiny", **options) -> torch.nn.Module:
    base = adapters.load_base_model(model)
    base.model.config.use_cache = False  # as a training run loads it
    s = adapters.get_strategy(strategy)
    torch.manual_seed(0)
    return s.apply(base.model, s.config_class(**{**STRATEGIES.get(strategy, {}), **options})).train()


def instruction_batch(vocab: int, rows: int = 3, seq: int = 37, packed: bool = True) -> dict[str, torch.Tensor]:
    """Rows of instruction data: prompts labelled -100; a right-padded row (its padding masked too); and, with
    ``packed``, a row of two examples whose position ids restart where the second begins."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, :7] = -100  # every row's prompt
    mask = torch.ones_like(ids)
    mask[1, seq - 9:] = 0  # row 1 is padded
    labels[1, seq - 9:] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if packed:
        positions = torch.arange(seq).repeat(rows, 1)
        positions[2, 20:] = torch.arange(seq - 20)  # row 2 packs a second example from position 20
        labels[2, 20:24] = -100  # with its own prompt
        batch["position_ids"] = positions
    return batch


def losses_and_grads(model, batch, chunk):
    """(loss, gradients of the trainable weights) under ``chunk`` (0: transformers' labels= loss), the same
    random state for each."""
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(123)
    value = loss(model, batch, chunk)
    return value.detach(), torch.autograd.grad(value, params)


def assert_same_loss_and_grads(model, batch, chunk):
    reference, reference_grads = losses_and_grads(model, batch, 0)
    value, grads = losses_and_grads(model, batch, chunk)
    torch.testing.assert_close(value, reference, **LOSS_TOL)
    assert len(grads) == len(reference_grads) > 0
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, **GRAD_TOL)
    assert any(g.abs().sum() > 0 for g in grads)  # the comparison is of real gradients


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("chunk", [16, 1000])  # 16 divides neither a row (37) nor the batch (111); 1000: one chunk
def test_every_builtin_strategy_gets_the_transformers_loss_and_gradients(strategy, chunk):
    model = strategy_model(strategy)
    batch = instruction_batch(model.config.vocab_size, packed=strategy != "prefix-tuning")
    assert loss_path(model, chunk) == f"chunked({chunk})"
    assert_same_loss_and_grads(model, batch, chunk)


def test_with_gradient_checkpointing_of_the_layers():
    from adapters.training import enable_gradient_checkpointing

    model = strategy_model("lora")
    enable_gradient_checkpointing(model)
    assert_same_loss_and_grads(model, instruction_batch(model.config.vocab_size), 16)


def test_a_lora_on_the_output_head_itself_trains_it_through_the_chunks():
    """As a plugin might do (the built-in lora leaves the head alone): PEFT's LoRA on lm_head, with dropout."""
    from peft import LoraConfig, get_peft_model

    base = adapters.load_base_model("random:tiny").model
    base.config.use_cache = False
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "lm_head"],
                                            init_lora_weights=False)).train()
    head = output_head(model)
    assert any(p.requires_grad for p in head.parameters()) and type(head).__module__.startswith("peft")
    assert_same_loss_and_grads(model, instruction_batch(model.config.vocab_size), 16)


def test_the_real_smollm2_on_real_text(smollm2):
    """The real model (vocabulary 49,152) on real text with a masked prompt: the loss and the gradients of its
    last layer and final norm (autograd.grad, so that the shared model keeps no gradient)."""
    model = smollm2.model
    weights = [model.model.norm.weight, *model.model.layers[-1].mlp.parameters()]
    ids = smollm2.tokenizer(open(adapters.__file__).read(), return_tensors="pt").input_ids[:, :90].reshape(2, 45)
    labels = ids.clone()
    labels[0, :10] = -100
    batch = {"input_ids": ids, "labels": labels}
    got = {}
    for chunk in (0, 32):  # 32 divides neither a row (45) nor the batch (90)
        value = loss(model, batch, chunk)
        got[chunk] = (value.detach(), *torch.autograd.grad(value, weights))
    torch.testing.assert_close(got[32][0], got[0][0], **LOSS_TOL)
    for chunked, reference in zip(got[32][1:], got[0][1:]):
        # Against the scale of each gradient: with a vocabulary of 49,152, transformers' fp32 log-softmax backward is
        # itself about 4e-4 of the scale from a float64 reference, where the fused chunks are about 1e-5 from it.
        torch.testing.assert_close(chunked, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


class _LargestLogits(TorchDispatchMode):
    """The most elements of any tensor an operation makes with a last dimension of the vocabulary's size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and not func.is_view and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("strategy", ["lora", "full-finetune"])
def test_the_whole_batchs_logits_never_exist_in_forward_or_backward(strategy):
    model = strategy_model(strategy)
    vocab = model.config.vocab_size
    batch = instruction_batch(vocab)
    tokens = batch["input_ids"].numel()

    def largest(chunk):
        with _LargestLogits(vocab) as seen:
            loss(model, batch, chunk).backward()
        model.zero_grad(set_to_none=True)
        return seen.largest

    assert largest(0) == tokens * vocab  # the model's own loss: the whole batch's logits
    assert largest(16) == 16 * vocab  # chunked: one chunk's at a time, forward and backward
    assert vocab not in (p.shape[-1] for p in model.parameters() if p.dim() == 1)  # the detector is not fooled


def test_the_peak_tensor_memory_falls_by_the_logits_and_their_gradients():
    from adapters.bench import cpu_peak_tensor_bytes

    vocab, rows, seq = 32_000, 2, 64
    model = tiny_causal_lm("llama", vocab_size=vocab, layers=1).requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # a gradient through the head: the loss's memory, no weight's
    batch = instruction_batch(vocab, rows, seq, packed=False)

    def step(chunk):
        loss(model, batch, chunk).backward()
        model.zero_grad(set_to_none=True)

    step(0)
    peaks = {chunk: cpu_peak_tensor_bytes(lambda c=chunk: step(c)) for chunk in (0, 16)}
    logits = rows * seq * vocab * 4  # one fp32 [tokens x vocab] tensor: 16 MB
    # The weights count in both peaks. The log-softmax, its gradient and the logits' gradient: gone, but a
    # chunk's (16 of the 128 tokens).
    assert peaks[0] - peaks[16] > 2.5 * logits


def test_a_trained_head_holds_one_gradient_of_its_weight(monkeypatch):
    """A trained plain linear head (full fine-tuning, a probe) goes through the fused chunks, which add each
    chunk's share into one gradient of the head's weight: the checkpointed chunks through the head module hold
    two or three of the head's size at once while autograd sums the shares."""
    from adapters.bench import cpu_peak_tensor_bytes

    vocab, hidden, rows, seq = 32_000, 64, 2, 64
    model = tiny_causal_lm("llama", vocab_size=vocab, layers=1, tie_word_embeddings=False).requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    batch = instruction_batch(vocab, rows, seq, packed=False)

    def step():
        loss(model, batch, 16).backward()
        model.zero_grad(set_to_none=True)

    step()
    fused = cpu_peak_tensor_bytes(step)
    with monkeypatch.context() as patch:  # a head of another class: the same chunks, checkpointed through it
        patch.setattr(model.lm_head, "__class__", type("OtherLinear", (torch.nn.Linear,), {}))
        checkpointed = cpu_peak_tensor_bytes(step)
    assert checkpointed - fused > vocab * hidden * 4  # at least one more head-sized gradient (8 MB)


# ------------------------------------------------------------------------------------------------
# Models whose forward changes the head's output, and models the chunks leave alone


def tiny_causal_lm(model_type: str, vocab_size: int = 300, layers: int = 2, **config) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
                             max_position_embeddings=128, **config)
    c.use_cache = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c, attn_implementation="eager").train()
    model.get_output_embeddings().weight.data.mul_(40.0)  # logits large enough for the soft cap to matter
    return model


class _HeadProducts(TorchDispatchMode):
    """The dtypes of the matrix products with the vocabulary as a dimension (the head's, forward and backward)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.dtypes = vocab, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.linear):
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 2]
            if any(self.vocab in m.shape for m in mats):
                self.dtypes |= {m.dtype for m in mats}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("strategy", ["full-finetune", "linear-probe"])
def test_under_autocast_the_fused_head_multiplies_in_its_dtype_and_sums_the_gradient_in_float32(strategy):
    """As on a GPU: a bf16 base under bf16 autocast, the trained weights float32 master weights (full fine-tuning's
    head and hidden states are float32; a probe's head is, its hidden states are bf16). The head's products run in
    bf16 both ways, its gradient stays float32, and loss and gradients match the model's own loss under autocast."""
    from adapters.training import keep_float32_trainable

    base = adapters.load_base_model("random:tiny")
    base.model.config.use_cache = False
    base.model.to(torch.bfloat16)
    s = adapters.get_strategy(strategy)
    torch.manual_seed(0)
    model = s.apply(base.model, s.config_class()).train()
    keep_float32_trainable(model)
    head = output_head(model)
    assert head.weight.dtype == torch.float32 and head.weight.requires_grad
    batch = instruction_batch(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward_under_autocast_backward_outside(chunk):  # as training runs it (and CUDA's backward thread)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss(model, batch, chunk)
        return value.detach(), torch.autograd.grad(value, params)

    reference, reference_grads = forward_under_autocast_backward_outside(0)
    with _HeadProducts(model.config.vocab_size) as products:
        value, grads = forward_under_autocast_backward_outside(16)
    assert products.dtypes == {torch.bfloat16}
    assert all(g.dtype == p.dtype for g, p in zip(grads, params))
    torch.testing.assert_close(value, reference, rtol=1e-2, atol=1e-2)  # bf16 logits, summed in other orders
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-3)
    assert any(g.abs().sum() > 0 for g in grads)


def test_gemma2s_soft_capped_logits_are_capped_in_each_chunk():
    model = tiny_causal_lm("gemma2", final_logit_softcapping=3.0)
    batch = instruction_batch(300, packed=False)
    assert loss_path(model, 16) == "chunked(16)"
    with torch.no_grad():
        without_cap = loss(tiny_causal_lm("gemma2", final_logit_softcapping=None), batch, 0)
        assert abs(float(loss(model, batch, 0)) - float(without_cap)) > 0.1  # the cap changes the loss here
    assert_same_loss_and_grads(model, batch, 16)
    assert loss_path(model, 16) == "chunked(16)"  # checked against the forward, and kept


def test_a_forward_that_does_other_than_its_config_says_falls_back_to_its_own_loss():
    model = tiny_causal_lm("llama")
    model.config.final_logit_softcapping = 3.0  # which Llama's forward never applies
    batch = instruction_batch(300, packed=False)
    assert loss_path(model, 16) == "chunked(16)"  # the config alone promises a cap
    assert_same_loss_and_grads(model, batch, 16)  # the forward shows there is none: the model's own loss
    assert loss_path(model, 16) == "model"


def test_a_model_with_a_loss_of_its_own_keeps_it():
    model = tiny_causal_lm("llama")
    model.loss_function = lambda logits, labels, **kwargs: logits.float().square().mean()
    assert loss_path(model, 16) == "model"
    batch = instruction_batch(300, packed=False)
    assert float(loss(model, batch, 16)) == pytest.approx(float(model(**batch).loss), rel=1e-6)


def test_sequence_classification_keeps_the_models_loss():
    base = adapters.load_base_model("random:tiny", task="sequence-classification", labels=["a", "b"])
    model = base.model.eval()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 1])}
    assert output_head(model) is None and loss_path(model) == "model"
    assert float(loss(model, batch)) == float(model(**batch).loss)


def test_the_head_is_put_back_even_when_the_forward_fails():
    model = strategy_model("lora")
    head = output_head(model)
    with pytest.raises(Exception):  # noqa: B017 - any error the forward raises
        loss(model, {"input_ids": torch.zeros(2, 4, 3, dtype=torch.long), "labels": torch.zeros(2, 4).long()}, 16)
    assert output_head(model) is head


# ------------------------------------------------------------------------------------------------
# The setting


def test_the_default_chunk_and_zero():
    model = strategy_model("lora")
    assert loss_path(model) == f"chunked({DEFAULT_LOSS_CHUNK})" and loss_path(model, 0) == "model"
    with pytest.raises(ValueError):
        loss(model, instruction_batch(model.config.vocab_size), -1)


def test_a_negative_loss_chunk_is_a_user_error(capsys, tmp_path):
    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--strategy", "lora",
                                    "--loss-chunk", "-1", "--output", str(tmp_path / "out"))
    assert_user_error(code, out, err, "--loss-chunk", "0")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_liger_fused_loss_matches_the_torch_chunks():
    pytest.importorskip("liger_kernel")
    base = adapters.load_base_model("smollm2-135m", device="cuda")
    model = base.model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    head = output_head(model)
    head.weight.requires_grad_(True)
    assert loss_path(model, 256) == "liger"
    ids = torch.randint(0, model.config.vocab_size, (4, 512), device="cuda", generator=None)
    batch = {"input_ids": ids, "labels": ids}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = loss(model, batch, 256)
    (fused_grad,) = torch.autograd.grad(fused, [head.weight])
    import adapters.loss as module

    module._liger.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_liger", lambda: None)
        assert loss_path(model, 256) == "chunked(256)"
        with torch.autocast("cuda", dtype=torch.bfloat16):
            chunked = loss(model, batch, 256)
        (chunked_grad,) = torch.autograd.grad(chunked, [head.weight])
    torch.testing.assert_close(fused, chunked, rtol=2e-2, atol=2e-2)  # bf16 logits, summed in other orders
    torch.testing.assert_close(fused_grad, chunked_grad, rtol=5e-2, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# In the training pipeline


def test_a_training_step_and_held_out_evaluation_match_the_models_own_loss():
    from adapters.training import evaluate, make_accelerator, optimizer_step

    accelerator = make_accelerator()
    batch = instruction_batch(512)
    loader = [instruction_batch(512, rows=2, seq=20, packed=False), batch]
    after = {}
    for chunk in (0, 16):
        model = strategy_model("lora", dropout=0.0)
        held_out = evaluate(model, loader, "causal-lm", accelerator, max_batches=2, loss_chunk=chunk)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step_loss, _ = optimizer_step(model, [batch], optimizer, accelerator, micro_batch=2, loss_chunk=chunk)
        after[chunk] = (held_out, step_loss, {n: p.detach().clone() for n, p in model.named_parameters()
                                              if p.requires_grad})
    assert after[16][0] == pytest.approx(after[0][0], rel=1e-6)  # held-out loss and perplexity
    torch.testing.assert_close(after[16][1], after[0][1], **LOSS_TOL)  # micro-batches of 2 rows and 1
    for name, weight in after[0][2].items():  # the same update: AdamW moves each weight by about the lr
        torch.testing.assert_close(after[16][2][name], weight, rtol=1e-4, atol=1e-5)


@pytest.fixture
def bf16_accelerator_state():
    """Accelerate's state is one per process, set by the first Accelerator: start afresh, and leave it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_training_step_under_bf16_mixed_precision_runs_the_head_in_bf16(strategy, bf16_accelerator_state):
    """The GPU's recipe, on the CPU: a bf16 base, float32 master weights, an Accelerator with bf16 autocast (which
    wraps the model's forward only). The loss's head chunks run under the same autocast, so a probe's float32
    head meets bf16 hidden states without a dtype error and full fine-tuning's head multiplies in bf16."""
    from accelerate import Accelerator

    from adapters.training import keep_float32_trainable, optimizer_step

    base = adapters.load_base_model("random:tiny")
    base.model.config.use_cache = False
    base.model.to(torch.bfloat16)
    s = adapters.get_strategy(strategy)
    torch.manual_seed(0)
    model = s.apply(base.model, s.config_class(**STRATEGIES[strategy])).train()
    keep_float32_trainable(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = instruction_batch(base.model.config.vocab_size, packed=strategy != "prefix-tuning")
    with _HeadProducts(base.model.config.vocab_size) as products:
        value, _ = optimizer_step(model, [batch], optimizer, accelerator, loss_chunk=16)
    assert torch.isfinite(value)
    assert products.dtypes == {torch.bfloat16}
    # Accelerate's float32 copy of the placeholder logits is still the chunks' case, not the model's own loss
    assert loss_path(model, 16) == "chunked(16)"
    with _LargestLogits(base.model.config.vocab_size) as seen:
        optimizer_step(model, [batch], optimizer, accelerator, loss_chunk=16)
    assert seen.largest <= 16 * base.model.config.vocab_size
