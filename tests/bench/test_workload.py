"""bench/_workload.py: the presets have the published parameter counts, ``stop_after`` makes random students stop
after the target mean length, the drawn lengths and images follow the documented mix, a big preset's student has
its pixel bounds, and the cache rebuilds what a changed setting changes."""

import dataclasses
import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch
from models_fixtures import one_thread, tiny_folder  # noqa: F401

from ril_fast.flops import Shapes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import _workload  # noqa: E402
from _workload import PRESETS, QWEN2_5_VL_VISION, model_config, stop_after  # noqa: E402


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


def test_qwen2_5_vl_presets_have_the_released_sizes():
    """Built on the meta device (~2 s each): 3b and 7b count exactly the parameters of the released
    Qwen2.5-VL-3B/7B-Instruct checkpoints (vision tower, GQA heads and tying included). Every preset splits its
    head_dim / 2 rotary frequencies 1/4 : 3/8 : 3/8 over (t, h, w); a ``--layers 2`` look keeps full attention in
    the last block of its shallower tower, as the real tower ends with one."""
    from transformers import AutoModelForImageTextToText

    counts = {}
    for name in ("3b", "7b"):
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(model_config(PRESETS[name]))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert counts == {"3b": 3_754_622_976, "7b": 8_292_166_656}
    for name in ("1b", "3b", "7b"):
        text = model_config(PRESETS[name]).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert text.rope_parameters["mrope_section"] == [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    assert model_config(dataclasses.replace(PRESETS["3b"], layers=2)).vision_config.fullatt_block_indexes == [1]


def test_lognormal_lengths_are_clipped_around_their_median():
    """σ = 0.5 in log space around the median, clipped to [4, min(8 × median, cap)]: over 5,000 draws the lower
    clip binds (median 5), the upper one at 8 × median is reached past 4 × median, and ``cap`` holds."""
    rng = random.Random(0)
    draws = [_workload._lognormal(rng, 40, 10_000) for _ in range(5000)]
    assert statistics.median(draws) == pytest.approx(40, rel=0.05)
    logs = [math.log(d / 40) for d in draws]
    assert statistics.stdev(logs) == pytest.approx(0.5, rel=0.05)
    assert 4 * 40 < max(draws) <= 8 * 40
    small = [_workload._lognormal(rng, 5, 10_000) for _ in range(1000)]
    assert min(small) == 4 and small.count(4) > 200
    assert max(_workload._lognormal(rng, 150, 100) for _ in range(100)) == 100


def test_images_have_log_uniform_sides_in_both_orientations():
    """The long side log-uniform over the range (its median the geometric mean, not the midpoint), half of the
    non-square images portrait, every aspect one of 1, 4:3, 3:2, 16:9."""
    rng = random.Random(0)
    sizes = [_workload._image(rng, (28, 448)).size for _ in range(400)]
    longs = [max(s) for s in sizes]
    assert 28 <= min(longs) and max(longs) <= 448
    assert statistics.median(longs) == pytest.approx(math.sqrt(28 * 448), rel=0.15)  # 112 (the midpoint: 238)
    oblong = [(w, h) for w, h in sizes if w != h]
    assert 0.4 < sum(h > w for w, h in oblong) / len(oblong) < 0.6
    for w, h in sizes:
        assert min(abs(max(w, h) / min(w, h) - a) for a in (1, 4 / 3, 3 / 2, 16 / 9)) < 0.1, (w, h)


def test_teacher_responses_fit_l_max_with_their_end_token(tmp_path_factory, tmp_path):
    """Two responses per question from each teacher, each at most L_max - 1 tokens (the end-of-turn token makes
    L_max), the cap reached when the median is above it."""
    from transformers import AutoTokenizer

    folder = tiny_folder(tmp_path_factory, "qwen2_5_vl")
    preset = dataclasses.replace(PRESETS["tiny"], teacher_tokens=12, max_new_tokens=6, examples=6)
    _workload._write_data(preset, tmp_path, folder, seed=0)
    tok = AutoTokenizer.from_pretrained(folder)
    for teacher in ("teacher_a", "teacher_b"):
        rows = [json.loads(line) for line in (tmp_path / f"{teacher}.jsonl").read_text().splitlines()]
        assert sorted(r["id"] for r in rows) == sorted(str(i) for i in range(6) for _ in range(2))
        lengths = [len(tok(r["response"], add_special_tokens=False)["input_ids"]) for r in rows]
        assert max(lengths) == 5, lengths
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 6


def test_the_cache_rebuilds_only_what_a_setting_changes(tmp_path, monkeypatch):
    """build writes the student and the data once (the second build finds both); L_max rebuilds the data only
    (teacher responses fit in it), the depth the student only (the student folder's writers faked)."""
    written = []

    def write(kind):
        def fake(preset, out, *args, seed):
            written.append(kind)
            (out / kind).write_text("x")
        return fake

    monkeypatch.setattr(_workload, "_write_student", write("student"))
    monkeypatch.setattr(_workload, "_write_data", write("data"))
    preset = PRESETS["tiny"]
    _workload.build(preset, tmp_path)
    _workload.build(preset, tmp_path)
    assert written == ["student", "data"]
    _workload.build(dataclasses.replace(preset, max_new_tokens=9), tmp_path)
    assert written == ["student", "data", "data"]
    _workload.build(dataclasses.replace(preset, max_new_tokens=9, layers=1), tmp_path)
    assert written == ["student", "data", "data", "student"]


def test_a_big_preset_student_has_its_pixel_bounds(tmp_path, one_thread):  # noqa: F811
    """A big preset's image processor bounds an image to the preset's (min, max) tokens of 28×28 pixels: a
    2000×1500 image gives at most the max."""
    from PIL import Image
    from transformers import AutoImageProcessor

    preset = dataclasses.replace(
        PRESETS["3b"], name="small", text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, vocab_size=2048),
        tie_embeddings=False, image_tokens=(4, 100),
        vision=dict(QWEN2_5_VL_VISION, depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                    fullatt_block_indexes=[0]))
    _workload._write_student(preset, tmp_path, seed=0)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["size"] == {"shortest_edge": 4 * 28 * 28, "longest_edge": 100 * 28 * 28}
    grid = AutoImageProcessor.from_pretrained(tmp_path)(Image.new("RGB", (2000, 1500)))["image_grid_thw"]
    assert 80 <= int(grid.prod()) // 4 <= 100
