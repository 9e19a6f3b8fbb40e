"""Datasets for training: from a user's data to `Example`s, split into train and held-out parts.

A dataset has one shape, detected from its columns (`SHAPES`): a chat's ``messages``; ``prompt`` and
``completion``; ``instruction``, ``output`` and an optional ``input`` (alpaca); or ``text``, with a
``label`` for sequence classification (`adapters.data.shapes`).

`adapters.batches` turns examples into token tensors. Instruction and chat data train on the completion only (every
assistant turn, for a chat): the other tokens get the label `adapters.rules.IGNORE_INDEX`, which the loss skips, unless
``train_on_prompt``. Held-out examples are always masked so, so the held-out loss is the loss on completions. An
example longer than ``--seq-len`` is cut to it from the end; one whose prompt leaves no completion token is left out
with a warning (`adapters.batches.ExamplesSkipped`), and no example left is an error. Each example fills one row,
right-padded (`adapters.batches.padded`), or several fill a row with position ids that restart at each
(`adapters.batches.packed`), which transformers turns into attention that never crosses from one example into
another.

Files are read by the reader registered for their suffix (``register_data_readers``): the built-in ones
(`adapters.data.formats`) read ``.txt`` (one example per paragraph), ``.jsonl``, ``.json`` (an array of objects),
``.csv``, ``.parquet`` and directories written by ``datasets``' ``save_to_disk``, and plugins add others. From
Python also a ``datasets.Dataset`` or any iterable of dicts. Parquet, such directories and Dataset objects go
through the `datasets` library, the optional extra ``adapters-lab[data]``, imported only for them. The built-in
datasets (`adapters.data.corpora`, ``builtin:NAME``) are real text shipped with every CPython install, so training
works offline and gives the same examples on every run.

Modules, each depending only on those before it:

* `examples`: `Example`, `Dataset`, `DataError`, the held-out `split`;
* `shapes`: the shapes, and rows made into examples;
* `corpora`: the built-in datasets;
* `readers`: a path through the registered reader for its suffix, or an object, to rows;
* `formats`: the built-in readers, registered as a plugin's are;
* `load`: the entry point, `load_dataset`.
"""
from ..contract import TASKS
from .examples import DEFAULT_PACKING, HELDOUT_FRACTION, DataError, Dataset, Example, split, stable_hash
from .load import BUILTIN, builtin_dataset, default_dataset, load_dataset, read_file
from .shapes import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, SHAPES

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "BUILTIN", "DEFAULT_PACKING", "HELDOUT_FRACTION",
           "SHAPES", "TASKS", "DataError", "Dataset", "Example", "builtin_dataset", "default_dataset",
           "load_dataset", "read_file", "split", "stable_hash"]
