"""bench/_flops.py against an outside oracle: the analytic forward FLOPs against torch's FlopCounterMode on small
Qwen2.5-VL and Qwen3-VL models."""

import sys
from pathlib import Path

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _flops import Shapes  # noqa: E402

IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
GRIDS = [(1, 6, 10), (1, 4, 4)]  # patch grids: 6 is not a multiple of Qwen2.5-VL's 4-patch windows here


def _small_config(arch: str):
    """A few layers of each family, with the features the formulas must see: Qwen3-VL with an explicit
    head_dim (4 × 48 = 192 query width ≠ hidden 128), q/k norms and two DeepStack mergers; Qwen2.5-VL with
    windowed and full-attention blocks and q/k/v biases."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    text = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  spatial_merge_size=2, temporal_patch_size=2)
    if arch == "qwen3_vl":
        text.update(head_dim=48, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                  "mrope_section": [8, 8, 8], "mrope_interleaved": True})
        vision.update(patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **IDS)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
    vision.update(patch_size=14, window_size=56, fullatt_block_indexes=[2])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **IDS)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_forward_flops_match_flop_counter(arch, one_thread):  # noqa: F811
    """Vision tower + decoder + LM head of one sample with two images: FlopCounterMode's count equals the
    analytic one exactly, plus the masked half of causal attention (model FLOPs leave it out; eager
    attention computes all L² scores)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText

    config = _small_config(arch)
    config._attn_implementation = "eager"  # every attention matmul is an aten op the counter sees
    model = AutoModelForImageTextToText.from_config(config).eval()
    v = config.vision_config
    ids = [10, 11, 12]
    for t, h, w in GRIDS:  # one image token per 2×2 patches
        ids += [IDS["vision_start_token_id"], *[IDS["image_token_id"]] * (t * h * w // 4), IDS["vision_end_token_id"]]
    ids += list(range(20, 47))
    length = len(ids)
    patches = sum(t * h * w for t, h, w in GRIDS)
    pixels = torch.randn(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2)

    ids = torch.tensor([ids])
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor(GRIDS),
              mm_token_type_ids=(ids == IDS["image_token_id"]).int())  # 1: an image token
    s = Shapes.of(config)
    masked_half = 2 * s.layers * s.heads * s.head_dim * length**2
    assert counter.get_total_flops() == s.vision(GRIDS) + s.decoder(length) + masked_half + s.lm_head(length)
