"""What one training step keeps for backward, tensor by tensor, on a Llama-1B-shaped model cut to a few layers:
the saved tensors' shapes and dtypes, their bytes per layer, and the step's peak. Run on a GPU and on the CPU
(where an Accelerator with bf16 autocast stands in for the GPU's recipe), the two say where the planner's model of
activations differs from what CUDA really keeps.

`qlora` is LoRA on the same shape loaded through adapters' own nf4 loading (bitsandbytes), and ``--compile`` runs
the decoder layers compiled, as CUDA runs them by default: together they show whether a QLoRA step keeps
dequantized copies of its weights for backward, or what compile's graphs keep. (On the CPU, 2 layers at 2 x 256,
neither eager nor compiled QLoRA keeps a dequantized copy: the saved tensors are the same activations as LoRA's.)

    python benchmarks/gpu/inventory.py --layers 2 --output inventory.json
    python benchmarks/gpu/inventory.py --strategies qlora,lora --compile --output inventory-compiled.json
"""
from __future__ import annotations

import argparse
import collections
import json
import time

import torch


def _model(layers: int, device: str, quantized: bool) -> torch.nn.Module:
    """The Llama-1B shape cut to ``layers``, bf16; ``quantized``: saved and loaded again through adapters' nf4
    loading, as a qlora run loads its base."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import adapters

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=layers, vocab_size=128256, tie_word_embeddings=True, use_cache=False)
    if not quantized:
        with torch.device(device):
            return LlamaForCausalLM(config).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
        base = adapters.load_base_model(folder, quantization="nf4", dtype=torch.bfloat16, device=device)
    base.model.config.use_cache = False
    return base.model


def inventory(strategy: str, layers: int, batch: int, seq: int, device: str, compiled: bool = False) -> dict:
    from accelerate import Accelerator

    import adapters
    from adapters import engine
    from adapters.training import keep_float32_trainable, optimizer_step

    model = _model(layers, device, quantized=strategy == "qlora")
    recomputed = 0 if compiled else engine.recompute_gated_mlps(model)  # as adapters.rules.recomputes_mlp says
    s = adapters.get_strategy(strategy)
    model = s.apply(model, s.config_class()).train()
    keep_float32_trainable(model)
    if compiled:
        engine.compile_layers(model)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, accelerator.unwrap_model(model).config.vocab_size, (batch, seq), device=accelerator.device)
    rows = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer_step(model, [rows], optimizer, accelerator)  # optimizer state, lazy allocations, compiling
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes())
        return t

    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        optimizer_step(model, [rows], optimizer, accelerator)
    if cuda:
        torch.cuda.synchronize()
    counts = collections.Counter((shape, dtype) for shape, dtype, _ in seen.values())
    sizes = {(shape, dtype): nbytes for shape, dtype, nbytes in seen.values()}
    return {"strategy": strategy, "layers": layers, "device": device, "compiled": compiled,
            "recomputed_mlps": recomputed,
            "saved_bytes": sum(v[2] for v in seen.values()), "step_s": time.perf_counter() - start,
            "peak_above_start_bytes": torch.cuda.max_memory_allocated() - before if cuda else None,
            "saved": [{"shape": list(k[0]), "dtype": k[1], "count": n, "bytes_each": sizes[k]}
                      for k, n in counts.most_common()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="lora,prefix-tuning,full-finetune,linear-probe")
    ap.add_argument("--layers", default="2,4", help="comma-separated: the per-layer share is their difference")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="run the decoder layers compiled (CUDA's default)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    results = []
    for strategy in args.strategies.split(","):
        for layers in map(int, args.layers.split(",")):
            try:
                results.append(inventory(strategy, layers, args.batch_size, args.seq_len, args.device, args.compile))
            except Exception as exc:  # one failure must not lose the others
                results.append({"strategy": strategy, "layers": layers, "error": f"{type(exc).__name__}: {exc}"})
            r = results[-1]
            print(strategy, layers, r.get("error") or f"saved {r['saved_bytes'] / 2**20:,.0f} MiB, "
                  f"peak above start {(r['peak_above_start_bytes'] or 0) / 2**20:,.0f} MiB", flush=True)
            with open(args.output, "w") as f:
                json.dump({"batch_size": args.batch_size, "seq_len": args.seq_len, "results": results}, f, indent=1)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
