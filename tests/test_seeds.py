"""The test seeds (tests/conftest.py): one number replays a run, module-scoped fixtures included."""

import random

import numpy as np
import pytest
import torch

from conftest import _seed_everything


def _draw() -> tuple:
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


@pytest.fixture(scope="module")
def drawn_by_a_module_fixture():
    return _draw()


def test_module_fixtures_draw_from_the_run_seed(drawn_by_a_module_fixture, request):
    _seed_everything(request.node.getparent(pytest.Module).nodeid)
    assert drawn_by_a_module_fixture == _draw()


def test_each_test_draws_from_the_run_seed_and_its_id(_fresh_seed, request):
    drawn = _draw()
    assert _seed_everything(request.node.nodeid) == _fresh_seed
    assert _draw() == drawn
    assert _seed_everything(request.node.nodeid + "x") != _fresh_seed  # another test, other draws
