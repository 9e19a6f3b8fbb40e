# Verbatim copy of /work/shared/anchors/raw_stack.py (../shared/anchors/ beside the checkout), the plain-stack reference; edit it there, not here.
# ruff: noqa
"""Reference measurements of the plain stack: transformers + peft + bitsandbytes, hand-written loop.

No project code. For each variant it measures peak CUDA memory and median step time on a
random-init model of a published shape (no download needed), so the project's own numbers can be
set beside the plain stack a user would otherwise write, in the same run on the same GPU.

Variants:
  full, lora, qlora, prefix, linear_probe   the usual recipes (qlora = prepare_model_for_kbit_training
                                            then LoRA; note it leaves the model in eval mode, so
                                            gradient checkpointing silently stays off)
  qlora_gc, qlora_gc_train                  the recipe with checkpointing requested / actually on
  lora_gc, qlora_lean, qlora_lean_gc        no fp32 upcast of frozen modules; train mode; GC on/off
  *_cce                                     loss computed in checkpointed token chunks, so the full
                                            [tokens x vocab] logits never exist at once
  *_cce_compiled                            the same, with the decoder compiled by torch.compile

Usage: python raw_stack.py --shape llama-1b [--only lora,qlora] [--batch 8 --seq 512]
Writes anchor-<shape>.json into --out (default $OUT or the temp dir).
"""
import argparse, gc, json, os, sys, tempfile, time
import torch

def log(*a):
    print(*a, flush=True)

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="llama-1b")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=512)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
ap.add_argument("--only", default="")
args = ap.parse_args()

import transformers, peft, accelerate
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, BitsAndBytesConfig
from peft import LoraConfig, PrefixTuningConfig, get_peft_model, prepare_model_for_kbit_training
try:
    import bitsandbytes as bnb
    bnb_version = bnb.__version__
except Exception as e:  # noqa
    bnb_version = f"unavailable: {e!r}"

cuda = torch.cuda.is_available()
dev = "cuda" if cuda else "cpu"
dtype = torch.bfloat16 if cuda else torch.float32
env = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
           accelerate=accelerate.__version__, bitsandbytes=bnb_version,
           gpu=torch.cuda.get_device_name(0) if cuda else "cpu")
log(json.dumps(env))

SHAPES = {
    # Llama-3.2-1B's published shape
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True,
                     rope_theta=500000.0),
    # SmolLM2-135M's published shape
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=True),
}
cfg = LlamaConfig(**SHAPES[args.shape])
cfg._attn_implementation = "sdpa"

peak_flops = None
if cuda:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10): a @ b
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
    peak_flops = 2 * 8192**3 / dt
    log(f"bf16 8192^3 matmul: {peak_flops/1e12:.0f} TFLOP/s")
    del a, b

ckpt = os.path.join(tempfile.gettempdir(), "anchor-ckpt-" + args.shape)
torch.manual_seed(0)
base = LlamaForCausalLM(cfg).to(dtype)
n_params = sum(p.numel() for p in base.parameters())
base.save_pretrained(ckpt)
del base; gc.collect()
log(f"params {n_params/1e6:.1f}M saved")

def load(quant=None, cls=LlamaForCausalLM):
    kw = dict(dtype=dtype)
    if quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if quant == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if cls is LlamaForSequenceClassification:
        kw["num_labels"] = 2
    m = cls.from_pretrained(ckpt, device_map={"": 0} if cuda else None, **kw)
    if cls is LlamaForSequenceClassification:
        m.config.pad_token_id = 0
    return m

def strat_full():
    m = load(); m.train(); return m
def strat_lora():
    m = load()
    return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
def strat_qlora(gc_on=False):
    m = load("nf4")
    m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=gc_on)
    return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
def strat_qlora_gc():
    return strat_qlora(True)
def strat_prefix():
    m = load()
    return get_peft_model(m, PrefixTuningConfig(num_virtual_tokens=32, task_type="CAUSAL_LM"))
def strat_probe():
    m = load(cls=LlamaForSequenceClassification)
    for n, p in m.named_parameters():
        p.requires_grad = n.startswith("score")
    return m

def _lean(quant, gc_on):
    m = load(quant)
    if gc_on:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    m.train()
    return m
def strat_lora_gc(): return _lean(None, True)
def strat_qlora_lean(): return _lean("nf4", False)
def strat_qlora_lean_gc(): return _lean("nf4", True)
def strat_qlora_gc_train():
    m = strat_qlora(True); m.train(); return m

import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

def _ce_chunk(h, w, y):
    return F.cross_entropy((h @ w.t()).float(), y, reduction="sum", ignore_index=-100)

class ChunkedCE(torch.nn.Module):
    """Wraps a causal LM: loss computed over token chunks with recomputation, never the full logits."""
    def __init__(self, m, chunk=1024):
        super().__init__(); self.m = m; self.chunk = chunk
        inner = m.get_base_model() if hasattr(m, "get_base_model") else m
        self.decoder = inner.model; self.head = inner.lm_head
    def forward(self, input_ids, labels):
        h = self.decoder(input_ids=input_ids).last_hidden_state[:, :-1].reshape(-1, self.decoder.config.hidden_size)
        y = labels[:, 1:].reshape(-1)
        tot = 0.0
        for i in range(0, h.shape[0], self.chunk):
            tot = tot + checkpoint(_ce_chunk, h[i:i + self.chunk], self.head.weight, y[i:i + self.chunk], use_reentrant=False)
        class O: pass
        o = O(); o.loss = tot / y.numel(); return o

def strat_full_cce():
    return ChunkedCE(strat_full())
def strat_lora_cce(): return ChunkedCE(_lean(None, False))
def strat_lora_gc_cce(): return ChunkedCE(_lean(None, True))
def strat_qlora_cce(): return ChunkedCE(_lean("nf4", False))
def strat_qlora_gc_cce(): return ChunkedCE(_lean("nf4", True))

def _compiled(fn):
    def make():
        m = fn()
        m.decoder.compile()  # compile the decoder in place; the chunked loss stays eager
        return m
    return make
strat_lora_cce_compiled = _compiled(strat_lora_cce)
strat_qlora_cce_compiled = _compiled(strat_qlora_cce)
strat_full_cce_compiled = _compiled(strat_full_cce)

STRATS = dict(lora_cce_compiled=strat_lora_cce_compiled, qlora_cce_compiled=strat_qlora_cce_compiled, full_cce_compiled=strat_full_cce_compiled, full_cce=strat_full_cce, lora_cce=strat_lora_cce, lora_gc_cce=strat_lora_gc_cce, qlora_cce=strat_qlora_cce, qlora_gc_cce=strat_qlora_gc_cce, lora_gc=strat_lora_gc, qlora_lean=strat_qlora_lean, qlora_lean_gc=strat_qlora_lean_gc, qlora_gc_train=strat_qlora_gc_train, full=strat_full, lora=strat_lora, qlora=strat_qlora, qlora_gc=strat_qlora_gc, prefix=strat_prefix, linear_probe=strat_probe)
if args.only:
    STRATS = {k: v for k, v in STRATS.items() if k in args.only.split(",")}

results = []
for name, fn in STRATS.items():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        m = fn()
        load_s = time.perf_counter() - t0
        mem_model = torch.cuda.memory_allocated() if cuda else 0
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(dev)
        labels = ids if name != "linear_probe" else torch.randint(0, 2, (args.batch,), generator=g).to(dev)
        times = []
        for i in range(args.warmup + args.steps):
            if cuda: torch.cuda.synchronize()
            t = time.perf_counter()
            out = m(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
            if cuda: torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
        times.sort()
        med = times[len(times) // 2]
        toks = args.batch * args.seq / med
        # Model FLOPs per token: full FT 6N; frozen-weight strategies skip the weight-gradient matmul (~4N);
        # a linear probe runs the frozen base forward only (~2N).
        fl_per_tok = (6 if name.startswith("full") else 2 if name == "linear_probe" else 4) * n_params
        r = dict(strategy=name, shape=args.shape, params=n_params, trainable=trainable, batch=args.batch, seq=args.seq,
                 load_s=round(load_s, 2), step_s_median=round(med, 4), step_s_min=round(times[0], 4),
                 tokens_per_s=round(toks), model_mem_gib=round(mem_model / 2**30, 3),
                 peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                 mfu=round(fl_per_tok * toks / peak_flops, 4) if peak_flops else None, loss=round(out.loss.item(), 4))
    except Exception as e:  # record and continue
        import traceback; traceback.print_exc()
        r = dict(strategy=name, shape=args.shape, error=repr(e)[:300])
    log(json.dumps(r))
    results.append(r)
    m = opt = out = None
    gc.collect()

with open(os.path.join(args.out, f"anchor-{args.shape}.json"), "w") as f:
    json.dump(dict(env=env, peak_bf16_flops=peak_flops, results=results), f, indent=1)
