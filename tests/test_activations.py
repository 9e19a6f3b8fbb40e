"""Saved-activation offload (adapters.training.offload): refused off CUDA with the reason; the hooks leave the
loss and gradients of a real (random:tiny-shaped) computation exactly unchanged; CUDA path behind `gpu`."""
import pytest
import torch

from adapters import rules
from adapters.training import offload


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 64))


def _loss_and_grads(model, x, ctx):
    model.zero_grad()
    with ctx:
        loss = model(x).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_refused_off_cuda_with_the_reason():
    assert rules.offload_refusal("cuda") is None
    reason = rules.offload_refusal("cpu")
    assert "--offload-activations" in reason and "--gradient-checkpointing" in reason


def test_hooks_round_trip_is_exact_on_host():
    import contextlib
    model, x = _mlp(), torch.randn(8, 64)
    plain = _loss_and_grads(model, x, contextlib.nullcontext())
    hooked = _loss_and_grads(model, x, offload.offloaded_activations("cpu", copy_on_host=True))
    assert torch.equal(plain[0], hooked[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], hooked[1]))


@pytest.mark.gpu
def test_cuda_offload_matches_and_cuts_device_memory():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    import contextlib
    model, x = _mlp().cuda(), torch.randn(4096, 64, device="cuda")
    plain = _loss_and_grads(model, x, contextlib.nullcontext())
    hooked = _loss_and_grads(model, x, offload.offloaded_activations("cuda"))
    torch.testing.assert_close(plain[0], hooked[0])
    for a, b in zip(plain[1], hooked[1]):
        torch.testing.assert_close(a, b)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with offload.offloaded_activations("cuda"):
        y = model(x).pow(2).mean()
    held = torch.cuda.memory_allocated() - base
    y.backward()
    torch.cuda.reset_peak_memory_stats()
    base2 = torch.cuda.memory_allocated()
    y2 = model(x).pow(2).mean()
    held_plain = torch.cuda.memory_allocated() - base2
    y2.backward()
    assert held < held_plain


def test_train_refuses_offload_on_cpu_before_loading(capsys, tmp_path):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from cli_helpers import assert_user_error, run_in_process

    code, out, err = run_in_process(capsys, "train", "--model", "random:tiny", "--max-steps", "1",
                                    "--output", str(tmp_path / "out"), "--offload-activations")
    assert_user_error(code, out, err, "--offload-activations", "--gradient-checkpointing")
    assert not (tmp_path / "out").exists()
