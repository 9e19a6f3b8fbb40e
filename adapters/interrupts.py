"""Graceful interrupts for long runs: the first SIGINT or SIGTERM asks the run to stop after the
current optimizer step (and write a checkpoint); a second one stops at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by the first signal; the training loop reads it after each optimizer step."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def graceful_stop(announce: bool = True) -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded `StopRequest`; a second one raises
    KeyboardInterrupt at once. Outside the main thread (where handlers cannot be set) it only yields."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def first(signum, frame) -> None:
        request.signal = signal.Signals(signum).name
        for s in previous:
            signal.signal(s, second)
        if announce:
            print(f"\n{request.signal}: stopping after this step and writing a checkpoint; "
                  "send it again to stop at once.", file=sys.stderr, flush=True)

    def second(signum, frame) -> None:
        raise KeyboardInterrupt

    for s in previous:
        signal.signal(s, first)
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
