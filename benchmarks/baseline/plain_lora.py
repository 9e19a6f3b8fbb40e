"""The plain stack, hand-written: transformers + peft (+ bitsandbytes) LoRA steps, no adapters code.

It runs the workload `adapters bench --strategies lora` runs (same checkpoint, LoRA r16 on every
linear layer but the head, AdamW, the same batch shape of real text, warm-up excluded), so the
project's overhead can be stated as a ratio measured in one run (see ../overhead.py).

Usage: python plain_lora.py CHECKPOINT_DIR [--quantization none|nf4] [--batch 2 --seq 128 --steps 3 --warmup 1]
Prints one JSON line: {"step_s_median": ..., "step_s": [...], "tokens_per_s": ...}.
"""
import argparse
import json
import pydoc_data.topics
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

ap = argparse.ArgumentParser()
ap.add_argument("checkpoint")
ap.add_argument("--quantization", default="none", choices=["none", "nf4"])
ap.add_argument("--batch", type=int, default=2)
ap.add_argument("--seq", type=int, default=128)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--warmup", type=int, default=1)
args = ap.parse_args()

cuda = torch.cuda.is_available()
dtype = torch.bfloat16 if cuda else torch.float32
kwargs = {"dtype": dtype, "device_map": {"": 0 if cuda else "cpu"}, "trust_remote_code": False}
if args.quantization == "nf4":
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
model = AutoModelForCausalLM.from_pretrained(args.checkpoint, **kwargs)
tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=False)
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
torch.manual_seed(0)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=targets,
                                         task_type="CAUSAL_LM"))
model.train()

text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False)[: args.batch * args.seq]).view(args.batch, args.seq)
ids = ids.to(model.device)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
sync = torch.cuda.synchronize if cuda else (lambda: None)
times = []
for i in range(args.warmup + args.steps):
    sync()
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()
    sync()
    if i >= args.warmup:
        times.append(time.perf_counter() - t)
median = statistics.median(times)
print(json.dumps({"step_s_median": median, "step_s": times, "tokens_per_s": ids.numel() / median}))
