"""What a saved run holds, for tests that compare runs: its logged metrics and its saved weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def logged(run: Path, key: str) -> list[float]:
    """Each value of ``key`` that ``run``'s metrics.jsonl logged, in order."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if key in line]


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file ``run`` saved, as ``FILE:NAME``."""
    files = sorted(run.glob("*.safetensors"))
    assert files, f"no weights saved in {run}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_learned_the_same(got: Path, expected: Path, steps: int, rtol: float, atol: float) -> None:
    """``got`` logged ``steps`` steps with the losses and gradient norms of ``expected``, and saved its weights."""
    assert len(logged(got, "loss")) == steps and all(norm > 0 for norm in logged(expected, "grad_norm"))  # it learned
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(torch.tensor(logged(got, key)), torch.tensor(logged(expected, key)), rtol=rtol,
                                   atol=atol, msg=key)
    a, b = saved_weights(expected), saved_weights(got)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=key)


def assert_reloads_in_bf16(run: Path) -> None:
    """``run`` saved its weights in bf16, and `adapters.load` (float32 on the CPU) gives each back exactly."""
    import adapters

    tensors = load_file(run / "weights.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
    loaded = dict(adapters.load(str(run)).model.named_parameters())
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].detach().to(tensor.dtype), tensor), name
