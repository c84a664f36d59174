"""ril_fast/flops.py against an outside oracle: the analytic forward FLOPs against torch's FlopCounterMode on
small models of every family the trainer takes."""

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401

from ril_fast.flops import (Sample, Shapes, forward_flops, matmul_peak_tflops, phase_flops, rollout_flops,
                            training_flops)
from ril_fast.tiny import ARCHS
from ril_fast.tiny import _config as tiny_config

IDS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
GRIDS = [(1, 6, 10), (1, 4, 4)]  # patch grids: 6 is not a multiple of Qwen2.5-VL's 4-patch windows here
TILES = 3  # InternVL: 56-pixel tiles of 4x4 patches in the tiny configs


def _small_config(arch: str):
    """A few layers of each family, with the features the formulas must see: Qwen3-VL with an explicit
    head_dim (4 × 48 = 192 query width ≠ hidden 128), q/k norms and two DeepStack mergers; Qwen2.5-VL with
    windowed and full-attention blocks and q/k/v biases. The other families: ``ril_fast.tiny``'s configs
    (Qwen3.5's hybrid decoder with gated attention, Qwen2-VL's tower whose ``hidden_size`` is its output,
    InternVL's tiles, class token and pixel shuffle, a text-only Qwen2)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    if arch not in ("qwen3_vl", "qwen2_5_vl"):
        return tiny_config(arch, 300)
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


def _inputs(config, arch: str) -> tuple[dict, list, int]:
    """A forward's inputs holding images (Qwen-VL: GRIDS; InternVL: TILES tiles) and 30 text tokens ->
    (keyword arguments, Qwen-VL grids, InternVL tiles)."""
    ids, kwargs, grids, tiles = [10, 11, 12], {}, [], 0
    if arch.startswith("qwen") and arch != "qwen2":
        v, grids = config.vision_config, GRIDS
        for t, h, w in grids:  # one image token per 2×2 patches
            image = [config.image_token_id] * (t * h * w // 4)
            ids += [config.vision_start_token_id, *image, config.vision_end_token_id]
        patches = sum(t * h * w for t, h, w in grids)
        kwargs = dict(pixel_values=torch.randn(patches, v.in_channels * v.temporal_patch_size * v.patch_size**2),
                      image_grid_thw=torch.tensor(grids))
    elif arch.startswith("internvl"):
        tiles = TILES
        ids += [config.image_token_id] * (config.image_seq_length * tiles)
        kwargs = dict(pixel_values=torch.randn(tiles, 3, *config.vision_config.image_size))
    ids = torch.tensor([ids + list(range(20, 47))])
    if grids:
        kwargs["mm_token_type_ids"] = (ids == config.image_token_id).int()  # 1: an image token
    return dict(input_ids=ids, **kwargs), grids, tiles


def _gated_deltanet_rest(counter, model) -> int:
    """What the counter saw inside Qwen3.5's Gated DeltaNet modules beyond their projections: their causal
    convolution (which transformers calls as a function of the module's weight, so the counter bills it to
    the Gated DeltaNet module itself) and the recurrence."""
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    rest = 0
    for name, total in counts.items():
        if name.endswith("linear_attn"):
            linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".linear_attn." in n]
            assert linear  # the projections are modules the counter names
            rest += total - sum(counts[c] for c in counts if c.startswith(name + ".") and isinstance(
                model.get_submodule(c.split(".", 1)[1]), torch.nn.Linear))
    return rest


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl", *sorted(set(ARCHS) - {"qwen3_vl", "qwen2_5_vl"})])
def test_forward_flops_match_flop_counter(arch, one_thread):  # noqa: F811
    """Vision tower + decoder + LM head of one sample with images: FlopCounterMode's count equals the
    analytic one exactly, plus the masked half of causal attention (model FLOPs leave it out; eager
    attention computes all L² scores) and, for Qwen3.5, what its Gated DeltaNet layers compute besides
    their weights (left out: see ril_fast/flops.py)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = _small_config(arch)
    config._attn_implementation = "eager"  # every attention matmul is an aten op the counter sees
    auto = AutoModelForCausalLM if arch == "qwen2" else AutoModelForImageTextToText
    model = auto.from_config(config).eval()
    kwargs, grids, tiles = _inputs(config, arch)
    length = kwargs["input_ids"].shape[1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**kwargs)
    s = Shapes.of_model(model)
    assert Shapes.of(config) == s  # built on the meta device: the same counts
    assert s.vision(grids, tiles) > 0 or arch == "qwen2"
    masked_half = 2 * s.attention_layers * s.query_width * length**2
    unmodelled = 0
    if arch == "qwen3_5":  # one Gated DeltaNet layer: its convolution as counted, the rest the recurrence
        conv = model.model.language_model.layers[0].linear_attn.conv1d.weight
        kernel = conv.shape[-1]
        padded_conv = 2 * (length + kernel - 1) * conv.numel()  # causal: L + kernel - 1 outputs, the first L kept
        recurrence = _gated_deltanet_rest(counter, model) - padded_conv
        assert 0 < recurrence < 0.1 * counter.get_total_flops()
        unmodelled = recurrence + 2 * (kernel - 1) * conv.numel()  # model FLOPs: L outputs of the convolution
    assert counter.get_total_flops() == s.vision(grids, tiles) + s.decoder(length) + masked_half \
        + s.lm_head(length) + unmodelled


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl", "qwen2_vl", "internvl"])
def test_training_flops_match_flop_counter(arch, one_thread):  # noqa: F811
    """A forward and backward of one sample: 3 × the forward, less the patch embedding's input gradient
    (the pixels need none), exactly as FlopCounterMode counts it (plus 3 × the masked half of eager causal
    attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForImageTextToText

    config = _small_config(arch)
    config._attn_implementation = "eager"
    model = AutoModelForImageTextToText.from_config(config)
    kwargs, grids, tiles = _inputs(config, arch)
    length = kwargs["input_ids"].shape[1]
    with FlopCounterMode(display=False) as counter:
        model(**kwargs).logits.sum().backward()
    s = Shapes.of_model(model)
    sample = Sample(length, 0, length, grids, tiles=tiles)  # the LM head on every row, as the loss here
    masked_half = 2 * s.attention_layers * s.query_width * length**2
    assert s.patch_embedding(grids, tiles) > 0
    assert counter.get_total_flops() == training_flops(s, [sample], head=True) + 3 * masked_half


def test_shared_images_count_once_and_phases_add_up():
    """The vision tower counts once per image set (the G samples of a prompt share it), the rollout's
    prefill G times, and the phases scale with μ, the frozen models and the discriminator; an update is 3
    forwards less the patch embedding's input gradient (2 · 16 patches · 10 weights)."""
    s = Shapes(hidden=8, vocab=32, decoder_params=1000, attention_layers=2, query_width=8, vis_width=4,
               vis_embed_params=10, vis_block_params=100, vis_merge_params=50, vis_depth=2, vis_full_blocks=2)
    image = s.vision([(1, 4, 4)])
    a, b = (Sample(20, 12, 8, [(1, 4, 4)], image_set=7) for _ in range(2))
    c = Sample(20, 12, 8, [(1, 4, 4)], image_set=8)
    assert forward_flops(s, [a, b], head=False) == image + 2 * s.decoder(20)
    assert forward_flops(s, [a, c], head=False) == 2 * image + 2 * s.decoder(20)
    assert forward_flops(s, [a], head=True) == image + s.decoder(20) + s.lm_head(8)
    prompt = a.prompt_only()
    assert (prompt.length, prompt.response, prompt.image_set) == (12, 0, 7)
    rollout = rollout_flops(s, [prompt], [a, b], group_size=2)
    assert rollout == image + 2 * (s.decoder(12) + s.lm_head(1)) + 2 * s.decode(12, 8)
    one = phase_flops(s, [prompt], [a, b], [a, b], group_size=2, mu=1, frozen_models=1, disc=True)
    two = phase_flops(s, [prompt], [a, b], [a, b], group_size=2, mu=2, frozen_models=2, disc=False)
    assert two["policy_update"] == 2 * one["policy_update"] and two["old_ref_logprobs"] == 2 * one["old_ref_logprobs"]
    assert two["disc_update"] == two["disc_score"] == 0 < one["disc_score"]
    assert one["disc_update"] == 3 * one["disc_score"] - s.patch_embedding([(1, 4, 4)]) == 3 * one["disc_score"] - 320
    assert one["rollout"] == two["rollout"] == rollout


def test_decode_counts_each_step_against_its_context():
    """Token t of a response attends to the prompt and t earlier tokens; the first token comes from the
    prefill (checked against a sum over the steps)."""
    s = Shapes(hidden=8, vocab=32, decoder_params=1000, attention_layers=3, query_width=16)
    step = 2 * s.decoder_params + 2 * s.hidden * s.vocab
    for prompt, generated in [(5, 1), (5, 2), (7, 9)]:
        expected = sum(step + 4 * s.attention_layers * s.query_width * (prompt + t) for t in range(1, generated))
        assert s.decode(prompt, generated) == expected


def test_matmul_peak_is_a_plausible_rate():
    """The CPU's fp32 peak: positive and below what the cores could do at 64 FLOPs per cycle at 6 GHz;
    measured once per process."""
    import os

    peak = matmul_peak_tflops(torch.device("cpu"), torch.float32)
    assert 0 < peak < os.cpu_count() * 64 * 6e9 / 1e12
    assert matmul_peak_tflops(torch.device("cpu"), torch.float32) == peak


def test_sliding_window_layers_count_as_softmax_attention():
    """A sliding-window layer counts as full attention (its saving is left out); only linear-attention layers
    (Qwen3.5's Gated DeltaNet) are not counted; head_dim defaults to hidden / heads."""
    from types import SimpleNamespace

    from ril_fast.flops import softmax_attention

    kinds = ["sliding_attention", "full_attention", "linear_attention", "sliding_attention"]
    config = SimpleNamespace(layer_types=kinds, num_hidden_layers=4, hidden_size=64, num_attention_heads=4)
    assert softmax_attention(config) == (3, 16)
    assert softmax_attention(SimpleNamespace(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                             head_dim=48)) == (2, 48)


def test_a_response_of_no_tokens_decodes_nothing():
    """No generated token: no decoding step (not a negative count of them)."""
    s = Shapes(hidden=8, vocab=32, decoder_params=1000, attention_layers=3, query_width=16)
    assert s.decode(5, 0) == s.decode(5, 1) == 0


def test_samples_without_an_image_set_count_their_own_images():
    """Samples whose image set is unknown (None) share nothing: each one's images count once each."""
    s = Shapes(hidden=8, vocab=32, decoder_params=1000, attention_layers=2, query_width=8, vis_width=4,
               vis_embed_params=10, vis_block_params=100, vis_merge_params=50, vis_depth=2, vis_full_blocks=2)
    a, b = Sample(20, 12, 8, [(1, 4, 4)]), Sample(20, 12, 8, [(1, 2, 2)])
    assert forward_flops(s, [a, b], head=False) == s.vision([(1, 4, 4)]) + s.vision([(1, 2, 2)]) + 2 * s.decoder(20)


def test_frozen_log_probs_count_the_lm_head():
    """π_old and π_ref compute log-probs: their forwards include the LM head on the response rows (the
    discriminator's scores do not)."""
    s = Shapes(hidden=8, vocab=32, decoder_params=1000, attention_layers=2, query_width=8)
    a = Sample(20, 12, 8, [])
    phases = phase_flops(s, [a.prompt_only()], [a], [a], group_size=1, mu=1, frozen_models=1, disc=True)
    assert phases["old_ref_logprobs"] == s.decoder(20) + s.lm_head(8) == phases["disc_score"] + s.lm_head(8)


def test_sample_shapes_of_encoded_samples():
    """Sample.of: a Qwen-VL sample's pixels are patches of its grids (no InternVL tiles), samples sharing one
    pixel tensor share one image set; an InternVL sample's pixels are its tiles; a text sample has neither."""
    from ril_fast.processor import Encoded

    patches, tiles = torch.zeros(20, 8), torch.zeros(3, 3, 56, 56)
    grid = torch.tensor([[1, 4, 4], [1, 2, 2]])
    a, b = (Sample.of(Encoded(torch.arange(30), 25, patches, grid)) for _ in range(2))
    assert (a.length, a.prompt, a.response, a.grids, a.tiles) == (30, 25, 5, [(1, 4, 4), (1, 2, 2)], 0)
    assert a.image_set == b.image_set is not None
    other = Sample.of(Encoded(torch.arange(30), 25, patches.clone(), grid))
    assert other.image_set != a.image_set
    intern = Sample.of(Encoded(torch.arange(10), 4, tiles))
    assert (intern.grids, intern.tiles, intern.response) == ([], 3, 6) and intern.image_set is not None
    text = Sample.of(Encoded(torch.arange(10), 4))
    assert (text.grids, text.tiles, text.image_set) == ([], 0, None)


def test_matmul_peak_is_2_n_cubed_over_the_fastest_run(monkeypatch):
    """On a CPU: 2 · 1024³ FLOPs over the fastest of the 3 timed runs (a fake clock: 4, 1 and 2 ms)."""
    from types import SimpleNamespace

    import ril_fast.flops as flops

    clock = iter([0.0, 0.004, 1.0, 1.001, 2.0, 2.002])
    monkeypatch.setattr(flops, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    peak = matmul_peak_tflops.__wrapped__(torch.device("cpu"), torch.float32)
    assert peak == pytest.approx(2 * 1024**3 / 1e-3 / 1e12, rel=1e-9)


def test_a_vlm_of_another_family_is_refused_not_counted_without_its_tower():
    """Gemma 3 builds as a causal LM on the meta device, its tower named as InternVL's; its FLOPs are refused by name
    (as ``load`` refuses the model), not counted from InternVL's settings or without the tower."""
    from transformers import AutoConfig

    from ril_fast.models import meta_model
    from ril_fast.processor import UnsupportedModel

    model = meta_model(AutoConfig.for_model("gemma3"))
    assert model.base_model.vision_tower is not None
    with pytest.raises(UnsupportedModel, match="model type 'gemma3' is a vision-language model ril_fast does not"):
        Shapes.of_model(model)
