"""Examples into token tensors: documents cut into blocks, labelled classification rows, and instruction and chat
examples made into (ids, labels) rows, one a row (`padded`) or several a row (`packed`).

`adapters.data` reads a user's data into `Example`s; `make_batches` turns them into the rows a training session
draws its batches from, picking among these by the data's shape. Instruction and chat examples train on their
completions only: every other token's label is `IGNORE_INDEX`, which the loss skips, unless ``train_on_prompt``.
`real_tokens` counts a batch's tokens, its padding left out, as train and bench report them.
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .data import DataError, Example
from .rules import IGNORE_INDEX

if TYPE_CHECKING:
    from .loading import BaseModel


class ExamplesSkipped(UserWarning):
    """Examples whose prompt fills ``--seq-len`` have nothing left to train on and are left out."""


class Tokenizer(Protocol):
    """The small part of a Hugging Face tokenizer that this module uses (chat data also needs
    ``chat_template`` and ``apply_chat_template``)."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def causal_lm_blocks(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenize `texts` into a [n_blocks, seq_len] LongTensor for causal LM training.

    Texts are concatenated, each followed by the EOS token when the tokenizer
    has one (so the model learns where documents end), and cut into
    consecutive blocks; the remainder shorter than a block is dropped.
    """
    _check_seq_len(seq_len)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if eos is not None:
            ids.append(eos)
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise DataError(
            f"the data has {len(ids)} tokens, fewer than --seq-len {seq_len}; "
            f"pass a smaller --seq-len (at most {len(ids)}) or use more text"
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def classification_batch_tensors(
    examples: Sequence[Example], labels: Sequence[str], tokenizer: Tokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize labelled examples into (input_ids, attention_mask, label_ids).

    Each text is truncated to `seq_len` tokens and right-padded with the
    tokenizer's pad token (falling back to EOS, then 0); the attention mask is
    1 on real tokens. `label_ids` indexes into `labels`.
    """
    _check_seq_len(seq_len)
    pad = pad_id(tokenizer)
    label_index = {name: i for i, name in enumerate(labels)}
    n = len(examples)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    label_ids = torch.empty(n, dtype=torch.long)
    for row, ex in enumerate(examples):
        if ex.label not in label_index:
            known = ", ".join(labels) or "none"
            raise DataError(
                f"example {row} has label {ex.label!r}, which is not one of the "
                f"dataset's labels ({known}); relabel it or add the label to the training data"
            )
        ids = tokenizer.encode(ex.text, add_special_tokens=False)[:seq_len]
        if not ids:
            # An all-padding row has nothing to pool over and would give a
            # meaningless (or NaN) prediction, so refuse it up front.
            raise DataError(f"example {row} ({ex.text[:40]!r}) encodes to no tokens; remove it from the data")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        label_ids[row] = label_index[ex.label]
    return input_ids, attention_mask, label_ids


def pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad token, falling back to EOS, then 0."""
    for pad in (getattr(tokenizer, "pad_token_id", None), tokenizer.eos_token_id):
        if pad is not None:
            return pad
    return 0


Row = tuple[list[int], list[int]]  # an example's token ids and labels


def is_instruction(examples: Sequence[Example]) -> bool:
    """Whether ``examples`` are instruction or chat examples (trained on their completions), not documents."""
    return bool(examples) and (examples[0].prompt is not None or examples[0].messages is not None)


def example_tokens(example: Example, tokenizer: Tokenizer, train_on_prompt: bool = False) -> Row:
    """The token ids of one instruction or chat example, and their labels, untruncated.

    A label is the token's id where the loss trains on it (the completion and the EOS token after it; each
    assistant turn of a chat, its end-of-turn tokens included) and `IGNORE_INDEX` elsewhere, unless
    ``train_on_prompt``. The parts are tokenized one by one and joined, so the labels split exactly at their border.
    """
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _segments(example, tokenizer):
        piece = tokenizer.encode(text, add_special_tokens=False) if text else []
        ids += piece
        labels += piece if trained or train_on_prompt else [IGNORE_INDEX] * len(piece)
    if example.messages is None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def instruction_rows(examples: Sequence[Example], tokenizer: Tokenizer, seq_len: int,
                     train_on_prompt: bool = False) -> list[Row]:
    """Each example's (ids, labels) (`example_tokens`), cut to its first `seq_len` tokens.

    An example left with no label to train on (its prompt fills `seq_len`) is left out, and an `ExamplesSkipped`
    warning counts them; DataError when none is left.
    """
    _check_seq_len(seq_len)
    rows: list[Row] = []
    for example in examples:
        ids, labels = example_tokens(example, tokenizer, train_on_prompt)
        ids, labels = ids[:seq_len], labels[:seq_len]
        # The first label is never predicted (nothing comes before it), so it cannot be the one trained token.
        if any(label != IGNORE_INDEX for label in labels[1:]):
            rows.append((ids, labels))
    skipped = len(examples) - len(rows)
    if not rows:
        raise DataError(f"none of the {len(examples)} examples has a completion token within the first --seq-len "
                        f"{seq_len} tokens (their prompts fill them); raise --seq-len")
    if skipped:
        warnings.warn(f"{skipped} of {len(examples)} examples have prompts of --seq-len {seq_len} tokens or more, "
                      "which leaves no completion token to train on, so they are left out; raise --seq-len to keep "
                      "them.", ExamplesSkipped, stacklevel=2)
    return rows


def padded(rows: Sequence[Row], seq_len: int, pad: int) -> dict[str, torch.Tensor]:
    """One example a row, right-padded to `seq_len`: input_ids, attention_mask and labels, each [n, seq_len]."""
    n = len(rows)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, seq_len), dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(row_labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed(rows: Sequence[Row], seq_len: int, pad: int) -> dict[str, torch.Tensor]:
    """Examples packed into rows of `seq_len`: input_ids, position_ids and labels, each [n_rows, seq_len].

    Rows are filled best-fit, longest example first (deterministic: ties keep their order). Position ids restart
    at 0 at each example, and at the padding that ends a row; with them and no attention mask, transformers
    attends within each example only (``find_packed_sequence_indices``), as if each had a row of its own. Each
    example's first label is `IGNORE_INDEX`, so no example is trained to follow the one before it.
    """
    bins: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in sorted(range(len(rows)), key=lambda i: -len(rows[i][0])):
        need = len(rows[i][0])
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            bins.append([i])
            free, row = seq_len - need, len(bins) - 1
        else:
            free, row = room.pop(at)
            bins[row].append(i)
            free -= need
        bisect.insort(room, (free, row))
    input_ids = torch.full((len(bins), seq_len), pad, dtype=torch.long)
    position_ids = torch.zeros((len(bins), seq_len), dtype=torch.long)
    labels = torch.full((len(bins), seq_len), IGNORE_INDEX, dtype=torch.long)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            ids, row_labels = rows[i]
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(ids))
            labels[r, start + 1:end] = torch.tensor(row_labels[1:], dtype=torch.long)
            start = end
        position_ids[r, start:] = torch.arange(seq_len - start)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def _segments(example: Example, tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """An example's text in parts, each with whether the loss trains on it."""
    if example.messages is None:
        return [(example.prompt or "", False), (example.completion or "", True)]
    return chat_segments(example.messages, tokenizer, example.source)


def chat_segments(messages: list[dict[str, Any]], tokenizer: Any, where: str) -> list[tuple[str, bool]]:
    """A chat rendered by the tokenizer's chat template, in parts, each assistant turn's marked as trained.

    Each assistant turn is what rendering the chat up to and including it adds to rendering the chat before it
    with the generation prompt: its content and its end-of-turn tokens. This needs no ``{% generation %}`` markers
    in the template (SmolLM2's has none), only that a template renders a chat's beginning as the whole chat begins.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat messages are rendered with the model's chat template, and this model's "
                        "tokenizer has none; use prompt/completion data, or a model that has one (an -Instruct model)")

    def render(turns: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2's TemplateError from the template's raise_exception, among others
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            roles = ", ".join(str(m.get("role")) for m in turns)
            raise DataError(f"{where}: the model's chat template refuses this chat (roles: {roles}): {reason}; "
                            "fix the order of its roles") from None
        return text

    whole = render(messages)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], generation_prompt=True), render(messages[: i + 1])
        if not (whole.startswith(through) and through.startswith(before) and len(before) >= done):
            raise DataError(f"{where}: the model's chat template renders the chat's beginning differently from the "
                            f"whole chat (at message {i + 1}), so its assistant turns cannot be told apart; pass "
                            "--train-on-prompt, or use prompt/completion data")
        segments += [(whole[done:len(before)], False), (whole[len(before):len(through)], True)]
        done = len(through)
    segments.append((whole[done:], False))
    return segments


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise DataError(f"--seq-len must be at least 1, got {seq_len}")


class TokenRows(torch.utils.data.Dataset):
    """Rows of equal-length tensors; ``trim``: rows are right-padded, and `collate` cuts a batch's columns of
    padding alone (a DataLoader's ``collate_fn``)."""

    def __init__(self, trim: bool = False, **tensors: torch.Tensor) -> None:
        self.tensors = tensors
        self.trim = trim

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def collate(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
        if self.trim:  # a batch of short examples computes only as long as its longest
            width = int(batch["attention_mask"].sum(dim=1).max())
            batch = {k: v[:, :width] for k, v in batch.items()}
        return batch


def make_batches(examples: list[Example], base: BaseModel, seq_len: int, what: str, *,
                 packing: bool = False, train_on_prompt: bool = False) -> TokenRows:
    """Tokenized rows for the base's task and the examples' shape (`adapters.data`).

    Documents: concatenated blocks of ``seq_len``. Instruction and chat examples: labels on the completions
    alone (all the tokens with ``train_on_prompt``), one example a right-padded row, or with ``packing`` several a
    row, attention kept within each example by position ids that restart. Labelled text: one padded row each.
    """
    try:
        if base.task != "causal-lm":
            ids, mask, labels = classification_batch_tensors(examples, base.labels, base.tokenizer, seq_len)
            return TokenRows(input_ids=ids, attention_mask=mask, labels=labels)
        if not is_instruction(examples):
            blocks = causal_lm_blocks([e.text for e in examples], base.tokenizer, seq_len)
            return TokenRows(input_ids=blocks, labels=blocks)
        rows = instruction_rows(examples, base.tokenizer, seq_len, train_on_prompt)
        if packing:
            check_packing(base)
            return TokenRows(**packed(rows, seq_len, pad_id(base.tokenizer)))
        return TokenRows(trim=True, **padded(rows, seq_len, pad_id(base.tokenizer)))
    except DataError as exc:
        raise DataError(f"{what} split: {exc}") from None


def check_packing(base: BaseModel) -> None:
    """Packed rows need a model that takes position ids: without them attention would cross from one example
    into the next. (They also need the model to run without a key/value cache, as a training session sets it:
    with one, transformers does not look for packed rows.)"""
    import inspect

    if "position_ids" not in inspect.signature(base.model.forward).parameters:
        raise DataError(f"--model {base.name}: its forward takes no position ids, which keep packed "
                        "examples apart; pass --no-packing")


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
    """The real tokens of ``batch``, padding left out, on its device (no host synchronisation).

    Padded rows say theirs by the attention mask. Packed rows (`packed`: position ids, no mask) end in padding
    whose position ids restart at 0 and whose labels are all ignored, where every real example trains at least one
    label; document blocks have no padding."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids, positions, labels = batch["input_ids"], batch.get("position_ids"), batch.get("labels")
    if positions is None or labels is None:
        return ids.numel()
    columns = torch.arange(ids.shape[1], device=ids.device)
    last = torch.where(positions == 0, columns, 0).amax(dim=1, keepdim=True)  # where each row's last segment starts
    tail = columns >= last
    padding = tail & ~((labels != IGNORE_INDEX) & tail).any(dim=1, keepdim=True)  # a last segment that trains nothing
    return ids.numel() - padding.sum()
