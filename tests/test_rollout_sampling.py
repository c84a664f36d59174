"""Sampling details of ``ril_fast.rollout`` that tests/test_rollout.py's oracles do not reach: the settings given
to ``generate`` (from a stand-in processor, no model), ``draw_one`` at the edge of its uniform's range,
``max_batch`` and the seed across ``generate`` calls (the tiny Qwen2, text only), ``sampling_settings``.
Each test kills a change found by mutation testing."""

from types import SimpleNamespace

import pytest
import torch

from ril_fast import rollout
from ril_fast.models import load
from ril_fast.rollout import _generation_config, sample_responses, sampling_settings
from tests.models_fixtures import one_thread, tiny_folder  # noqa: F401


def _processor(**ids):
    """A stand-in with the attributes ``_generation_config`` reads."""
    base = dict(image_token_id=None, image_start_id=None, image_end_id=None, stop_token_ids=[7, 9])
    return SimpleNamespace(**(base | ids))


def test_every_image_placeholder_is_suppressed():
    """A response may hold no image token, nor the vision start / end marks around them: all three are
    suppressed; a text model's (none of them) suppresses nothing."""
    kw = dict(max_new_tokens=4, greedy=False, temperature=0.7, top_p=0.9, top_k=5, pad_id=0)
    config = _generation_config(_processor(image_token_id=11, image_start_id=12, image_end_id=13), **kw)
    assert sorted(config.suppress_tokens) == [11, 12, 13]
    assert _generation_config(_processor(), **kw).suppress_tokens is None


def test_sampling_settings_reach_the_generation_config():
    """Temperature, top-p and top-k are given as asked; greedy is argmax, one beam."""
    config = _generation_config(_processor(), max_new_tokens=4, greedy=False, temperature=0.7, top_p=0.9, top_k=5,
                                pad_id=0)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (True, 0.7, 0.9, 5)
    assert config.eos_token_id == [7, 9] and config.repetition_penalty == 1.0
    greedy = _generation_config(_processor(), max_new_tokens=4, greedy=True, temperature=0.7, top_p=0.9, top_k=5,
                                pad_id=0)
    assert (greedy.do_sample, greedy.num_beams) == (False, 1)


def test_draw_one_never_draws_a_zero_entry_at_the_uniforms_ends(monkeypatch):
    """A uniform of exactly 0 (``torch.rand`` can give it) draws the first entry of nonzero probability, not a
    zero entry before it."""
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(*a[:2], dtype=torch.float64))
    assert rollout.draw_one(probs).squeeze(1).tolist() == [2, 1]


def test_sampling_settings_take_the_config():
    """The trainer's rollout settings: every one from the config, ``rollout.batch_size`` as ``max_batch``."""
    cfg = SimpleNamespace(group_size=4, max_new_tokens=16,
                          rollout=SimpleNamespace(temperature=0.8, top_p=0.95, top_k=7, batch_size=3))
    assert sampling_settings(cfg) == dict(group_size=4, max_new_tokens=16, temperature=0.8, top_p=0.95, top_k=7,
                                          max_batch=3)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, one_thread):  # noqa: F811
    return load(tiny_folder(tmp_path_factory, "qwen2"), device="cpu")


def test_max_batch_caps_each_generate_call_and_one_seed_runs_through_them(qwen2, monkeypatch):
    """``max_batch`` rows at most per ``generate`` call; the seed is set once for the whole call, so two questions
    alike, sampled in two ``generate`` calls, get different samples (a seed per call would repeat them)."""
    model, proc = qwen2
    rows, generate = [], model.generate

    def counted(*args, **kwargs):
        rows.append(kwargs["input_ids"].shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counted)
    examples = [{"question": "What is two plus two?"}] * 2
    got = sample_responses(model, proc, examples, group_size=2, max_new_tokens=6, seed=3, max_batch=2)
    assert rows == [2, 2]
    assert [r.token_ids for r in got[0]] != [r.token_ids for r in got[1]]
