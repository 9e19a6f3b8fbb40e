"""The largest batch size or sequence length a strategy trains with, found by real runs."""
from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import AdaptersError
from ..reports.model import Capacity, CapacityTry, Failed, OkResult, OutOfMemory, Refused, Result
from ..runspec import memory_limit
from .predict import predicted_largest
from .provenance import device_kind
from .settings import BenchSettings, Measurement
from .worker import run_case

# A try is as short as a measurement gets: its peak is all the search needs.
TRY = Measurement(steps=1, warmup=1, repeats=1, quality_steps=0, loads=1)


def search_limit(settings: BenchSettings) -> int | None:
    """The memory limit of the capacity search ``settings`` asks for, in bytes; None without a search,
    or on a GPU without a limit (its out-of-memory error stops the search)."""
    if not settings.find_max:
        return None
    if settings.spec.memory_limit is None:
        if device_kind() == "cpu":
            raise AdaptersError(
                f"--find-max-{settings.find_max.replace('_size', '').replace('_', '-')} on the CPU needs "
                "--memory-limit (e.g. --memory-limit 4GiB): without a GPU's out-of-memory error, "
                "nothing else would stop the search."
            )
        return None
    return memory_limit(settings.spec.memory_limit)


def find_capacity(settings: BenchSettings, strategy: str, limit: int | None,
                  bar: Any = None) -> tuple[Result, Capacity]:
    """The largest ``settings.find_max`` (batch size, or sequence length in multiples of 8) that
    ``strategy`` trains with under ``limit``, by real runs.

    Doubles from 1 (or 8) until a try fails (out of memory, or a measured peak over ``limit``), then
    bisects between the last success and the first failure. Every try runs in a fresh process, so
    memory is free again before the next. Returns the result at the largest working value and the
    search record, with the plan's prediction of the same largest value beside it. ``bar`` (tqdm)
    shows the value being tried.
    """
    from ..models import model_config
    from ..plan import largest_that_fits

    param, spec = settings.find_max, settings.case(strategy)
    upper = 2**16
    if param == "seq_len":
        upper = getattr(model_config(spec.model), "max_position_embeddings", None) or upper
    trial = dataclasses.replace(TRY, memory_limit=settings.spec.memory_limit)
    tries: list[CapacityTry] = []
    results: dict[int, OkResult] = {}

    def works(value: int) -> bool:
        if bar is not None:
            bar.set_postfix(strategy=strategy, **{param: value})
        tried = dataclasses.replace(spec, **{param: value})
        result = run_case(tried, trial)
        if isinstance(result, OkResult) and result.batch_size != tried.batch_size:  # it fitted only by backing off
            result = OutOfMemory(strategy=strategy, message="out of memory: it ran only after backing off to "
                                 f"micro-batch {result.batch_size}")
        peak = result.memory.peak_bytes if isinstance(result, OkResult) else None
        status = "over limit" if peak is not None and limit is not None and peak > limit else result.status
        tries.append(CapacityTry(value=value, status=status, peak_bytes=peak,
                                 message=None if status in ("ok", "over limit") else result.message))
        if status == "ok":
            results[value] = result
        return status == "ok"

    # Sequence lengths are searched in multiples of 8: what kernels like, and fewer tries.
    step = 1 if param == "batch_size" else 8
    largest = largest_that_fits(lambda k: works(k * step), upper // step)
    largest = None if largest is None else largest * step
    search = Capacity(strategy=strategy, parameter=param, limit_bytes=limit, largest=largest, tries=tries,
                      predicted_largest=predicted_largest(spec, param, limit))
    if largest is None:
        first = tries[0]
        kind = Failed if first.status == "over limit" else {"oom": OutOfMemory, "refused": Refused}.get(first.status,
                                                                                                       Failed)
        return kind(strategy=strategy, message=first.message or
                    f"even {param} = {first.value} needs more than the memory limit"), search
    search.peak_bytes = results[largest].memory.peak_bytes
    return results[largest], search
