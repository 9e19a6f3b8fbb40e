"""Saved-activation offload (issue 22, item 2): the tensors autograd saves for backward are moved to host memory
during the forward and brought back when backward needs them, through ``torch.autograd.graph.saved_tensors_hooks``.

On CUDA the copies run on a side stream into pinned host memory, so they overlap the forward's compute (the scheme
of torchtune's ``OffloadActivations``). On the CPU the activations already live in host memory: offloading there
is meaningless, and `adapters.rules.offload_refusal` gives the reason the run is refused before anything loads.

The Session refuses it off CUDA and runs each forward of a step under these hooks; the planner models it
(`adapters.plan.memory`), and ``--memory-limit`` chooses it when it is predicted fastest among the ways that fit
(`adapters.plan.fit`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Saved tensors smaller than this stay on the device: copying them costs more in launches than it saves.
MIN_OFFLOAD_BYTES = 1024


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@contextlib.contextmanager
def offloaded_activations(device: torch.device | str, *, copy_on_host: bool = False) -> Iterator[None]:
    """Within this context, autograd's saved tensors on ``device`` go to host memory and return for backward.

    ``copy_on_host``: on a CPU device, still round-trip every saved tensor through a fresh host copy (the hooks'
    bookkeeping without a transfer), which tests use to check the hooks leave losses and gradients unchanged."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None

    def pack(t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or _nbytes(t) < MIN_OFFLOAD_BYTES or t.device.type != device.type:
            return (False, t)
        if cuda:
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the device block is not reused until the copy has read it
            event = torch.cuda.Event()
            event.record(stream)
            return (True, (host, t.device, event))
        if copy_on_host:
            return (True, (t.detach().clone(), t.device, None))
        return (False, t)

    def unpack(packed):
        moved, payload = packed
        if not moved:
            return payload
        host, where, event = payload
        if event is not None:
            event.synchronize()
        return host.to(where, non_blocking=cuda)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
