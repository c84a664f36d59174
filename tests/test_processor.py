"""Rendering one sample (``ril_fast.processor``): images by path or in memory, EXIF and transparency as HF's image
processors see them, the cached prompt, prompt lengths counted from image sizes, ``max_image_pixels``."""

import dataclasses
import random

import pytest
import torch

from ril_fast.processor import load_image
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


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl"])
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
