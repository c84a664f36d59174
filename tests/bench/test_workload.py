"""bench/_workload.py: the Qwen3-VL presets have the published parameter counts, and ``stop_after`` makes
random students stop after the target mean length."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from models_fixtures import one_thread, tiny_folder  # noqa: F401

from ril_fast.flops import Shapes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _workload import PRESETS, model_config, stop_after  # noqa: E402


# Published totals (Hugging Face model cards of Qwen3-VL-{2B,4B,8B}-Instruct): 2.13 B, 4.44 B, 8.77 B.
@pytest.mark.parametrize("name, published", [("qwen3vl-2b", 2.13e9), ("qwen3vl-4b", 4.44e9), ("qwen3vl-8b", 8.77e9)])
def test_qwen3_vl_presets_have_the_published_sizes(name, published):
    """Built on the meta device: parameters within 5 M of the published total, tied as published; and a
    ``--layers 2`` look keeps DeepStack (its blocks spread over the shallower tower)."""
    from transformers import AutoModelForImageTextToText

    preset = PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config(preset))
    assert model.config.model_type == "qwen3_vl"
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(published, abs=0.005e9)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == preset.tie_embeddings
    with torch.device("meta"):
        shallow = AutoModelForImageTextToText.from_config(model_config(dataclasses.replace(preset, layers=2)))
    vision = shallow.config.vision_config
    assert len(shallow.model.language_model.layers) == vision.depth == 2
    assert vision.deepstack_visual_indexes == [0, 1]
    merger = sum(p.numel() for p in shallow.model.visual.merger.parameters() if p.dim() == 2)
    assert Shapes.of(shallow.config).vis_merge_params == 3 * merger  # the final merger and 2 DeepStack ones


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_stop_after_gives_the_target_mean_length(arch, tmp_path_factory, one_thread):  # noqa: F811
    """Sampled lengths of a tiny random model after ``stop_after(mean=8)``: geometric, so their mean over
    256 samples capped at 48 tokens is 7.99 ± 0.47 (one standard error); the probe's stopping probability
    is 1/8."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_folder(tmp_path_factory, arch), dtype=torch.float32)
    eos, cap, n = model.generation_config.eos_token_id, 48, 256
    assert stop_after(model, 8, eos) == pytest.approx(1 / 8, rel=0.02)
    prompt = torch.randint(16, 1000, (n, 12))
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=None,
                         top_p=None, max_new_tokens=cap, eos_token_id=eos, pad_token_id=0)[:, prompt.shape[1]:]
    stopped = out == eos
    lengths = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, cap).float()
    assert 6.0 < lengths.mean() < 10.0  # ± 4 standard errors
