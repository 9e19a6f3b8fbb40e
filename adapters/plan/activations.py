"""What a training step keeps alive beyond the weights: the tensors the base saves for backward in
each layer family, what each layer works with while it runs, and the loss.

The model follows the tensors PyTorch saves in two layer families: Llama-style decoders (RMSNorm,
rotary attention with GQA through SDPA, a gated MLP) and BERT-style encoders (LayerNorm, attention
with dropout, GELU). It was checked tensor by tensor against ``torch.autograd.graph.saved_tensors_hooks``
on SmolLM2 and MiniLM.
"""
from __future__ import annotations

from .. import rules
from ..contract import ModelShape, RunShape


def layer_activations(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int = 0) -> int:
    """Bytes one layer of the base saves for backward, under a gradient flow."""
    if flow == "head":
        return 0
    return (_llama_layer if shape.family == "llama" else _bert_layer)(shape, run, flow, extra_tokens)


def _llama_layer(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int) -> int:
    n, e = run.tokens, run.compute_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    b, t = run.batch_size, run.seq_len
    s = t + extra_tokens  # key/value length
    masked = extra_tokens > 0 or run.task == "sequence-classification"  # padding masks in classification
    norms = 2 * (n * h * 4 + n * 4)  # RMSNorm keeps its fp32 input and the inverse RMS
    q_and_out = 2 * n * shape.q_width * e
    kv_heads = shape.num_heads if masked or shape.attention == "eager" else shape.num_kv_heads
    kv = 2 * b * s * kv_heads * shape.head_dim * e  # GQA runs natively in SDPA unless a mask is given
    if shape.attention == "eager":
        attention = q_and_out + kv + b * shape.num_heads * t * s * (4 + e)  # fp32 softmax and its cast
    else:
        attention = q_and_out + kv + b * shape.num_heads * t * 4  # the log-sum-exp
        if extra_tokens:
            attention += b * t * s * (4 if run.device == "cpu" else e)  # the prefix's explicit mask
    # gate (for SiLU's backward), SiLU's output and up (for the product's); SiLU's output is recomputed in backward
    # where the run recomputes its gated MLPs (adapters.engine.recompute_gated_mlps).
    mlp = (2 if run.recomputes_mlp else 3) * n * i * e
    saved = norms + attention + mlp
    if flow == "weights":  # linear inputs for weight gradients, and the norms' normalized input
        saved += 2 * n * h * e + 2 * n * h * e + n * i * e
    return saved


def _bert_attention_math(shape: ModelShape, run: RunShape) -> bool:
    """Whether SDPA takes its math path (scores materialized): on the CPU with attention dropout."""
    dropout = getattr(shape.config, "attention_probs_dropout_prob", 0.0) or 0.0
    return shape.attention == "eager" or (run.device == "cpu" and dropout > 0)


def _bert_layer(shape: ModelShape, run: RunShape, flow: str, extra_tokens: int) -> int:
    n, e, m = run.tokens, run.compute_bytes, run.dropout_mask_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    scores = run.batch_size * shape.num_heads * run.seq_len * (run.seq_len + extra_tokens)
    if _bert_attention_math(shape, run):  # q, k, v; softmax output, dropout mask and output
        attention = 3 * n * h * e + scores * (2 * e + m)
    else:  # q, k, v, output and the log-sum-exp
        attention = 4 * n * h * e + run.batch_size * shape.num_heads * run.seq_len * 4
    dropout = m if (getattr(shape.config, "hidden_dropout_prob", 0.0) or 0.0) > 0 else 0
    # Each residual block: its dropout's mask, then LayerNorm's fp32 input with mean and inverse std.
    blocks = 2 * (n * h * dropout + n * h * 4 + 2 * n * 4)
    saved = attention + blocks + n * i * e  # GELU keeps its input
    if flow == "weights":  # inputs of query/key/value, the attention output, intermediate and output
        saved += 3 * n * h * e + n * i * e
    return saved


def outside_layers(shape: ModelShape, run: RunShape, flow: str) -> int:
    """Saved outside the layers, before the loss: the final norm, the head, BERT's embeddings and pooler."""
    n, h, e = run.tokens, shape.hidden_size, run.compute_bytes
    if shape.family == "bert":
        saved = 3 * run.batch_size * h * 4  # the pooler's and the classifier's small inputs
        if flow == "weights":  # the embeddings' LayerNorm and dropout, and the pooler's view of the last layer
            saved += n * h * 4 + 2 * n * 4 + n * h * run.dropout_mask_bytes + n * h * e
        return saved
    if flow == "head":
        return n * h * e  # the trainable head's input
    saved = n * h * 4 + n * 4  # the final RMSNorm
    if flow == "weights":
        saved += n * h * e * 2  # its normalized input and the head's input
    return saved


def transients(shape: ModelShape, run: RunShape) -> tuple[int, int]:
    """(forward, backward) working sets of one layer: what exists only while it runs."""
    n, e, h, i = run.tokens, run.compute_bytes, shape.hidden_size, shape.intermediate_size
    if shape.family == "llama":  # the MLP: gate or its gradient, up, SiLU's output and the product
        return 3 * n * i * e + 3 * n * h * e, 3 * n * i * e
    scores = run.batch_size * shape.num_heads * run.seq_len * run.seq_len * e
    attention = 3 * scores if _bert_attention_math(shape, run) else 4 * n * h * e
    return max(attention, 2 * n * i * e) + 2 * n * h * e, max(attention, 2 * n * i * e)


def loss(shape: ModelShape, run: RunShape, flow: str) -> int:
    """Bytes the loss adds at its backward, the loss's peak, beyond the activations.

    The model's own loss (``loss_chunk`` 0, and classification): causal-lm's fp32 log-softmax over the
    vocabulary is saved; its backward briefly holds two more buffers of that size, the gradients of the
    log-softmax and of the logits.

    The chunked loss (`adapters.loss`) holds those three for one chunk's tokens at a time, recomputed in
    backward, beside what the whole batch keeps: the final hidden states, which the chunks keep for their
    recomputation (a frozen head's forward keeps nothing: counted here for the "inputs" flow, by
    `outside_layers` for the others), and the gradients of the hidden states of the chunks done so far (none
    for the "head" flow, whose base records no graph).
    A trained head (the "head" and "weights" flows): on the CPU the fused chunks keep one gradient of the
    head's weight and add each chunk's share into it. On CUDA the head is a float32 master weight under bf16
    compute, so the chunks run through the head module: each makes a weight gradient while its logits'
    gradient still exists (and its bf16 copy before the cast to the master weight's dtype); from the second
    chunk on, beside the gradient the chunks before it made, and a transient copy as it is added (measured on
    the CPU before the fused chunks: three of the head's size at once).
    """
    n, v, h, e = run.tokens, shape.vocab_size, shape.hidden_size, run.compute_bytes
    if run.task != "causal-lm":
        return run.batch_size * shape.num_labels * 12
    chunk = rules.loss_chunk(run.loss_chunk)
    if not chunk:
        return 3 * n * v * 4
    c = min(chunk, n)
    softmax = 3 * c * v * 4
    held = 0 if flow == "head" else (n - c) * h * e  # a probe's base makes no graph: no gradient to its hidden states
    held += n * h * e if flow == "inputs" else 0
    if flow in ("head", "weights"):
        if run.device == "cpu":
            # A plain linear head in the compute dtype goes through the fused chunks (`_LinearCrossEntropy`), which
            # add each chunk's share into one gradient of the head's weight, beside the chunk's logits.
            softmax += v * h * 4
        else:  # a float32 master weight under bf16 compute: the checkpointed chunks through the head module
            head_gradients = c * v * 4 + (3 if c < n else 1) * v * h * 4 + v * h * 2
            softmax = max(softmax, head_gradients)
    return softmax + held
