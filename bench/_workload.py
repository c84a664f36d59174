"""The throughput benchmark's workloads: a student of a preset's real shape and a synthetic data set.

Presets (random weights; nothing is downloaded):

    tiny   ril_fast.tiny's Qwen2.5-VL (hidden 64, 2 layers, vocabulary ~1k): a CPU smoke test
    1b     Qwen2.5-VL's vision tower + a Qwen2.5-0.5B-sized decoder (InternVL3-1B's scale): 1.16 B
    3b     Qwen2.5-VL-3B's shapes (hidden 2048, 36 layers, 16/2 heads, tied 151,936 vocabulary): 3.75 B
    7b     Qwen2.5-VL-7B's shapes (hidden 3584, 28 layers, 28/4 heads, 152,064 vocabulary): 8.29 B

The folder reuses ril_fast.tiny's tokenizer, chat template and image processor (the big presets with
Qwen2.5-VL's real pixel bounds); the tokenizer's ~1k ids are a subset of the model's vocabulary,
which keeps its real size, so the LM head costs what it costs.

Lengths are drawn, not measured from a data set; the shapes follow common VQA / chart / math RL data:
image long side log-uniform over the preset's range with aspect 1, 4:3, 3:2 or 16:9 in either
orientation; question and teacher-response token counts log-normal (σ = 0.5) around the preset's
medians, clipped to [4, 8 × median] and, for responses, to L_max.

Student responses: a random model almost never samples its end-of-turn token, so every response would
run to L_max. ``stop_after`` gives the random student a fixed stopping probability p = 1 / mean per
token, so sampled lengths are geometric with the preset's mean (capped at L_max), as trained
students' lengths vary: the last decoder block's v_proj bias (softmax weights sum to one, so it adds
one constant vector u = W_o·b_v to the residual stream at every position) is scaled to dominate the
final hidden state, which makes the final norm's output nearly the constant h = norm(u); the
end-of-turn row of the LM head is set to β·h/|h|², so its logit is β, with β chosen against the other
logits W·h. Every other weight stays random and FLOPs are unchanged.
"""

import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VERSION = 1  # bump when the files written here change, so cached workloads are rebuilt
_MARKER = "bench_workload.json"

# Qwen2.5-VL's vision tower, as in every released Qwen2.5-VL checkpoint (3B, 7B, 32B, 72B).
QWEN2_5_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)


@dataclass(frozen=True)
class Preset:
    """A student shape and the step it is benchmarked on.

    ``text``: the Qwen2.5-VL text config (None: ril_fast.tiny's model); ``image_tokens``: the image
    processor's (min, max) tokens per image (28×28 pixels each); ``image_side``: the range of the drawn
    images' long side in pixels; ``*_tokens``: the medians (question, teacher response) and the mean
    (student response) of the drawn lengths; then the trainer settings of the step.
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


_QWEN = dict(image_tokens=(4, 1024), image_side=(336, 1344), question_tokens=40, teacher_tokens=150,
             student_tokens=150, max_new_tokens=512, questions_per_step=16, group_size=4, examples=64)

PRESETS = {
    "tiny": Preset("tiny", None, False, image_tokens=(4, 16), image_side=(28, 120), question_tokens=12,
                   teacher_tokens=10, student_tokens=8, max_new_tokens=16, questions_per_step=4, group_size=2,
                   max_tokens=256, examples=16),
    "1b": Preset("1b", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                            num_key_value_heads=2, vocab_size=151936), True, max_tokens=4096, **_QWEN),
    # 3B and 7B: 2048 tokens per micro-batch keeps the activations of one micro-batch (~9 GB for 3B
    # without activation checkpointing) beside the fp32 weights and AdamW states of two trained models.
    "3b": Preset("3b", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                            num_key_value_heads=2, vocab_size=151936), True, max_tokens=2048, **_QWEN),
    "7b": Preset("7b", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064), False, max_tokens=2048, **_QWEN),
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
_STUDENT_FIELDS = ("name", "text", "tie_embeddings", "layers", "image_tokens", "student_tokens")
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
    """The transformers ``Qwen2_5_VLConfig`` of a big preset (token ids: ril_fast.tiny's tokenizer)."""
    from transformers import Qwen2_5_VLConfig

    from ril_fast.tiny import SPECIAL_TOKENS

    ids = {t: SPECIAL_TOKENS.index(t) for t in SPECIAL_TOKENS}
    text = dict(preset.text)
    if preset.layers is not None:
        text["num_hidden_layers"] = preset.layers
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    # Qwen splits the head_dim / 2 rotary frequencies 1/4 : 3/8 : 3/8 over (t, h, w) ([16, 24, 24] at 128).
    t = head_dim // 8
    text.update(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=preset.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [t, 3 * t // 2, 3 * t // 2]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(QWEN2_5_VL_VISION, out_hidden_size=text["hidden_size"])
    if preset.layers is not None:
        vision["depth"] = min(vision["depth"], preset.layers)
        vision["fullatt_block_indexes"] = [vision["depth"] - 1]
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=preset.tie_embeddings,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _write_student(preset: Preset, out: Path, *, seed: int) -> None:
    """The student folder: ril_fast.tiny's files, with the preset's model and pixel bounds for big presets,
    then ``stop_after`` applied."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from ril_fast.tiny import make_tiny

    make_tiny(out, "qwen2_5_vl", seed=seed)
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
        config["size"] = {"shortest_edge": lo * 28 * 28, "longest_edge": hi * 28 * 28}
        (out / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def stop_after(model, mean_tokens: float, eos_id: int) -> float:
    """Make a random Qwen-VL model stop after about ``mean_tokens`` sampled tokens (geometric lengths).

    See the module docstring for how. Returns the stopping probability measured on a probe forward of
    random tokens (the target is 1 / ``mean_tokens``).
    """
    text = model.model.language_model
    attn = text.layers[-1].self_attn
    cfg = text.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    device = attn.o_proj.weight.device
    probe = torch.randint(16, min(cfg.vocab_size, 1000), (2, 64), device=device)
    states = text(input_ids=probe, use_cache=False, output_hidden_states=True).hidden_states
    scale = max(float(s.float().norm(dim=-1).max()) for s in states[:-1])  # the residual stream's size

    # u = W_o · (b_v repeated over the query heads that share each KV head), scaled to 100× the residual.
    b = torch.randn(kv * head_dim, device=device)
    u = attn.o_proj.weight.float() @ b.view(kv, head_dim).repeat_interleave(heads // kv, 0).flatten()
    factor = 100 * scale / float(u.norm())
    attn.v_proj.bias.copy_((b * factor).to(attn.v_proj.bias.dtype))
    h = text.norm(u[None] * factor)[0].float()  # the nearly constant final hidden state
    head = model.get_output_embeddings().weight
    others = head.float() @ h
    others[eos_id] = -math.inf
    p = 1.0 / mean_tokens
    beta = float(torch.logsumexp(others, 0)) + math.log(p / (1 - p))
    head[eos_id] = (beta * h / h.dot(h)).to(head.dtype)

    hidden = model.model(input_ids=probe, use_cache=False).last_hidden_state
    return float(torch.softmax((hidden @ head.T).float(), -1)[..., eos_id].mean())


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
