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


class TrainingFailed(AdaptersError):
    """Training stopped before the end, e.g. on a non-finite loss; nothing was saved."""
