"""The throughput benchmark's workloads: a student of a preset's real shape and a synthetic data set.

Presets (random weights; nothing is downloaded):

    tiny          ril_fast.tiny's Qwen2.5-VL (hidden 64, 2 layers, vocabulary ~1k): a CPU smoke test
    qwen3vl-tiny  ril_fast.tiny's Qwen3-VL (the same decoder widths, q/k norms, DeepStack): a CPU smoke test
    1b            Qwen2.5-VL's vision tower + a Qwen2.5-0.5B-sized decoder (InternVL3-1B's scale): 1.16 B
    3b            Qwen2.5-VL-3B's shapes (hidden 2048, 36 layers, 16/2 heads, tied 151,936 vocabulary): 3.75 B
    7b            Qwen2.5-VL-7B's shapes (hidden 3584, 28 layers, 28/4 heads, 152,064 vocabulary): 8.29 B
    qwen3vl-2b    Qwen3-VL-2B-Instruct's shapes (hidden 2048, 28 layers, 16/8 heads, tied vocabulary): 2.13 B
    qwen3vl-4b    Qwen3-VL-4B-Instruct's shapes (hidden 2560, 36 layers, 32/8 heads, tied vocabulary): 4.44 B
    qwen3vl-8b    Qwen3-VL-8B-Instruct's shapes (hidden 4096, 36 layers, 32/8 heads, untied): 8.77 B

The folder reuses ril_fast.tiny's tokenizer, chat template and image processor (the big presets with
the real pixel bounds: 28×28 pixels per image token for Qwen2.5-VL, 32×32 for Qwen3-VL); the
tokenizer's ~1k ids are a subset of the model's vocabulary, which keeps its real size, so the LM head
costs what it costs.

Lengths are drawn, not measured from a data set; the shapes follow common VQA / chart / math RL data:
image long side log-uniform over the preset's range with aspect 1, 4:3, 3:2 or 16:9 in either
orientation; question and teacher-response token counts log-normal (σ = 0.5) around the preset's
medians, clipped to [4, 8 × median] and, for responses, to L_max.

Student responses: a random model almost never samples its end-of-turn token, so every response would
run to L_max. ``stop_after`` gives the random student a fixed stopping probability p = 1 / mean per
token, so sampled lengths are geometric with the preset's mean (capped at L_max), as trained
students' lengths vary. A vector u added to the residual stream at every position, large enough to
dominate the final hidden state, makes the final norm's output nearly the constant h = norm(u); the
end-of-turn row of the LM head is set to β·h/|h|², so its logit is β, with β chosen against the other
logits W·h. Qwen3's decoder has no bias to add u with (version 1 used Qwen2.5's v_proj bias), so the
last decoder layer's MLP makes it, for both families: with x that layer's RMS-normalised input (|x|² = H,
the hidden size, while the norm's weights are ones, as initialised), 2H of its I units get the gate and
up rows ±q_i, the rows of a random orthogonal H×H matrix, and the down columns u/H. As silu(t) - silu(-t)
= t, a pair ±q outputs silu(q·x)·(q·x) + silu(-q·x)·(-q·x) = (q·x)², so the 2H units add
u·Σ_i (q_i·x)²/H = u·|x|²/H = u at every position. The layer's other I - 2H units and every other weight
stay random; no weight changes shape, so FLOPs are unchanged.
"""

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VERSION = 2  # bump when the files written here change, so cached workloads are rebuilt (2: stop_after's MLP)
_MARKER = "bench_workload.json"

# Qwen2.5-VL's vision tower, as in every released Qwen2.5-VL checkpoint (3B, 7B, 32B, 72B).
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)

# Qwen3-VL (dense), from the released Qwen3-VL-{2B,4B,8B}-Instruct config.json files as remembered, cross-checked
# with copies of them in public code (torchtitan's qwen3_vl flavours "2B" and "8B"; a verbatim 4B config.json)
# and with transformers' Qwen3VLConfig defaults (its vision defaults are the 8B tower; its docstring names 4B).
# Sure: every width, depth, head count and DeepStack index below, head_dim 128, vocabulary 151,936, rope_theta
# 5e6 with interleaved mrope [24, 20, 20], 16-pixel patches, merge 2, temporal patch 2, 2,304 position
# embeddings, gelu_pytorch_tanh, tied embeddings for 2B and 4B. Less sure: 8B untied (torchtitan leaves its
# tying off; tied it would count 8.14 B, not the published 8.77 B), max_position_embeddings 262,144 (no effect
# here). The built models count 2.128 / 4.438 / 8.767 B parameters; the model pages say 2.13 / 4.44 / 8.77 B.
_QWEN3_VL = dict(in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                 num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
QWEN3_VL_VISION = dict(_QWEN3_VL, depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                       deepstack_visual_indexes=[5, 11, 17])  # 2B and 4B
QWEN3_VL_8B_VISION = dict(_QWEN3_VL, depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                          deepstack_visual_indexes=[8, 16, 24])


@dataclass(frozen=True)
class Preset:
    """A student shape and the step it is benchmarked on.

    ``text``: the text config (None: ril_fast.tiny's model of ``arch``); ``image_tokens``: the image
    processor's (min, max) tokens per image (28×28 pixels each; Qwen3-VL 32×32); ``image_side``: the range
    of the drawn images' long side in pixels; ``*_tokens``: the medians (question, teacher response) and the
    mean (student response) of the drawn lengths; then the trainer settings of the step; ``arch``: the
    model type (``ril_fast.tiny.ARCHS``); ``vision``: the vision config of a big preset (None:
    ``QWEN2_5_VL_VISION``).
    """

    name: str
    text: dict | None
    tie_embeddings: bool
    image_tokens: tuple[int, int]
    image_side: tuple[int, int]
    question_tokens: int
    teacher_tokens: int
    student_tokens: int
    max_new_tokens: int
    questions_per_step: int
    group_size: int
    max_tokens: int
    examples: int
    layers: int | None = None  # fewer decoder (and vision) blocks of the same widths: a quick look
    arch: str = "qwen2_5_vl"
    vision: dict | None = None


_QWEN = dict(image_tokens=(4, 1024), image_side=(336, 1344), question_tokens=40, teacher_tokens=150,
             student_tokens=150, max_new_tokens=512, questions_per_step=16, group_size=4, examples=64)
_TINY = dict(image_tokens=(4, 16), image_side=(28, 120), question_tokens=12, teacher_tokens=10, student_tokens=8,
             max_new_tokens=16, questions_per_step=4, group_size=2, max_tokens=256, examples=16)


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    """A Qwen3-VL text config: 8 KV heads of 128 dimensions, 151,936 tokens."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=8, head_dim=128, vocab_size=151936)


PRESETS = {
    "tiny": Preset("tiny", None, False, **_TINY),
    "qwen3vl-tiny": Preset("qwen3vl-tiny", None, False, arch="qwen3_vl", **_TINY),
    "1b": Preset("1b", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, vocab_size=151936), True, max_tokens=4096, **_QWEN),
    # 3B and 7B: 2048 tokens per micro-batch keeps the activations of one micro-batch (~9 GB for 3B
    # without activation checkpointing) beside the fp32 weights and AdamW states of two trained models.
    "3b": Preset("3b", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                            num_key_value_heads=2, vocab_size=151936), True, max_tokens=2048, **_QWEN),
    "7b": Preset("7b", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064), False, max_tokens=2048, **_QWEN),
    # Qwen3-VL: the same workload and image-token bounds as the Qwen2.5-VL presets (an image token is 32×32
    # pixels here, so an image of the same size gives ~23% fewer tokens below the cap).
    "qwen3vl-2b": Preset("qwen3vl-2b", _qwen3(2048, 6144, 28, 16), True, max_tokens=2048, arch="qwen3_vl",
                         vision=QWEN3_VL_VISION, **_QWEN),
    "qwen3vl-4b": Preset("qwen3vl-4b", _qwen3(2560, 9728, 36, 32), True, max_tokens=2048, arch="qwen3_vl",
                         vision=QWEN3_VL_VISION, **_QWEN),
    "qwen3vl-8b": Preset("qwen3vl-8b", _qwen3(4096, 12288, 36, 32), False, max_tokens=2048, arch="qwen3_vl",
                         vision=QWEN3_VL_8B_VISION, **_QWEN),
}


@dataclass(frozen=True)
class Workload:
    """A built workload: the student folder, the training JSONL and one JSONL per teacher."""

    root: Path
    student: Path
    train: Path
    teachers: tuple[Path, ...]


# ----------------------------------------------------------------------------------------------------
# Building (once per preset; cached)
# ----------------------------------------------------------------------------------------------------
_STUDENT_FIELDS = ("name", "arch", "text", "vision", "tie_embeddings", "layers", "image_tokens", "student_tokens")
_DATA_FIELDS = ("image_side", "question_tokens", "teacher_tokens", "max_new_tokens", "examples")


def build(preset: Preset, root: Path, *, seed: int = 0) -> Workload:
    """Write ``preset``'s student folder (``root/student``) and synthetic data (``root/data``) unless they
    are there already, each rebuilt only when the settings it depends on change.

    Each is written to a sibling temporary folder and renamed into place, so ranks of a torchrun that
    wait on rank 0 never see half-written files. Returns the paths.
    """
    root = Path(root)
    fields = asdict(preset)
    student = _cached(root / "student", {"version": VERSION, "seed": seed, **{k: fields[k] for k in _STUDENT_FIELDS}},
                      lambda out: _write_student(preset, out, seed=seed))
    data = _cached(root / "data", {"version": VERSION, "seed": seed, **{k: fields[k] for k in _DATA_FIELDS}},
                   lambda out: _write_data(preset, out, student, seed=seed))
    return Workload(root, student, data / "train.jsonl", (data / "teacher_a.jsonl", data / "teacher_b.jsonl"))


def _cached(folder: Path, settings: dict, write) -> Path:
    """``folder``, written by ``write(folder)`` unless its marker already records ``settings``."""
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they read back
    marker = folder / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return folder
    if folder.exists() and any(folder.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{folder} exists and was not written by the throughput benchmark: choose another "
                              f"--workdir")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    (tmp / _MARKER).write_text(json.dumps(settings) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def model_config(preset: Preset):
    """The transformers config (``Qwen2_5_VLConfig`` or ``Qwen3VLConfig``) of a big preset, ``preset.layers``
    applied (token ids: ril_fast.tiny's tokenizer)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    from ril_fast.tiny import SPECIAL_TOKENS

    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    text = dict(preset.text)
    vision = dict(preset.vision or QWEN2_5_VL_VISION, out_hidden_size=text["hidden_size"])
    if preset.layers is not None:
        text["num_hidden_layers"] = preset.layers
        if preset.layers < vision["depth"]:
            vision["depth"] = depth = preset.layers
            if "fullatt_block_indexes" in vision:
                vision["fullatt_block_indexes"] = [depth - 1]
            if "deepstack_visual_indexes" in vision:  # as many DeepStack blocks as fit, spread over the depth
                n = min(len(vision["deepstack_visual_indexes"]), depth)
                vision["deepstack_visual_indexes"] = [k * depth // n for k in range(n)]
    text.update(rms_norm_eps=1e-6, tie_word_embeddings=preset.tie_embeddings, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if preset.arch == "qwen3_vl":
        # Interleaved mrope over the 64 rotary frequencies of head_dim 128 (t, h, w: 24, 20, 20).
        text.update(max_position_embeddings=262144, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True})
        cls = Qwen3VLConfig
    else:
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        # Qwen splits the head_dim / 2 rotary frequencies 1/4 : 3/8 : 3/8 over (t, h, w) ([16, 24, 24] at 128).
        t = head_dim // 8
        text.update(max_position_embeddings=32768, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, 3 * t // 2, 3 * t // 2]})
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=preset.tie_embeddings,
               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _write_student(preset: Preset, out: Path, *, seed: int) -> None:
    """The student folder: ril_fast.tiny's files of ``preset.arch``, with the preset's model and pixel bounds
    for big presets, then ``stop_after`` applied."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from ril_fast.tiny import make_tiny

    make_tiny(out, preset.arch, seed=seed)
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if preset.text is None:
            model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).to(device)
        else:
            # Built on the GPU when there is one (seconds, not minutes, for billions of random weights);
            # saved in bf16, which the trainer upcasts to its fp32 master weights.
            with torch.device(device):
                model = AutoModelForImageTextToText.from_config(model_config(preset), dtype=torch.bfloat16)
        stop_after(model, preset.student_tokens, eos)
    for f in out.glob("*.safetensors*"):  # the tiny weights; a big model is saved in shards beside an index
        f.unlink()
    model.save_pretrained(out)
    if preset.text is not None:
        config = json.loads((out / "preprocessor_config.json").read_text())
        lo, hi = preset.image_tokens
        side = config["patch_size"] * config["merge_size"]  # pixels per image token: 28 or 32 (Qwen3-VL)
        config["size"] = {"shortest_edge": lo * side * side, "longest_edge": hi * side * side}
        (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def stop_after(model, mean_tokens: float, eos_id: int) -> float:
    """Make a random Qwen-VL model (Qwen2.5-VL or Qwen3-VL) stop after about ``mean_tokens`` sampled tokens
    (geometric lengths).

    See the module docstring for how: the last decoder layer's MLP adds a constant u (100× the residual
    stream's largest norm on a probe) at every position, and the LM head's end-of-turn row reads it.
    Returns the stopping probability measured on a probe forward of random tokens (the target is
    1 / ``mean_tokens``).
    """
    text = model.model.language_model
    cfg = text.config
    mlp = text.layers[-1].mlp
    hidden = cfg.hidden_size
    if cfg.hidden_act != "silu" or mlp.gate_proj.out_features < 2 * hidden:
        raise ValueError(f"stop_after needs a SiLU-gated MLP at least twice the hidden size wide, got "
                         f"{cfg.hidden_act} with {mlp.gate_proj.out_features} units for hidden size {hidden}")
    device = mlp.down_proj.weight.device
    probe = torch.randint(16, min(cfg.vocab_size, 1000), (2, 64), device=device)
    states = text(input_ids=probe, use_cache=False, output_hidden_states=True).hidden_states
    scale = max(float(s.float().norm(dim=-1).max()) for s in states[:-1])  # the residual stream's size

    # Units ±q_i (rows of a random orthogonal Q) sum to Σ_i (q_i·x)² = |x|² = H for the RMS-normalised x,
    # and the down columns u / H turn that into u.
    q = torch.linalg.qr(torch.randn(hidden, hidden, device=device))[0]
    u = torch.randn(hidden, device=device)
    u *= 100 * scale / float(u.norm())
    for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
        w[:2 * hidden] = torch.cat([q, -q]).to(w.dtype)
    mlp.down_proj.weight[:, :2 * hidden] = (u / hidden)[:, None].to(mlp.down_proj.weight.dtype)

    h = text.norm(u[None])[0].float()  # the nearly constant final hidden state
    head = model.get_output_embeddings().weight
    others = head.float() @ h
    others[eos_id] = -math.inf
    p = 1.0 / mean_tokens
    beta = float(torch.logsumexp(others, 0)) + math.log(p / (1 - p))
    head[eos_id] = (beta * h / h.dot(h)).to(head.dtype)

    hidden_states = model.model(input_ids=probe, use_cache=False).last_hidden_state
    return float(torch.softmax((hidden_states @ head.T).float(), -1)[..., eos_id].mean())


def _lognormal(rng: random.Random, median: float, cap: int) -> int:
    """A log-normal count (σ = 0.5) around ``median``, clipped to [4, min(8 × median, cap)]."""
    return int(min(max(4, round(median * math.exp(rng.gauss(0, 0.5)))), 8 * median, cap))


_WORDS = ("the chart shows a red circle left of blue square three triangles value of x equals 4 tallest bar "
          "in March so first count then compare answer is final step by step area angle degrees total "
          "price percent row column table figure label legend axis line rises falls").split()


def _text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random words of at most ``tokens`` tokens of ``tokenizer`` (cut, then re-checked: BPE may merge
    differently across the cut)."""
    ids = tokenizer(" ".join(rng.choice(_WORDS) for _ in range(tokens)), add_special_tokens=False)["input_ids"]
    cut = tokens
    while True:
        text = tokenizer.decode(ids[:cut]).strip()
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= tokens:
            return text
        cut -= 1


def _image(rng: random.Random, side: tuple[int, int]):
    """A smooth random RGB image (a 4×4 noise upsampled: cheap to write) with the drawn size."""
    from PIL import Image

    long = round(math.exp(rng.uniform(math.log(side[0]), math.log(side[1]))))
    aspect = rng.choice((1.0, 4 / 3, 3 / 2, 16 / 9))
    short = max(side[0] // 2, round(long / aspect))
    w, h = (long, short) if rng.random() < 0.5 else (short, long)
    small = Image.frombytes("RGB", (4, 4), bytes(rng.randrange(256) for _ in range(48)))
    return small.resize((w, h), Image.BILINEAR)


def _write_data(preset: Preset, root: Path, student: Path, *, seed: int) -> None:
    """train.jsonl (one image per question) and two teacher collections (two responses per question),
    lengths counted with ``student``'s tokenizer."""
    from transformers import AutoTokenizer

    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(student)
    (root / "images").mkdir()
    examples, teachers = [], {"teacher_a": [], "teacher_b": []}
    for i in range(preset.examples):
        name = f"images/{i}.png"
        _image(rng, preset.image_side).save(root / name)
        question = _text(rng, tok, _lognormal(rng, preset.question_tokens, 8 * preset.question_tokens)) + "?"
        examples.append({"id": str(i), "question": question, "answer": rng.choice(_WORDS), "images": [name]})
        for rows in teachers.values():
            for _ in range(2):
                rows.append({"id": str(i), "response": _text(rng, tok, _lognormal(rng, preset.teacher_tokens,
                                                                                  preset.max_new_tokens - 1))})
    for name, rows in [("train", examples), *teachers.items()]:
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
