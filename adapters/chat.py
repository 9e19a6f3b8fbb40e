"""Whether a run's prompts go through its tokenizer's chat template: recorded by training, read by generate.

A run trained on chat data (the ``messages`` shape of `adapters.data.SHAPES`) saw every example rendered
with its tokenizer's chat template, so it answers a prompt rendered the same way: one user turn, then the
generation prompt that opens the assistant's turn. The same question as plain text is not what it learned,
and an instruct model often ends its answer at once. Instruction data (prompt/completion, alpaca) is
joined as plain text, alpaca through its own template (`adapters.data.ALPACA_PROMPT`), never the chat
template, so a run trained on it, or on documents, continues plain text.

Training records which in the manifest's ``training["chat_template"]`` (`uses_chat_template`). A merged
checkpoint's record holds its run's training settings, and this key with them. `recorded_chat_template`
reads it; a run that records none (saved before the key existed, or imported from PEFT) continues plain
text, as it always did.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "chat_template"  # in the manifest's ``training``

# The data shape (a key of `adapters.data.SHAPES`) that training renders with the chat template.
CHAT_SHAPE = "messages"


def uses_chat_template(shape: str) -> bool:
    """Whether data of ``shape`` (a key of `adapters.data.SHAPES`) trains through the tokenizer's chat template."""
    return shape == CHAT_SHAPE


def recorded_chat_template(training: Mapping[str, Any]) -> bool:
    """Whether a run's recorded training settings say it trained through its chat template (False when silent)."""
    return training.get(KEY) is True
