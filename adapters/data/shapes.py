"""The shapes training data comes in, detected from a row's columns, and rows made into `Example`s.

A dataset has one shape, detected from its columns (`SHAPES`, first match wins):

- ``messages``: a chat in the OpenAI/Hugging Face format, a list of ``{"role", "content"}`` objects, rendered with
  the tokenizer's own chat template;
- ``prompt`` and ``completion``: two strings, joined as they are, the completion followed by the EOS token;
- ``instruction``, ``output`` and an optional ``input`` (alpaca): made into a prompt with the Alpaca template
  (`ALPACA_PROMPT`) and a completion;
- ``text``, with a ``label`` for sequence classification: documents, concatenated and cut into blocks for causal LM.

A `Row` is what a reader (`adapters.data.formats`, or a plugin's) gives: the row's values and where it is, so that
every error names the file and line or row.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .examples import DataError, Example

# Each shape by the columns that make it, in the order they are detected, so that a file with more columns than one
# shape needs is read as the richest (a chat file with a "text" column is a chat; alpaca files often carry "text").
SHAPES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}

# The Stanford Alpaca prompts, which alpaca data was written for.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. "
                          "Write a response that appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")


@dataclass
class Row:
    """One row of data as read: where it is ("FILE:LINE" or "NAME row N") and its values by column."""

    where: str
    values: Mapping[str, Any]


def as_row(where: str, values: Any) -> Row:
    """A `Row`, or DataError at ``where`` when ``values`` is not an object of columns (a JSON list, say)."""
    if not isinstance(values, Mapping):
        raise DataError(f'{where}: expected an object like {{"text": "..."}} or {{"prompt": "...", '
                        f'"completion": "..."}}, not {type(values).__name__}')
    return Row(where, values)


def examples_of(rows: list[Row]) -> tuple[str, list[Example]]:
    """The rows' shape and their examples; DataError for a row of another shape than the first."""
    shape, first, examples = "text", None, []
    for row in rows:
        this = _shape(row)
        if first is None:
            shape, first = this, row
        elif this != shape:
            raise DataError(f"{row.where}: a {this} example, but {first.where} is {shape}; use one shape for all "
                            "examples (split the file)")
        examples.append(_MAKE[this](row))
    return shape, examples


def _shape(row: Row) -> str:
    present = {k for k, v in row.values.items() if v is not None}
    for shape, columns in SHAPES.items():
        if all(c in present for c in columns):
            return shape
    for columns in SHAPES.values():
        missing = [c for c in columns if c not in present]
        if len(missing) < len(columns):
            have = ", ".join(f'"{c}"' for c in columns if c in present)
            raise DataError(f'{row.where}: has {have} but no "{missing[0]}"; add it (the shape needs '
                            f"{' and '.join(columns)}), or remove the row")
    found = ", ".join(sorted(map(str, row.values))) or "none"
    raise DataError(f'{row.where}: no "text" column, nor any other this can train on (found: {found}); add a "text" '
                    'column, or "prompt" and "completion", "instruction" and "output", or "messages"')


def _string(row: Row, key: str, required: bool = True) -> str:
    value = row.values.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f'{row.where}: "{key}" must be a string, not {type(value).__name__} {value!r:.40}')
    if required and not value.strip():
        raise DataError(f'{row.where}: empty "{key}"; fill it in or remove the row')
    return value


def _text_example(row: Row) -> Example:
    value = row.values["text"]
    if not isinstance(value, str):
        raise DataError(f'{row.where}: expected a string "text" field, not {type(value).__name__}; make it one')
    if not value.strip():
        raise DataError(f"{row.where}: empty text; fill it in or remove the line")
    label = row.values.get("label")
    # bool is a subclass of int, but `true` as a class name is almost
    # certainly a mistake, so only real strings and integers are accepted.
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        raise DataError(f'{row.where}: "label" must be a string or integer, got {label!r}')
    return Example(value, None if label is None else str(label), source=row.where)


def _prompt_completion_example(row: Row) -> Example:
    return Example(prompt=_string(row, "prompt", required=False), completion=_string(row, "completion"),
                   source=row.where)


def _alpaca_example(row: Row) -> Example:
    instruction, output = _string(row, "instruction"), _string(row, "output")
    extra = _string(row, "input", required=False)
    prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra.strip()
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
    return Example(prompt=prompt, completion=output, source=row.where)


def _messages_example(row: Row) -> Example:
    value = row.values["messages"]
    if not isinstance(value, list) or not value:
        raise DataError(f'{row.where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
                        f"objects, not {type(value).__name__} {value!r:.40}")
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f'{row.where}: message {i} must be an object with a string "role" and a string "content", '
                            f"not {message!r:.60}")
        # Columnar files give every message every key any message has, as None where it had none.
        messages.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DataError(f'{row.where}: no "assistant" message with content, so nothing to train on; add the '
                        "assistant's reply or remove the row")
    return Example(messages=messages, source=row.where)


_MAKE: dict[str, Callable[[Row], Example]] = {
    "messages": _messages_example, "prompt-completion": _prompt_completion_example, "alpaca": _alpaca_example,
    "text": _text_example,
}

