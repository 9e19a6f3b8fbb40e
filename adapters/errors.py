"""Errors a user can cause and fix.

Every `AdaptersError` message names the input at fault and one way to fix it. The CLI prints it on
one line, without a traceback, and exits with code 2.
"""


class AdaptersError(Exception):
    """A user-caused error: a bad option, file, model or plugin."""


class UnknownStrategyError(AdaptersError, KeyError):
    """No strategy is registered under the requested name."""

    # KeyError's str() would wrap the message in quotes.
    __str__ = Exception.__str__


class NothingKept(UserWarning):
    """A run without an output: it trains and reports, and keeps nothing."""


class TokenizerFallback(UserWarning):
    """A checkpoint without a tokenizer gets the byte-level one; said, since real weights will not fit it."""


class OtherBase(UserWarning):
    """A save was loaded onto a base with other weights, as ``allow_other_base`` asked."""


class OutOfMemoryBackoff(UserWarning):
    """A training step ran out of memory and is tried again with half the micro-batch."""


class TrainingFailed(AdaptersError):
    """Training stopped before the end, e.g. on a non-finite loss; nothing was saved."""
