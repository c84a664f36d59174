"""Rendering one sample (``ril_fast.processor``): images by path or in memory, EXIF and transparency as HF's image
processors see them (``ril_fast.images.load_image``), the cached prompt, prompt lengths counted from image sizes,
``max_image_pixels``."""

import dataclasses
import random

import pytest
import torch

from ril_fast.images import load_image
from models_fixtures import one_thread, processors, random_image, tiny_folder  # noqa: F401


def test_image_paths_equal_images(processors, tmp_path):
    proc = processors["qwen2_5_vl"]
    image = random_image(70, 50)
    image.save(tmp_path / "a.png")
    a = proc.encode(dict(images=[image], question="q", response="r"))
    b = proc.encode(dict(images=[tmp_path / "a.png"], question="q", response="r"))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(a.mrope, b.mrope)


def test_images_load_as_hf_processors_see_them(tmp_path):
    """Transparency is composited onto white (a plain convert("RGB") gives black) and EXIF orientation is
    applied, for paths and for PIL images alike; opaque images keep their pixels."""
    from PIL import Image

    transparent = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    transparent.paste((200, 10, 30, 255), (5, 2, 15, 8))
    transparent.save(tmp_path / "t.png")
    palette = transparent.convert("RGB").quantize(4)
    palette.info["transparency"] = palette.getpixel((0, 0))
    palette.save(tmp_path / "p.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    rotated.save(tmp_path / "r.jpg", exif=exif)
    opaque = random_image(9, 7)
    opaque.save(tmp_path / "o.png")
    for source in (tmp_path / "t.png", transparent, tmp_path / "p.png"):
        im = load_image(source)
        assert im.mode == "RGB" and im.size == (20, 10)
        assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((10, 5)) == (200, 10, 30)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
    assert load_image(str(tmp_path / "o.png")).tobytes() == opaque.convert("RGB").tobytes()


def test_an_image_that_cannot_be_decoded_is_a_value_error_naming_it(tmp_path):
    """A file cut short since the data was checked (or never an image) is a ValueError naming the file, which
    the trainer turns into an error naming the example's line (``train._name_the_failing_prompt``)."""
    random_image(64, 48).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:int(len(data) * random.uniform(0.3, 0.95))])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png", "missing.png"):
        with pytest.raises(ValueError, match=f"cannot read image {tmp_path / name}: "):
            load_image(tmp_path / name)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_a_template_that_drops_the_images_is_a_value_error(arch, tmp_path_factory):
    """A chat template that renders only a message's text parts writes no image placeholder: encoding a prompt with
    an image is then a ValueError counting the placeholders, never a prompt whose images are silently dropped."""
    from ril_fast.processor import Processor

    proc = Processor.from_pretrained(tiny_folder(tmp_path_factory, arch))
    proc.tokenizer.chat_template = ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{%- for part in m['content'] "
                                    "%}{%- if part['type'] == 'text' %}{{ part['text'] }}{%- endif %}{%- endfor %}"
                                    "<|im_end|>\n{%- endfor %}<|im_start|>assistant\n")
    assert proc.encode_prompt("What is it?", []).prompt_len > 0
    with pytest.raises(ValueError, match=r"^the chat template rendered 0 image placeholders for 1 images$"):
        proc.encode_prompt("What is it?", [random_image(32, 32)])


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "internvl"])
def test_cached_prompt_equals_a_fresh_encoding(arch, processors, tmp_path, _fresh_seed):
    """Questions whose images are paths keep their rendered prompt: responses of random lengths to the same
    question encode as a fresh, uncached processor encodes them, mrope included (checked against the
    model's own get_rope_index over the whole sequence), and the prompt is rendered once."""
    proc = processors[arch]
    fresh = dataclasses.replace(proc, prompt_cache_size=0)  # maxsize 0: nothing kept
    paths = []
    for i, (w, h) in enumerate([(70, 50), (56, 84)]):
        random_image(w, h).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    responses = [" ".join(rng.choice(["red", "circle", "a", "is", "The"]) for _ in range(rng.randint(1, 12)))
                 for _ in range(5)]
    before = proc._cached_prompt.cache_info()
    for response in responses:
        sample = dict(images=paths, question="Which shapes?", response=response)
        a, b = proc.encode(sample), fresh.encode(sample)
        assert torch.equal(a.input_ids, b.input_ids) and a.prompt_len == b.prompt_len
        assert torch.equal(a.pixel_values, b.pixel_values)
        if arch == "qwen2_5_vl":
            assert torch.equal(a.mrope, b.mrope)
            assert torch.equal(a.mrope, proc.rope_index(a.input_ids[None], a.image_grid_thw)[:, 0])
    after = proc._cached_prompt.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, len(responses) - 1)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5"])
def test_prompt_lengths_from_image_sizes_equal_the_encodings(arch, processors, _fresh_seed):
    """Counted from a question and its images' (width, height) alone, as the trainer counts every example before
    training, a prompt takes the tokens its encoding takes: 0-3 images a prompt (none for the text model) of
    random sizes from well under the image processor's fewest pixels to far over its most, random questions."""
    from PIL import Image

    proc = processors[arch]
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    prompts = []
    for _ in range(12):
        images = 0 if arch == "qwen2" else rng.randint(0, 3)
        sizes = [(rng.randint(12, 1500), rng.randint(12, 1500)) for _ in range(images)]
        prompts.append((" ".join(rng.choice(["what", "shape", "is", "the", "red", "12"]) for _ in range(
            rng.randint(1, 30))) + "?", sizes))
    counted = proc.prompt_lengths(prompts)
    encoded = [proc.encode_prompt(q, [Image.new("RGB", size) for size in sizes]).prompt_len for q, sizes in prompts]
    assert counted == encoded
    if arch != "qwen2":  # the sizes did change the image tokens: an image's span is not a constant
        spans = {proc.image_tokens(w, h) for _, sizes in prompts for w, h in sizes}
        assert len(spans) > 1, spans


def _hf_processor(arch: str, folder, monkeypatch):
    """transformers' own processor of the tiny ``arch`` folder, built without torchvision (its video processor
    class, checked at construction, imports it): that check is skipped and no video processor is given; InternVL's
    image tokens are set on the tokenizer as the released ``-hf`` tokenizers carry them."""
    import json

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    parts = dict(image_processor=AutoImageProcessor.from_pretrained(folder), tokenizer=tokenizer, video_processor=None,
                 chat_template=tokenizer.chat_template)
    if arch.startswith("internvl"):
        for name, token in dict(start_image_token="<img>", end_image_token="</img>",
                                context_image_token="<IMG_CONTEXT>", video_token="<video>").items():
            setattr(tokenizer, name, token)
            setattr(tokenizer, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
        seq = json.loads((folder / "config.json").read_text())["image_seq_length"]
        return transformers.InternVLProcessor(**parts, image_seq_length=seq)
    names = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
             "qwen3_5": "Qwen3VLProcessor"}
    return getattr(transformers, names[arch])(**parts)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "internvl", "internvl3_5"])
def test_prompt_ids_and_pixels_are_the_hf_processors(arch, processors, tmp_path_factory, monkeypatch, _fresh_seed):
    """A prompt encoded by ril_fast (the chat template, then each image placeholder expanded in id space) is what
    transformers' own processor makes of the same rendered text and images: the same ids, the same pixel values and
    (Qwen-VL) the same grids, for 0-3 images a prompt of random sizes and random pixels."""
    folder = tiny_folder(tmp_path_factory, arch)
    proc = processors[arch]
    hf = _hf_processor(arch, folder, monkeypatch)
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    for n in (0, 1, 2, 3):
        question = " ".join(rng.choice(["what", "shape", "is", "the", "red", "12"]) for _ in range(rng.randint(1, 9)))
        images = [random_image(rng.randint(12, 400), rng.randint(12, 400)) for _ in range(n)]
        ours = proc.encode_prompt(question + "?", images)
        theirs = hf(text=[proc.prompt_text(question + "?", n)], images=[images] if images else None,
                    return_tensors="pt")
        assert torch.equal(ours.input_ids, theirs["input_ids"][0]), (n, ours.input_ids, theirs["input_ids"])
        if n:
            assert torch.equal(ours.pixel_values, theirs["pixel_values"])
            if "image_grid_thw" in theirs:
                assert torch.equal(ours.image_grid_thw, theirs["image_grid_thw"])
        else:
            assert ours.pixel_values is None and "pixel_values" not in theirs


def test_max_image_pixels_caps_images_and_travels_with_the_saved_processor(processors, tmp_path, tmp_path_factory,
                                                                           _fresh_seed):
    """``max_image_pixels`` overrides the folder's own budget (written as the real Qwen2.5-VL writes it:
    ``max_pixels`` 12,845,056): every image of random size is resized to at most that many pixels (or to a short
    side of 28, Qwen's least), the counted
    prompt lengths still equal the encodings, and the saved image processor (final/, checkpoints) resizes the
    same way. A budget under the processor's floor, or for a student that tiles images, is refused."""
    import json
    import shutil

    from PIL import Image

    from ril_fast.export import save_processor
    from ril_fast.processor import Processor, UnsupportedSetting

    real = shutil.copytree(tiny_folder(tmp_path_factory, "qwen2_5_vl"), tmp_path / "real")
    config = json.loads((real / "preprocessor_config.json").read_text())
    del config["size"]
    (real / "preprocessor_config.json").write_text(json.dumps(config | {"min_pixels": 3136, "max_pixels": 12845056}))
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    budget = rng.randint(3136, 60000)
    limited = dataclasses.replace(Processor.from_pretrained(real, max_image_pixels=budget),
                                  rope_index=processors["qwen2_5_vl"].rope_index)
    own = Processor.from_pretrained(real)
    sizes = [(rng.randint(20, 2000), rng.randint(20, 2000)) for _ in range(8)]
    grid = limited.encode_prompt("q?", [Image.new("RGB", s) for s in sizes]).image_grid_thw
    # Pixels after resizing (14x14 a patch): within the budget, unless the image is so thin that its short side
    # already is the one merged patch (28 pixels) that Qwen's resizing never goes under.
    thin = grid[:, 1:].min(1).values == 2
    assert ((grid[:, 1] * grid[:, 2] * 14 * 14 <= budget) | thin).all(), (budget, grid, sizes)
    prompts = [("q?", [s]) for s in sizes]
    assert limited.prompt_lengths(prompts) == [limited.encode_prompt(q, [Image.new("RGB", s) for s in ss]).prompt_len
                                               for q, ss in prompts]
    assert sum(map(own.image_tokens, *zip(*sizes))) > sum(map(limited.image_tokens, *zip(*sizes)))
    saved = tmp_path / "saved"
    saved.mkdir()
    shutil.copy(real / "config.json", saved)
    save_processor(limited, saved)
    again = Processor.from_pretrained(saved)
    assert [again.image_tokens(w, h) for w, h in sizes] == [limited.image_tokens(w, h) for w, h in sizes]
    with pytest.raises(UnsupportedSetting, match=r"max_image_pixels=3000: .* enlarges every image to at least 3136"):
        Processor.from_pretrained(real, max_image_pixels=3000)
    with pytest.raises(UnsupportedSetting, match=r"max_image_pixels=9000: only Qwen-VL students .* internvl model"):
        Processor.from_pretrained(tiny_folder(tmp_path_factory, "internvl"), max_image_pixels=9000)


def test_the_end_of_turn_token_is_the_templates(processors, tmp_path_factory):
    """Every family's tiny template ends turns with <|im_end|>, its tokenizer's eos too: the one stop token. A Qwen
    base folder (tokenizer eos <|endoftext|>, template turns ending with <|im_end|>, generation_config eos [0, 2]):
    the end-of-turn token is the template's, both stop a response and are control tokens, and a finished response
    encodes followed by <|im_end|> (a rollout's by the stop token it sampled, a truncated one by nothing), in as
    many tokens as ``response_lengths`` counts. A template that writes text after a reply falls back to the eos."""
    import shutil

    from ril_fast.processor import Processor
    from models_fixtures import turn_end_folder

    for arch, proc in processors.items():
        im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert (proc.end_token_id, proc.stop_token_ids) == (im_end, (im_end,)), arch
    folder = turn_end_folder(tmp_path_factory, [0, 2])
    proc = Processor.from_pretrained(folder)
    tok = proc.tokenizer
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token_id, proc.end_token_id, proc.stop_token_ids) == (eos, im_end, (im_end, eos))
    assert {"<|im_end|>", "<|endoftext|>"} <= set(proc.control_tokens)
    sample = dict(question="What colour is it?", response="It is blue.")
    ids = tok(sample["response"], add_special_tokens=False)["input_ids"]
    enc = proc.encode(sample)
    assert enc.input_ids[enc.prompt_len:].tolist() == ids + [im_end]
    assert enc.response_len == proc.response_lengths([sample["response"]])[0]
    assert proc.encode(dict(sample, response_ids=ids, end_id=eos)).input_ids[enc.prompt_len:].tolist() == ids + [eos]
    assert proc.encode(dict(sample, truncated=True)).input_ids[enc.prompt_len:].tolist() == ids
    plain = tmp_path_factory.mktemp("plain_template") / "m"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").write_text(
        "{%- for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{%- endfor %}"
        "{%- if add_generation_prompt %}### assistant: {%- endif %}")
    proc = Processor.from_pretrained(plain)
    assert (proc.end_token_id, proc.stop_token_ids) == (eos, (eos, im_end))
    assert proc.encode(sample).input_ids[-1].item() == eos


def test_control_tokens_are_those_around_a_question_with_an_image(processors):
    """``control_tokens``: the chat template's turn markup around a question, the end of turn and padding, and for a
    vision-language student the image markup its template writes around an image (Qwen-VL's <|vision_start|> and
    <|vision_end|>: no image id of the processor names them) and its image tokens."""
    turns = ("<|endoftext|>", "<|im_end|>", "<|im_start|>")
    want = {"qwen2": (), **dict.fromkeys(("internvl", "internvl3_5"), ("</img>", "<IMG_CONTEXT>", "<img>"))}
    for arch, proc in processors.items():
        image = want.get(arch, ("<|image_pad|>", "<|vision_end|>", "<|vision_start|>"))
        assert proc.control_tokens == tuple(sorted(turns + image)), arch


def test_turn_end_id_of_other_templates(tmp_path_factory):
    """The special token a template writes right after an assistant's reply: Gemma's <end_of_turn>, Llama 3's
    <|eot_id|> (special, but not among the tokenizer's named special tokens), a template reading only lists of
    parts (a string reply renders as nothing), each then a control token; None after nothing, a newline or plain text
    (a plain token there is no turn end), for a template that raises, or none at all."""
    from transformers import AutoTokenizer

    from ril_fast.processor import ModelKind, Processor, turn_end_id

    tok = AutoTokenizer.from_pretrained(tiny_folder(tmp_path_factory, "qwen2"))
    tok.add_tokens(["<start_of_turn>", "<end_of_turn>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   special_tokens=True)
    loop = "{%- for m in messages %}"
    cases = [
        ("<end_of_turn>", loop + "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
                          "{{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
                          "{%- endfor %}"),
        ("<|eot_id|>", loop + "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim"
                       " + '<|eot_id|>' }}{%- endfor %}"),
        ("<|im_end|>", loop + "<|im_start|>{{ m['role'] }}\n{%- for part in m['content'] %}{{- part['text'] }}"
                       "{%- endfor %}<|im_end|>\n{%- endfor %}"),
        (None, loop + "### {{ m['role'] }}: {{ m['content'] }}\n{%- endfor %}"),  # nothing after the reply
        (None, loop + "### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),  # a newline, a plain token
        (None, loop + "### {{ m['role'] }}: {{ m['content'] }} END\n{% endfor %}"),  # plain text
    ]
    for want, template in cases:
        tok.chat_template = template
        got = turn_end_id(tok, ModelKind.TEXT)
        assert (tok.convert_ids_to_tokens(got) if got is not None else None) == want, template
        if got is not None:  # the turn end is a control token of a processor built on it
            assert want in Processor(tokenizer=tok, end_token_id=got).control_tokens
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    assert turn_end_id(tok, ModelKind.TEXT) is None
    tok.chat_template = None
    assert turn_end_id(tok, ModelKind.QWEN_VL) is None
