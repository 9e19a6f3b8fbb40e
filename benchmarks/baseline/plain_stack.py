"""The plain stack, hand-written: transformers + peft + bitsandbytes training steps, no adapters code in the loop.

One variant a process, each the recipe a user of the plain stack writes from the libraries' own docs:

  full    every weight trains
  lora    PEFT LoRA r16, alpha 32, dropout 0.05 (the common recipe) on every linear layer but the head
  qlora   the HF QLoRA recipe: an nf4 base with double quantization (BitsAndBytesConfig), then
          ``prepare_model_for_kbit_training`` (it upcasts the frozen non-quantized modules to fp32 and turns
          gradient checkpointing on, its default), then LoRA as above; the model in train mode, as HF
          Trainer puts it, so the checkpointing really engages

The workload is `adapters bench`'s, so that the two can stand side by side (../side_by_side.py): the
model's own ``labels=`` loss on the first BATCH blocks of SEQ tokens of the built-in real text (the train
split of the Python language reference, tokenized with adapters' own data helpers, so both sides train on
the same tokens), AdamW, WARMUP untimed steps, then STEPS timed ones. Weights are bf16 on CUDA, as
../../../shared/anchors/raw_stack.py loads them, and fp32 on the CPU.

Peak memory, as adapters bench measures it: on CUDA ``torch.cuda.max_memory_allocated`` over the timed
steps; on the CPU ``adapters.bench.profiler.cpu_peak_tensor_bytes`` around one more step.

adapters is imported only outside the loop: to locate the named model's checkpoint, for the tokens, and
for the CPU peak helper.

Usage: python plain_stack.py --variant full|lora|qlora [--model smollm2-135m] [--batch 4 --seq 512]
       [--steps 3 --warmup 1] [--seed 0]
Prints one JSON line: variant, tokens_per_s, step_s, peak_bytes, ...
"""
import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from adapters.batches import causal_lm_blocks
from adapters.bench.profiler import cpu_peak_tensor_bytes
from adapters.data.corpora import python_reference
from adapters.loading import ByteTokenizer
from adapters.models import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(model_name: str, checkpoint, batch: int, seq: int) -> torch.Tensor:
    """The [batch, seq] ids adapters bench trains on: the first blocks of the default data's train split
    (repeated when there are fewer, as bench repeats them)."""
    tokenizer = ByteTokenizer() if model_name.startswith("random:") else AutoTokenizer.from_pretrained(checkpoint)
    blocks = causal_lm_blocks([e.text for e in python_reference().train], tokenizer, seq)
    return blocks[torch.arange(batch) % len(blocks)]


def load(checkpoint, variant: str, cuda: bool, seed: int) -> torch.nn.Module:
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda else "cpu"}}
    if variant == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    if variant == "qlora":
        model = prepare_model_for_kbit_training(model)
    torch.manual_seed(seed)  # LoRA's initialisation
    if variant in ("lora", "qlora"):
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.train()
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", required=True, choices=["full", "lora", "qlora"])
    ap.add_argument("--model", default="smollm2-135m", help="a model name adapters knows, or a checkpoint folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    checkpoint = resolve_model(args.model).locate()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = load(checkpoint, args.variant, cuda, args.seed)
    load_s = time.perf_counter() - start
    device = "cuda" if cuda else "cpu"
    ids = tokens(args.model, checkpoint, args.batch, args.seq).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> torch.Tensor:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t)
    if cuda:
        peak, source = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
    else:
        peak, source = cpu_peak_tensor_bytes(step), "cpu_profiler_allocation_events"
    median = statistics.median(times)
    print(json.dumps({
        "variant": args.variant, "model": args.model, "batch_size": args.batch, "seq_len": args.seq,
        "steps": args.steps, "warmup": args.warmup, "device": device,
        "load_s": load_s, "step_s": {"median": median, "min": min(times), "max": max(times)},
        "tokens_per_step": ids.numel(), "tokens_per_s": ids.numel() / median,
        "peak_bytes": peak, "peak_source": source,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": float(losses[-1]),
    }))


if __name__ == "__main__":
    main()
