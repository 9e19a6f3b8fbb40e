"""Hear what a trained causal-LM run says: ``adapters generate``.

`generate` yields the model's continuation of a prompt piece by piece, as the tokens arrive
(transformers' ``generate`` runs in a thread and hands text over through a `TextIteratorStreamer`,
a word or so at a time; prefix tuning decodes with a loop of its own, see `uses_own_loop`).
Decoding is greedy by default, and sampled with a temperature above 0 (nucleus sampling with
``top_p``, seeded, so a seed gives the same text again). ``chat`` renders
the prompt as one user message with the tokenizer's own chat template, with the generation prompt
that opens the assistant's turn; by default (``chat=None``) a run renders it as it was trained: through
the chat template when it trained on chat data, as plain text otherwise (`adapters.chat`).

A generation that yields no text (an instruct model given a bare question often ends its answer at its
first token) raises `NothingGenerated` once it ends, naming why and the other rendering to try.

``base=True`` gives the base model's answer instead, to compare. For a PEFT strategy (LoRA, QLoRA,
prefix tuning) that is the same model with its adapter disabled (PEFT's ``disable_adapter``); a
strategy that changes the base's own weights or modules (full fine-tuning, the linear probe, most
plugins) gets its base loaded again. `Generator.base_source` says which.

RUN is a run directory or a merged checkpoint (a plain transformers folder), as `adapters.evaluation`
opens them; a sequence-classification one is refused before anything loads.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .chat import recorded_chat_template
from .errors import AdaptersError
from .evaluation import Opened, RunInfo, inspect_run, open_run

DEFAULT_MAX_NEW_TOKENS = 64


class NothingGenerated(AdaptersError):
    """A generation ended without any text: its message says why and what to try."""


def check_generates(info: RunInfo) -> None:
    """Refuse what cannot generate text: a sequence-classification run or checkpoint."""
    if info.task != "causal-lm":
        raise AdaptersError(f"{info.path}: a {info.task} {info.kind} predicts labels and cannot generate text; "
                            f"generate needs a causal-lm run. Score it with `adapters eval {info.path}` instead.")


class Generator:
    """A run or checkpoint loaded for generation, with its base model for comparison (loaded when first asked)."""

    def __init__(self, run: str | Path | RunInfo | Opened, device: Any = None) -> None:
        info = run.info if isinstance(run, Opened) else run if isinstance(run, RunInfo) else inspect_run(run)
        check_generates(info)
        self.opened = run if isinstance(run, Opened) else open_run(info, device)
        self.info = info
        self._base: Any = None  # a reloaded base model, for strategies that change the base itself

    @property
    def chat_default(self) -> bool:
        """Whether a prompt goes through the chat template unless told: as the run was trained (`adapters.chat`)."""
        return recorded_chat_template(self.info.training)

    @property
    def uses_peft(self) -> bool:
        from peft import PeftModel

        return isinstance(self.opened.model, PeftModel)

    @property
    def base_source(self) -> str:
        """How `generate` with ``base=True`` gets the base's answer, in words."""
        if self.uses_peft:
            return "adapter disabled"
        return f"reloaded {self._base_name()}"

    def _base_name(self) -> str:
        if self.info.base_model is None:
            raise AdaptersError(f"{self.info.path}: a checkpoint that does not name the base it was made from, so "
                                "there is no base to compare with. Drop --compare-base, or give the run directory.")
        return self.info.base_model

    def _base_model(self) -> Any:
        if self._base is None:
            from .loading import load_base_model

            opened = self.opened
            device = next(opened.model.parameters()).device
            self._base = load_base_model(self._base_name(), self.info.quantization, "causal-lm", device=device).model
            self._base.eval()
        return self._base

    def prompt_ids(self, prompt: str, chat: bool | None = None) -> list[int]:
        """The token ids of ``prompt``: as plain text, or (``chat``) as one user turn of the chat template;
        ``chat=None``: as the run was trained (`chat_default`)."""
        tokenizer = self.opened.tokenizer
        check_prompt(prompt)
        if not (self.chat_default if chat is None else chat):
            return list(tokenizer.encode(prompt, add_special_tokens=True))
        if not getattr(tokenizer, "chat_template", None):
            why, fix = (("--chat cannot render", "Drop --chat") if chat else
                        ("the run, trained on chat data, cannot render", "Give --no-chat"))
            raise AdaptersError(f"{self.info.path}: its tokenizer ({type(tokenizer).__name__}) has no chat template, "
                                f"so {why} the prompt as a conversation. {fix} to continue the prompt as plain text.")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def generate(self, prompt: str, *, chat: bool | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, base: bool = False) -> Iterator[str]:
        """The continuation of ``prompt``, yielded piece by piece as it is generated (see the module's docstring).

        ``chat=None`` renders the prompt as the run was trained (`chat_default`). Raises `NothingGenerated` at
        the end when no piece held any text."""
        import torch

        check_decoding(max_new_tokens, temperature, top_p)
        chat = self.chat_default if chat is None else chat
        ids = self.prompt_ids(prompt, chat)
        model = self._base_model() if base and not self.uses_peft else self.opened.model
        device = next(model.parameters()).device
        input_ids = torch.tensor([ids], device=device)
        sampling = temperature > 0
        kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "max_new_tokens": max_new_tokens, "do_sample": sampling,
                  **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sampling else {}),
                  **_special_ids(self.opened.tokenizer)}
        if sampling:
            torch.manual_seed(seed)
        disabled = self.opened.model.disable_adapter() if base and self.uses_peft else contextlib.nullcontext()
        generated: list[int] = []
        said = False
        with disabled, torch.no_grad():
            for piece in _stream(model, self.opened.tokenizer, kwargs, generated):
                said = said or not piece.isspace()
                yield piece
        if not said:
            raise NothingGenerated(self._silence(generated, chat, base))

    def _silence(self, generated: list[int], chat: bool, base: bool) -> str:
        """Why a generation gave no text, and the other rendering of the prompt to try, in one line."""
        tokenizer = self.opened.tokenizer
        who = f"the base model ({self.base_source})" if base else f"{self.info.path} ({self.info.describe()})"
        if generated and generated[0] == getattr(tokenizer, "eos_token_id", None):
            end = tokenizer.decode(generated[:1])
            why = f"the model ended its answer at once (its first token was the end of text, {end!r})"
        else:
            why = f"its {len(generated)} new tokens decode to no text (only special tokens or whitespace)"
        if chat:
            fix = "The prompt went through the chat template; give --no-chat to continue it as plain text."
        elif getattr(tokenizer, "chat_template", None):
            fix = "The prompt went in as plain text; give --chat to send it as a user turn through the chat template."
        else:
            fix = "Give a longer prompt, or sample with --temperature 0.7."
        return f"{who} generated no text: {why}. {fix}"


def generate(run: str | Path | Opened | Generator, prompt: str, **options: Any) -> Iterator[str]:
    """The continuation of ``prompt`` by a run or checkpoint, piece by piece; ``options`` as `Generator.generate`.

    ``run`` is a path, an `Opened` run, or a `Generator` (to generate more than once without loading again).
    """
    generator = run if isinstance(run, Generator) else Generator(run)
    return generator.generate(prompt, **options)


def check_prompt(prompt: str) -> None:
    if not prompt:
        raise AdaptersError("--prompt is empty. Give the text to continue, e.g. --prompt 'The capital of France'.")


def check_decoding(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise AdaptersError(f"--max-new-tokens must be at least 1, not {max_new_tokens}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise AdaptersError(f"--temperature {temperature}: must be 0 (greedy) or more (sampled), e.g. 0.7.")
    if not 0 < top_p <= 1:  # also false for NaN
        raise AdaptersError(f"--top-p {top_p}: must be above 0 and at most 1, e.g. 0.9.")


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """The pad and end-of-text ids generation needs, from the tokenizer."""
    ids = {"pad_token_id": getattr(tokenizer, "pad_token_id", None),
           "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
    return {k: v for k, v in ids.items() if v is not None}


def uses_own_loop(model: Any) -> bool:
    """Whether ``model`` decodes with `_decode_without_cache` instead of transformers' ``generate``.

    PEFT's prompt learning (prefix tuning) hands its trained prefix to the base as a key/value cache;
    transformers 5's ``generate`` passes a cache of its own beside it, and the base keeps that one
    ("ignoring deprecated past_key_values"), so the prefix would be silently dropped and the text be
    the base's. Such a model decodes with full forward passes instead: no cache, slower, exact.
    """
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _stream(model: Any, tokenizer: Any, kwargs: dict[str, Any], generated: list[int]) -> Iterator[str]:
    """``model.generate(**kwargs)`` (or `_decode_without_cache`) in a thread, its text yielded as it
    comes (and its new token ids appended to ``generated``); its error raised here. Closing the
    iterator early stops the generation at the next token."""
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
        TextIteratorStreamer,
    )

    stop = threading.Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **_: Any):
            return stop.is_set()

    known = len(tokenizer) if hasattr(tokenizer, "__len__") else getattr(tokenizer, "vocab_size", None)

    class _Decodable(LogitsProcessor):
        """Never an id the tokenizer cannot decode (the rows a model's embedding has beyond its vocabulary)."""

        def __call__(self, input_ids, scores):
            if known is not None and scores.shape[-1] > known:
                scores[:, known:] = float("-inf")
            return scores

    class _Streamer(TextIteratorStreamer):
        def put(self, value):
            if not (self.skip_prompt and self.next_tokens_are_prompt):
                generated.extend(value.reshape(-1).tolist())
            super().put(value)

    decode = {"skip_special_tokens": True} if hasattr(tokenizer, "convert_ids_to_tokens") else {}
    streamer = _Streamer(tokenizer, skip_prompt=True, **decode)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if uses_own_loop(model):
                with warnings.catch_warnings():  # PEFT passes the prefix the way transformers 5 deprecates
                    warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
                    _decode_without_cache(model, kwargs, streamer, stop, _Decodable())
            else:
                model.generate(**kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
                               logits_processor=LogitsProcessorList([_Decodable()]))
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
            streamer.on_finalized_text("", stream_end=True)

    thread = threading.Thread(target=run, name="adapters-generate", daemon=True)
    thread.start()
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]


def _decode_without_cache(model: Any, kwargs: dict[str, Any], streamer: Any, stop: threading.Event,
                          decodable: Any) -> None:
    """Greedy or sampled decoding by a full forward pass per token, as ``generate`` decodes (the same
    temperature and top-p warpers, ``torch.multinomial`` on the global generator), without a cache."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    ids = kwargs["input_ids"]
    processors = LogitsProcessorList([decodable])
    if kwargs["do_sample"]:
        processors += [TemperatureLogitsWarper(kwargs["temperature"]), TopPLogitsWarper(kwargs["top_p"])]
    eos = kwargs.get("eos_token_id")
    streamer.put(ids.cpu())  # the prompt, which the streamer skips
    for _ in range(kwargs["max_new_tokens"]):
        if stop.is_set():
            break
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :].float()
        scores = processors(ids, logits)
        if kwargs["do_sample"]:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, token], dim=-1)
        streamer.put(token[0].cpu())
        if eos is not None and int(token) == eos:
            break
    streamer.end()
