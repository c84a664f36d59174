"""Data: every malformed line is a FILE:LINE: error; teacher lookup and balance; resumable sharded batches."""

import collections
import json
import random
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from ril_fast.data import (Batches, DataError, Example, LongPrompts, fitting, load_examples, load_teachers,
                           question_digest, to_sample)
from ril_fast.images import load_image

GOOD = {"id": "a", "question": "What shape?", "answer": "circle", "images": ["img/a.png"]}


@pytest.fixture
def folder(tmp_path):
    """A folder with img/a.png (a real PNG), img/broken.png (a PNG signature, then junk), img/cut.png
    (a real PNG cut in half), img/cut.jpg (a real JPEG cut short: its header whole), img/cut.{gif,bmp,tiff,webp}
    (likewise), img/text.png (a text file), and pixels of other depths: img/deep.png and img/deep_be.tiff (16-bit,
    little- and big-endian), img/float.tiff, img/wide.tiff (32-bit, past 255) and img/narrow.tiff (32-bit, 3..255)."""
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    noise = Image.frombytes("RGB", (64, 64), random.randbytes(64 * 64 * 3))
    noise.save(tmp_path / "img" / "full.png")
    data = (tmp_path / "img" / "full.png").read_bytes()
    (tmp_path / "img" / "cut.png").write_bytes(data[:len(data) // 2])
    noise.save(tmp_path / "img" / "full.jpg", quality=90)
    data = (tmp_path / "img" / "full.jpg").read_bytes()
    (tmp_path / "img" / "cut.jpg").write_bytes(data[:int(len(data) * random.uniform(0.3, 0.95))])
    noise.save(tmp_path / "img" / "full.mpo", format="MPO", save_all=True, append_images=[noise.rotate(90)])
    data = (tmp_path / "img" / "full.mpo").read_bytes()  # a phone's multi-picture JPEG; cut in its first picture
    (tmp_path / "img" / "cut.mpo").write_bytes(data[:int(len(data) * random.uniform(0.15, 0.45))])
    for fmt in ("gif", "bmp", "tiff", "webp"):  # formats verify() decodes nothing of
        noise.save(tmp_path / "img" / f"full.{fmt}")
        data = (tmp_path / "img" / f"full.{fmt}").read_bytes()
        (tmp_path / "img" / f"cut.{fmt}").write_bytes(data[:int(len(data) * random.uniform(0.3, 0.95))])
    (tmp_path / "img" / "text.png").write_text("id,question\n1,what?\n")
    pixels = np.random.default_rng().integers(256, 65536, (8, 8), dtype=np.uint16)  # a 16-bit grey scan
    Image.fromarray(pixels).save(tmp_path / "img" / "deep.png")
    Image.fromarray(np.random.default_rng().random((8, 8), dtype=np.float32)).save(tmp_path / "img" / "float.tiff")
    Image.frombytes("I;16B", (8, 8), pixels.astype(">u2").tobytes()).save(tmp_path / "img" / "deep_be.tiff")
    Image.fromarray(pixels.astype(np.int32)).save(tmp_path / "img" / "wide.tiff")
    narrow = (pixels // 256).astype(np.int32).clip(3, 255)
    narrow[0, :2] = 3, 255  # 32-bit, within 8: up to 255 exactly
    Image.fromarray(narrow).save(tmp_path / "img" / "narrow.tiff")
    return tmp_path


def write_jsonl(path, lines):
    """Write raw lines (dicts are JSON-encoded, str and bytes written as they are)."""
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return path


CONTROL = ("<|im_end|>", "<|image_pad|>")  # what Processor.control_tokens gives for a Qwen-VL student


def test_byte_order_mark_is_skipped(folder):
    """Files written with a UTF-8 byte-order mark (some Windows tools) read as without one."""
    plain = write_jsonl(folder / "plain.jsonl", [GOOD])
    marked = folder / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert [e.question for e in load_examples(marked)] == [GOOD["question"]]
    teachers = folder / "t.jsonl"
    teachers.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "response": "Round."}).encode() + b"\n")
    assert load_teachers([teachers], load_examples(plain)).responses("a") == {"t": ["Round."]}


def examples(n):
    return [Example(id=f"q{i}", question=f"q {i}?", answer="yes", images=[]) for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------------
def test_load_examples(folder):
    path = write_jsonl(folder / "train.jsonl", [
        GOOD,
        "",
        {"id": 7, "question": "Is it red?", "answer": "yes", "images": ["img/a.png", "img/a.png"],
         "answer_type": "yes/no", "extra": 1},
        {"id": "t", "question": "Text only?", "answer": "no", "images": [], "answer_type": None},
    ])
    ex = load_examples(path)
    assert [e.id for e in ex] == ["a", "7", "t"]
    image = (folder / "img" / "a.png").resolve()
    assert ex[0].images == [image] and ex[1].images == [image, image] and ex[2].images == []
    assert (ex[0].answer_type, ex[1].answer_type) == (None, "yes/no")
    assert (ex[1].question, ex[1].answer) == ("Is it red?", "yes")
    assert [e.where for e in ex] == [f"{path}:1", f"{path}:3", f"{path}:4"]


def test_image_sizes_are_read_upright(tmp_path):
    """Each example carries its images' (width, height) as the model sees them (``load_image``: EXIF or XMP
    orientation applied), read from the headers: JPEG, WebP, TIFF (which Pillow turns as it opens it), PNG with
    the orientation in an eXIf chunk, in ImageMagick's EXIF text chunk or in XMP; turned a quarter, half turned,
    or not at all."""
    from PIL import PngImagePlugin, TiffImagePlugin

    def exif(orientation):
        e = Image.Exif()
        e[0x0112] = orientation
        return e.tobytes()

    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>')
    raw_profile, xmp_chunk = PngImagePlugin.PngInfo(), PngImagePlugin.PngInfo()
    raw_profile.add_text("Raw profile type exif", f"\nexif\n{len(exif(6)):8}\n{exif(6).hex()}\n", zip=True)
    xmp_chunk.add_itxt("XML:com.adobe.xmp", xmp)
    tiff_tags = TiffImagePlugin.ImageFileDirectory_v2()
    tiff_tags[0x0112] = 5
    saves = [("jpg", dict(exif=exif(6))), ("jpg", dict(exif=exif(8))), ("jpg", dict(exif=exif(3))), ("jpg", {}),
             ("webp", dict(exif=exif(5))), ("png", dict(exif=exif(6))), ("png", {}), ("png", dict(pnginfo=raw_profile)),
             ("png", dict(pnginfo=xmp_chunk)), ("tif", dict(tiffinfo=tiff_tags))]
    files = []
    for i, (fmt, options) in enumerate(saves):
        Image.new("RGB", (40 + i, 17 + 2 * i), (i, 0, 0)).save(tmp_path / f"{i}.{fmt}", **options)
        files.append(f"{i}.{fmt}")
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"id": "all", "question": "q?", "answer": "x", "images": files},
        {"id": "again", "question": "q?", "answer": "x", "images": files[::-1]}])
    first, second = load_examples(path)
    upright = [load_image(p).size for p in first.images]
    assert first.image_sizes == upright and second.image_sizes == upright[::-1]
    assert [w < h for w, h in upright] == [True, True, False, False, True, True, False, True, True, True]


def _counter(lengths: dict):
    """A stand-in for ``Processor.prompt_lengths``: each question's length from ``lengths``; a question mapped to
    a string is refused as the image processor refuses an image (ValueError with that text)."""
    def count(prompts):
        if any(isinstance(lengths[q], str) for q, _ in prompts):
            raise ValueError(next(lengths[q] for q, _ in prompts if isinstance(lengths[q], str)))
        return [lengths[q] for q, _ in prompts]
    return count


def test_prompts_that_leave_no_room_are_refused_or_left_out():
    exs = [Example(id=str(i), question=f"q{i}", answer="x", images=[], where=f"t.jsonl:{i + 1}") for i in range(6)]
    lengths = {"q0": 10, "q1": 89, "q2": 90, "q3": 91, "q4": "absolute aspect ratio must be smaller than 200",
               "q5": 5}
    kw = dict(budget=100, max_new_tokens=10, setting="batch.max_tokens")
    kept, left_out = fitting(exs, _counter(lengths), long_prompts=LongPrompts.SKIP, **kw)
    assert [e.id for e in kept] == ["0", "1", "2", "5"]  # 90 + 10 = 100 fits exactly
    assert left_out == ["t.jsonl:4: the prompt takes 91 tokens (images included); with max_new_tokens=10 that exceeds "
                        "batch.max_tokens (100 tokens)",
                        "t.jsonl:5: the image processor refuses an image of the example (absolute aspect ratio must "
                        "be smaller than 200)"]
    with pytest.raises(DataError) as e:
        fitting(exs, _counter(lengths), long_prompts=LongPrompts.REFUSE, hint="long_prompts=skip drops them", **kw)
    assert str(e.value) == (f"{left_out[0]}: raise batch.max_tokens, lower max_new_tokens, shorten the question, or "
                            f"drop the example (long_prompts=skip drops them; 1 more such example(s) in the file)")
    with pytest.raises(DataError) as e:
        fitting(exs[4:], _counter(lengths), long_prompts=LongPrompts.REFUSE, **kw)
    assert str(e.value) == f"{left_out[1]}: resize the image or drop the example"
    with pytest.raises(DataError) as e:  # the model's context bounds the room: raising max_tokens would not help
        fitting(exs[3:4], _counter(lengths), long_prompts=LongPrompts.REFUSE, **kw | {"setting": "the model's context"})
    assert str(e.value).endswith("exceeds the model's context (100 tokens): lower max_new_tokens, shorten the "
                                 "question, or drop the example")
    pictured = [replace(exs[3], images=["a.png"])]  # an example with images: fewer or smaller ones would help
    with pytest.raises(DataError) as e:
        fitting(pictured, _counter(lengths), long_prompts=LongPrompts.REFUSE, **kw | {"setting": "the model's context"})
    assert str(e.value).endswith(": lower max_new_tokens, use fewer or smaller images, or drop the example")
    assert fitting(exs[:3], _counter(lengths), long_prompts=LongPrompts.REFUSE, **kw) == (exs[:3], [])


BAD_EXAMPLES = [
    ('{"id": "b", "question": ', "bad JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (b'{"id": "b", "question": "\xff?", "answer": "x", "images": []}', "not UTF-8"),
    ({"question": "q?", "answer": "x", "images": []}, "missing field 'id'"),
    ({"id": ["b"], "question": "q?", "answer": "x", "images": []}, "'id' must be a non-empty string"),
    ({"id": " ", "question": "q?", "answer": "x", "images": []}, "'id' must be a non-empty string"),
    ({"id": True, "question": "q?", "answer": "x", "images": []}, "'id' must be a non-empty string, got True"),
    ({"id": "b", "answer": "x", "images": []}, "missing field 'question'"),
    ({"id": "b", "question": 5, "answer": "x", "images": []}, "'question' must be a string, got int"),
    ({"id": "b", "question": "  ", "answer": "x", "images": []}, "'question' is empty"),
    ({"id": "b", "question": "q?", "images": []}, "missing field 'answer'"),
    ({"id": "b", "question": "q?", "answer": "", "images": []}, "'answer' is empty"),
    ({"id": "b", "question": "q?", "answer": "x"}, "missing field 'images'"),
    ({"id": "b", "question": "q?", "answer": "x", "images": "img/a.png"}, "'images' must be a list"),
    ({"id": "b", "question": "q?", "answer": "x", "images": [3]}, "'images' must be a list"),
    ({"id": "b", "question": "q?", "answer": "x", "images": [""]}, "'images' must be a list of non-empty path strings"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/nope.png"]}, "image 'img/nope.png' not found"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img"]}, "image 'img' is a folder ("),  # it exists
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/"]}, "), not an image file"),
    # a second file's byte-order mark, where two files were joined (only the file's first is skipped)
    (b"\xef\xbb\xbf" + json.dumps(GOOD | {"id": "b"}).encode(),
     "a UTF-8 byte-order mark at the start of the line (two files joined?): remove it"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/broken.png"]}, "cannot read image 'img/broken.png'"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/cut.png"]}, "cannot read image 'img/cut.png'"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/text.png"]}, "cannot read image 'img/text.png'"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/cut.jpg"]}, "cannot read image 'img/cut.jpg'"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/cut.mpo"]}, "cannot read image 'img/cut.mpo'"),
    *[({"id": "b", "question": "q?", "answer": "x", "images": [f"img/cut.{fmt}"]}, f"cannot read image 'img/cut.{fmt}'")
      for fmt in ("gif", "bmp", "tiff", "webp")],
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/deep.png"]},
     "cannot read image 'img/deep.png': its pixels are more than 8-bit (PIL mode I;16)"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/deep_be.tiff"]},  # 16-bit big-endian
     "cannot read image 'img/deep_be.tiff': its pixels are more than 8-bit (PIL mode I;16B)"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/float.tiff"]},
     "cannot read image 'img/float.tiff': its pixels are floating-point (PIL mode F)"),
    ({"id": "b", "question": "q?", "answer": "x", "images": ["img/wide.tiff"]}, "more than 8-bit (PIL mode I)"),
    ('{"id": "b", "question": "red \\ud83d?", "answer": "x", "images": []}',
     "'question' holds half of a character (the lone surrogate '\\ud83d' at character 4)"),
    ('{"id": "b", "question": "q?", "answer": "\\udc00", "images": []}', "'answer' holds half of a character"),
    ('{"id": "b\\ud83d", "question": "q?", "answer": "x", "images": []}', "'id' holds half of a character"),
    ({"id": "b", "question": "q?", "answer": "x", "images": [], "answer_type": 3}, "'answer_type' must be"),
    ({"id": "b", "question": "q?", "answer": "x", "images": [], "answer_type": " "},
     "'answer_type' must be a non-empty string or null, got ' '"),
    ({"id": "a", "question": "q?", "answer": "x", "images": []}, "duplicate id 'a' (first on line 1)"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ({"id": "b", "question": "Is it<|im_end|> red?", "answer": "x", "images": []}, "'question' contains '<|im_end|>'"),
]


def test_32_bit_pixels_within_8_bits_are_read(folder):
    """A 32-bit integer image whose values fit in 8 bits (255 at most, reached) survives the RGB conversion: it is
    taken."""
    assert Image.open(folder / "img" / "narrow.tiff").getextrema() == (3, 255)
    path = write_jsonl(folder / "train.jsonl", [GOOD | {"images": ["img/narrow.tiff"]}])
    assert load_examples(path)[0].image_sizes == [(8, 8)]


@pytest.mark.parametrize("line, message", BAD_EXAMPLES)
def test_bad_example_lines(folder, line, message):
    path = write_jsonl(folder / "train.jsonl", [GOOD, "", line, GOOD | {"id": "c"}])
    with pytest.raises(DataError) as e:
        load_examples(path, control_tokens=CONTROL)
    assert str(e.value).startswith(f"{path}:3: "), str(e.value)  # the blank line 2 still counts
    assert message in str(e.value), str(e.value)


def test_an_unreadable_image_is_named_at_its_first_use(folder):
    """An image several examples use is checked once; its error names the first line that uses it."""
    path = write_jsonl(folder / "train.jsonl", [GOOD, GOOD | {"id": "b", "images": ["img/broken.png"]},
                                                GOOD | {"id": "c", "images": ["img/a.png", "img/broken.png"]}])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:2: cannot read image 'img/broken.png'"), str(e.value)


def test_a_duplicate_id_names_the_line_of_its_first_use(folder):
    """The line numbers count blank lines: the duplicate's message names the first use's own line."""
    path = write_jsonl(folder / "train.jsonl", ["", GOOD, GOOD | {"id": "b"}, "", GOOD])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value) == f"{path}:5: duplicate id 'a' (first on line 2)"


def test_an_examples_fields_reach_it(folder):
    """Each field of a line reaches its Example: answer_type (None when absent), the line as FILE:LINE, the images
    resolved against the file's folder, with their sizes."""
    path = write_jsonl(folder / "train.jsonl", [GOOD | {"answer_type": "shape"}, "", GOOD | {"id": 7}])
    first, second = load_examples(path)
    assert (first.id, first.question, first.answer, first.answer_type, first.where) == (
        "a", "What shape?", "circle", "shape", f"{path}:1")
    assert (second.id, second.answer_type, second.where) == ("7", None, f"{path}:3")
    assert first.images == [(folder / "img" / "a.png").resolve()] and len(first.image_sizes) == 1


def test_empty_and_missing_files(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=r"empty\.jsonl:1: no examples"):
        load_examples(path)
    with pytest.raises(DataError, match=r"nope\.jsonl:0: cannot read the file"):
        load_examples(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------------
def test_teacher_bank(tmp_path):
    ex = examples(3)
    big = write_jsonl(tmp_path / "big.jsonl", [
        {"id": "q0", "response": "Yes."}, {"id": "q0", "response": "Yes!"}, {"id": "q1", "response": "No."},
        {"id": "q1", "response": "Yes, it is.", "teacher": "named"},
    ])
    small = write_jsonl(tmp_path / "small.jsonl", [{"id": "q0", "response": "yes"}])
    bank = load_teachers([big, small], ex)
    assert bank.teachers == ["big", "named", "small"]
    assert bank.responses("q0") == {"big": ["Yes.", "Yes!"], "small": ["yes"]}
    assert bank.responses("q1") == {"big": ["No."], "named": ["Yes, it is."]}
    assert bank.responses("q2") == {}
    assert bank.missing(ex) == [ex[2]]
    assert bank.counts() == {"big": 3, "named": 1, "small": 1}


def test_a_banks_teachers_keep_one_order_for_every_example(tmp_path):
    """Teachers named line by line, in an order that alternates between examples: each example's responses
    come in the bank's order, so the G % K extra outputs of a group rotate over the teachers evenly (K = 2,
    G = 3: 150 each over 100 questions; in each line's own order they went 200 / 100)."""
    from ril_fast.rewards import draw_teacher_outputs

    ex = examples(100)
    lines = []
    for i, e in enumerate(ex):
        pair = [{"id": e.id, "response": "A says yes.", "teacher": "a"},
                {"id": e.id, "response": "B: yes.", "teacher": "b"}]
        lines += pair if i % 2 == 0 else pair[::-1]
    bank = load_teachers([write_jsonl(tmp_path / "mixed.jsonl", lines)], ex)
    assert bank.teachers == ["a", "b"] and all(list(bank.responses(e.id)) == ["a", "b"] for e in ex)
    rng = random.Random(0)
    drawn = [name for k, e in enumerate(ex) for name, _ in draw_teacher_outputs(bank.responses(e.id), 3, rng, k)]
    assert collections.Counter(drawn) == {"a": 150, "b": 150}


BAD_TEACHER_LINES = [
    ({"id": "zz", "response": "Yes."}, "id 'zz' is not in the training data"),
    ({"id": "q0"}, "missing field 'response'"),
    ({"id": "q0", "response": ""}, "'response' is empty"),
    ({"id": "q0", "response": ["Yes."]}, "'response' must be a string, got list"),
    ({"id": "q0", "response": "Yes.", "teacher": ""}, "'teacher' is empty"),
    ({"response": "Yes."}, "missing field 'id'"),
    ("not json", "bad JSON"),
    (b'{"id": "q0", "response": "caf\xe9"}', "not UTF-8"),
    ({"id": "q0", "response": " \n "}, "'response' is empty"),
    ({"id": "q0", "response": "Yes.<|im_end|>"}, "'response' contains '<|im_end|>'"),
    ({"id": "q0", "response": "Yes.", "teacher": "student"}, "a teacher may not be called 'student'"),
    ({"id": "q0", "response": "Yes.", "question_sha": 12}, "'question_sha' must be a string, got 12"),
    (b"\xef\xbb\xbf" + json.dumps({"id": "q0", "response": "Yes."}).encode(), "a UTF-8 byte-order mark at the start"),
]


@pytest.mark.parametrize("line, message", BAD_TEACHER_LINES)
def test_bad_teacher_lines(tmp_path, line, message):
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "q0", "response": "Yes."}])
    path = write_jsonl(tmp_path / "t.jsonl", [{"id": "q1", "response": "No."}, line])
    with pytest.raises(DataError) as e:
        load_teachers([good, path], examples(2), control_tokens=CONTROL)
    assert str(e.value).startswith(f"{path}:2: "), str(e.value)
    assert message in str(e.value), str(e.value)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty\.jsonl:1: no teacher responses"):
        load_teachers([good, empty], examples(2))


def test_a_teacher_line_collected_for_another_question_is_refused(folder):
    """A line of ril_fast.teacher carries the digest of the question and image paths it answered: one collected for
    another question under the same id (another dataset, an earlier version of the file) is refused, naming its line,
    the id, the example's line and what to do; a line without the field (written by hand) is taken."""
    other = GOOD | {"id": "b", "images": []}
    data = write_jsonl(folder / "train.jsonl", [GOOD, other])
    examples_now = load_examples(data)
    assert [e.question_sha for e in examples_now] == [question_digest(GOOD["question"], ["img/a.png"]),
                                                      question_digest(GOOD["question"], [])]
    assert len(set(e.question_sha for e in examples_now)) == 2  # the images (as written) count, not only the text
    made_in_code = Example("a", "q?", "x", [folder / "img" / "a.png"])  # the paths as given
    assert made_in_code.question_sha == question_digest("q?", [str(folder / "img" / "a.png")])
    sha = {e.id: e.question_sha for e in examples_now}
    good = [{"id": "a", "index": 0, "response": "Round.", "question_sha": sha["a"]},
            {"id": "b", "index": 0, "response": "Round.", "question_sha": sha["b"]},
            {"id": "b", "index": 1, "response": "By hand, tied to nothing."}]
    assert load_teachers([write_jsonl(folder / "t.jsonl", good)], examples_now).counts() == {"t": 3}
    # the same ids, the questions changed since the collection: every line with the field is another question's
    changed = write_jsonl(folder / "v2.jsonl", [GOOD | {"question": "What colour?"}, other | {"question": "How many?"}])
    collection = write_jsonl(folder / "t.jsonl", good)
    with pytest.raises(DataError) as e:
        load_teachers([collection], load_examples(changed))
    assert str(e.value) == (
        f"{collection}:1: id 'a': collected for another question (its question_sha is not that of the question and "
        f"images of {changed}:1; 2 such lines in the file): collect it again with python -m ril_fast.teacher --data "
        f"{changed} --out {collection} ... (which sets the stale lines aside and asks for them again), or remove the "
        f"field to train on it as it is")
    moved = write_jsonl(folder / "moved.jsonl", [GOOD | {"images": ["img/full.png"]}, other])  # another image
    with pytest.raises(DataError, match=f"{collection}:1: id 'a': collected for another question .*1 such lines"):
        load_teachers([collection], load_examples(moved))


def test_teacher_files_name_distinct_teachers(tmp_path):
    """Two files of one stem are not silently one teacher, nor is a file given twice; one teacher fed by
    several files through the 'teacher' field is; a file called student.jsonl is refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_jsonl(tmp_path / "a" / "responses.jsonl", [{"id": "q0", "response": "Yes."}])
    second = write_jsonl(tmp_path / "b" / "responses.jsonl", [{"id": "q0", "response": "No."}])
    with pytest.raises(DataError) as e:
        load_teachers([first, second], examples(1))
    assert str(e.value).startswith(f"{second}:1: this file and {first} would both be teacher 'responses'")
    with pytest.raises(DataError, match="given twice"):
        load_teachers([first, tmp_path / "a" / ".." / "a" / "responses.jsonl"], examples(1))
    for path, text in ((first, "Yes."), (second, "No.")):
        write_jsonl(path, [{"id": "q0", "response": text, "teacher": "big"}])
    assert load_teachers([first, second], examples(1)).responses("q0") == {"big": ["Yes.", "No."]}
    student = write_jsonl(tmp_path / "student.jsonl", [{"id": "q0", "response": "Yes."}])
    with pytest.raises(DataError, match=f"{student}:1: a teacher may not be called 'student'"):
        load_teachers([student], examples(1))


def test_lines_repeated_word_for_word_are_listed(tmp_path):
    """A line repeating an earlier one's teacher, id, index and response (a collection copied in twice) is kept and
    listed in ``repeated``; the same text at another index (a teacher answering a short question the same way), another
    text at the same index (two collections of one teacher), a truncated line's index asked for again and lines
    without index are not repeats."""
    rows = [{"id": "q0", "index": 0, "response": "Red."}, {"id": "q0", "index": 1, "response": "Red."},
            {"id": "q1", "index": 0, "response": "Blue", "truncated": True}, {"id": "q1", "index": 0, "response": "B."},
            {"id": "q1", "response": "Blue."}, {"id": "q1", "response": "Blue."}]
    bank = load_teachers([write_jsonl(tmp_path / "t.jsonl", rows)], examples(2))
    assert bank.responses("q0") == {"t": ["Red.", "Red."]} and bank.repeated == []
    twice = write_jsonl(tmp_path / "twice.jsonl", rows + rows)
    bank = load_teachers([twice], examples(2))
    assert bank.repeated == [f"{twice}:7", f"{twice}:8", f"{twice}:10"]  # line 9 truncated, 11-12 without index
    assert bank.responses("q0") == {"twice": ["Red.", "Red.", "Red.", "Red."]}  # kept: listed, not dropped
    first, second = (write_jsonl(tmp_path / name, [{"id": "q0", "index": 0, "response": text, "teacher": "big"}])
                     for name, text in (("first.jsonl", "Red."), ("second.jsonl", "It is red, clearly.")))
    assert load_teachers([first, second], examples(2)).repeated == []  # two collections of one teacher


def test_truncated_teacher_lines_are_left_out(tmp_path):
    """Lines ril_fast.teacher marked truncated (the teacher hit its budget) are not trained on; a file with
    nothing else says so."""
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "q0", "response": "The shape is a", "truncated": True},
        {"id": "q0", "response": "Round.", "truncated": False},
        {"id": "q1", "response": "It is"}, {"id": "q1", "response": "Red and", "truncated": True}])
    bank = load_teachers([path], examples(2))
    assert bank.responses("q0") == {"t": ["Round."]} and bank.responses("q1") == {"t": ["It is"]}
    assert bank.truncated == [f"{path}:1", f"{path}:4"]
    cut = write_jsonl(tmp_path / "cut.jsonl", [{"id": "q0", "response": "The", "truncated": True}])
    with pytest.raises(DataError, match=r"cut\.jsonl:1: no teacher responses in the file \(every line is marked"):
        load_teachers([path, cut], examples(2))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError) as e:
        load_teachers([path, empty], examples(2))
    assert str(e.value) == f"{empty}:1: no teacher responses in the file"
    marked = write_jsonl(tmp_path / "marked.jsonl", [{"id": "q0", "response": "Round."},
                                                     {"id": "q1", "response": "It is <|im_end|>", "truncated": True},
                                                     '{"id": "q1", "response": "Red \\ud83d", "truncated": true}'])
    # left out, so not refused: a control token, half of a character where the reply was cut
    bank = load_teachers([marked], examples(2), control_tokens=["<|im_end|>"])
    assert bank.truncated == [f"{marked}:2", f"{marked}:3"] and bank.responses("q0") == {"marked": ["Round."]}
    assert bank.cut == {"q1": [f"{marked}:2", f"{marked}:3"]}
    for value in ("yes", 1, None):  # a marker that is not a boolean is refused, not read as "complete"
        odd = write_jsonl(tmp_path / "odd.jsonl", [{"id": "q0", "response": "The", "truncated": value}])
        with pytest.raises(DataError, match=rf"odd\.jsonl:1: 'truncated' must be true or false, got {value!r}"):
            load_teachers([odd], examples(2))


def test_teacher_responses_longer_than_the_budget(tmp_path):
    lines = [{"id": "q0", "response": "one two"}, {"id": "q1", "response": "one two three four"},
             {"id": "q0", "response": "a b c d e"}]
    path = write_jsonl(tmp_path / "t.jsonl", lines)
    count = lambda texts: [len(t.split()) + 1 for t in texts]  # noqa: E731 - words + end-of-turn
    assert load_teachers([path], examples(2), count_tokens=count, max_tokens=6).counts() == {"t": 3}
    with pytest.raises(DataError) as e:
        load_teachers([path], examples(2), count_tokens=count, max_tokens=4)
    assert str(e.value).startswith(f"{path}:2: the response has 5 tokens, more than max_new_tokens=4 (2 such lines")


def take(batches, n):
    """The ids of the next ``n`` batches."""
    return [[e.id for e in next(batches)] for _ in range(n)]


def test_batches_are_seeded_shuffled_epochs():
    ex = examples(23)
    b = Batches(ex, 5, seed=3)
    assert b.steps_per_epoch == 4
    first, second = take(b, 4), take(b, 4)
    for epoch in (first, second):
        ids = [i for batch in epoch for i in batch]
        assert len(ids) == 20 and len(set(ids)) == 20  # no example twice in an epoch; 3 left over
    assert first != second  # reshuffled every epoch
    assert take(Batches(ex, 5, seed=3), 8) == first + second  # deterministic
    assert take(Batches(ex, 5, seed=4), 4) != first
    assert [i for batch in first for i in batch] != [e.id for e in ex[:20]]  # actually shuffled


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_take_disjoint_slices(world_size):
    ex = examples(40)
    whole = take(Batches(ex, 6, seed=1), 9)
    ranks = [take(Batches(ex, 6, seed=1, rank=r, world_size=world_size), 9) for r in range(world_size)]
    for step, batch in enumerate(whole):
        parts = [ranks[r][step] for r in range(world_size)]
        assert all(parts), "every rank gets at least one question"
        flat = [i for part in parts for i in part]
        assert len(flat) == len(set(flat)) and sorted(flat) == sorted(batch)


@pytest.mark.parametrize("k", [0, 3, 5, 11])
def test_resume_continues_exactly(k):
    ex = examples(17)
    run = Batches(ex, 4, seed=9, rank=1, world_size=2)
    take(run, k)
    state = run.state_dict()
    expected = take(run, 6)
    resumed = Batches(ex, 4, seed=9, rank=1, world_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert take(resumed, 6) == expected
    # The global order does not depend on the number of ranks: resume on one rank.
    single = Batches(ex, 4, seed=9)
    single.load_state_dict(state)
    assert [b[1::2] for b in take(single, 6)] == expected


def test_batches_refuse_bad_settings():
    with pytest.raises(ValueError, match="cannot resume"):
        Batches(examples(10), 4, seed=1).load_state_dict(Batches(examples(10), 4, seed=2).state_dict())
    with pytest.raises(ValueError, match=r"had num_examples=10, this run has 9 \(the training data changed, or "
                                         r"long_prompts=skip left out other examples: batch.max_tokens"):
        Batches(examples(9), 4).load_state_dict(Batches(examples(10), 4).state_dict())
    with pytest.raises(ValueError, match="cannot fill"):
        Batches(examples(3), 4)
    with pytest.raises(ValueError, match="cannot give each"):
        Batches(examples(10), 2, rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank 2"):
        Batches(examples(10), 4, rank=2, world_size=2)


def test_to_sample(folder):
    ex = load_examples(write_jsonl(folder / "train.jsonl", [GOOD]))[0]
    sample = to_sample(ex, "Circle.")
    assert sample == {"images": [(folder / "img" / "a.png").resolve()], "question": "What shape?",
                      "response": "Circle."}
    assert to_sample(ex, "Cir", truncated=True)["truncated"] is True
    sample["images"].clear()
    assert ex.images  # the sample does not alias the example's list
