"""The peak of live CPU tensor bytes during a step, from torch's profiler.

torch has no public API for this: the allocation timeline lives in the private
``torch.profiler._memory_profiler`` module (``Action``) and ``profile._memory_profile()``, used
here as they are in torch 2.1 to 2.13. This module is the only place that touches them, and it
checks they exist, so a torch that moved them fails with one message naming its version instead
of an AttributeError in the middle of a measurement.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ProfilerUnavailable(RuntimeError):
    """This torch lacks the private memory-profiler API that CPU peaks are measured with."""


def _unavailable(what: str, exc: Exception) -> ProfilerUnavailable:
    import torch

    return ProfilerUnavailable(
        f"torch {torch.__version__} has no usable {what} ({type(exc).__name__}: {exc}); CPU memory peaks are "
        "measured with this private profiler API of torch 2.1 to 2.13. Install a torch in that range, or "
        "measure on a CUDA device, whose peaks need no profiler."
    )


def cpu_peak_tensor_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of live CPU tensors during ``step()``, from the profiler's allocation events.

    Tensors that exist before the step and are used in it (weights, optimizer state) count from
    the start, so the result is the step's whole peak, not only what it allocates. Raises
    `ProfilerUnavailable`, before running the step, when this torch lacks the API.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler import _memory_profiler

        action = _memory_profiler.Action
        created, destroyed = (action.PREEXISTING, action.CREATE), action.DESTROY
        profile._memory_profile  # noqa: B018 (checked before the step runs, not after)
    except (ImportError, AttributeError) as exc:
        raise _unavailable("torch.profiler._memory_profiler.Action or profile._memory_profile", exc) from None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    try:
        for _, event, (key, _version), size in prof._memory_profile().timeline:
            if key.device.type != "cpu":
                continue
            if event in created:
                live += size
            elif event == destroyed:
                live -= size
            peak = max(peak, live)
    except (AttributeError, TypeError, ValueError) as exc:  # the timeline's layout changed
        raise _unavailable("memory timeline in the layout (time, action, (key, version), size)", exc) from None
    return peak


def cpu_peak_allocated_bytes(step: Callable[[], Any]) -> int:
    """Peak bytes of CPU memory ``step()`` allocates beyond what was allocated before it, from the profiler's raw
    allocation events (their running sum).

    For steps whose tensor timeline `cpu_peak_tensor_bytes` cannot follow: FSDP2 frees and refills its gathered
    parameters' storages in place (``resize_``), which the profiler's data-flow graph refuses (a version mismatch).
    What the step uses from before it (weights, optimizer state, the batch) is the caller's to add.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        nodes, allocations = list(prof.profiler.kineto_results.experimental_event_tree()), []
        while nodes:
            node = nodes.pop()
            nodes.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
    except AttributeError as exc:  # the event tree's layout changed
        raise _unavailable("allocation events in the profiler's event tree", exc) from None
    live = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        live += size
        peak = max(peak, live)
    return peak
