"""The built-in datasets, by the name they had before `adapters.data` became a package: see
`adapters.data.corpora`, where they live."""
from .data.corpora import BUILTIN, answer, python_instructions, python_reference, stdlib_docstrings

__all__ = ["BUILTIN", "answer", "python_instructions", "python_reference", "stdlib_docstrings"]
