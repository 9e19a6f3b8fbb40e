"""Shared fixtures. Installed third-party plugins never load under test unless a test registers them."""
from __future__ import annotations

import os
import warnings

# Before adapters is imported anywhere: an empty allow-list loads no entry-point plugins.
os.environ["ADAPTERS_LOAD_PLUGINS"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread, in this process and in every process a test starts (unless OMP_NUM_THREADS says otherwise): the
# models here are small, and on a busy 2-core machine two threads make each step several times slower, as at
# every operation one thread waits for the other to be scheduled.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

import pytest  # noqa: E402
import torch  # noqa: E402

import adapters  # noqa: E402

# The fixture adapters ships for plugin authors: register_plugin(plugin, name=None, strict=True)
# registers a plugin for one test and always unregisters it.
from adapters.testing import register_plugin  # noqa: E402, F401

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (unquantized), loaded once per session; tests must not modify it."""
    return adapters.load_base_model("smollm2-135m")


def load(name: str, quantization: str = "none", task: str | None = None, labels=None):
    return adapters.load_base_model(name, quantization=quantization, task=task, labels=labels)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One thread here and in every process a test starts, whatever OMP_NUM_THREADS said: the models are small,
    and on a busy 2-core machine two threads make each step several times slower."""
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session", autouse=True)
def _warm_random_tiny():
    """Generate the random:tiny checkpoint before any CLI subprocess test, so a cold cache's one-time
    "Generating ..." notice never mixes with the output those tests check."""
    adapters.models.MODELS["random:tiny"].locate()
