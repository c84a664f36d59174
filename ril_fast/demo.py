"""The built-in demo: easy-VQA questions, two templated teacher collections and a tiny student.

    python -m ril_fast.demo [ROOT] [--max-train N] [--max-test N]     # prints the folder

Made once and cached (default ``~/.cache/ril_fast/demo``, or ``$RIL_FAST_DEMO``) from files that
ship inside the ``easy-vqa`` PyPI package, so nothing is downloaded at run time:

    train.jsonl               easy-VQA's TRAINING split only: 64x64 images of one coloured shape; its
                              shape and colour questions (3 shapes, 8 colours; ``answer_type``)
    test.jsonl                easy-VQA's test split (different images), kept for held-out evaluation,
                              in a seeded random order
    images/{train,test}/      the images the two files use, copied from the package
    teacher_concise.jsonl     "Answer: triangle."  / "Answer: yes."
    teacher_verbose.jsonl     "The shape in the image is a triangle." / "Yes, it is."
    student/                  a tiny random Qwen2.5-VL from ``ril_fast.tiny.make_tiny`` (``STUDENT``)
    demo.json                 the settings it was built with and what it holds: a folder missing any of it
                              (a cache cleaner's doing) is built again

The two teacher collections are written from the ground truth in two distinct styles. They stand in
for large teacher VLMs (the paper's Qwen2.5-VL-72B and InternVL3-78B), whose responses RIL also reads
from saved collections: what RIL needs is teacher text that is mostly correct and has a style of its
own for the discriminator to learn; templates give both with no large model at hand.

Choices made so that the demo measures what RIL is for (issue 4 has the runs behind them):
* Shape and colour questions only. easy-VQA's yes/no questions (74% of it) are answered from the
  question text alone about 80% of the time, so a student that never looks at the image scores ~60%
  overall; and "yes"/"no" are so short that even RL alone finds them by chance. Without them the
  blind prior is one answer per type (about 1/3 of shapes, 1/8 of colours) and accuracy means looking.
  ``build_demo(answer_types=ANSWER_TYPES)`` keeps all three.
* The student's vocabulary has 16,384 tokens (most of them made-up words) instead of the ~1,000 its
  small BPE corpus gives. A cold student samples nearly uniformly; with ~1,000 tokens it wrote answer
  words by chance often enough that RL alone learned to repeat " rectangle" within 25 steps (held-out
  0.18, every shape question answered "rectangle"); with 16,384 the demo's RL-only run drew 7
  rewarded samples in 350 steps and stayed at 0.000 held-out (one run with the previous, 16-image-
  token student found a shape by chance at step 51 and ended at 0.17, one shape for every question).
  Real VLM vocabularies (150,000 tokens) make that chance smaller still: the zero-reward trap that
  teacher-guided groups escape.
* The student sees each 64x64 image upscaled to 224x224 pixels, 64 tokens (16x16 patches of 14
  pixels, merged 2x2), through a 64-wide vision tower, not the tiny default's 4 tokens through a
  32-wide one: easy-VQA's shapes can be 5 pixels wide, and with fewer pixels per patch the student
  learns faster. Plain supervised learning on the concise teacher's answers reached shape 0.62 at
  500 steps and 0.71 at 700 with 64 tokens, 0.45-0.54 at 500-1,000 with 36 and 0.49-0.64 at 600-1,300
  with 16; in RIL, colour went from 0.53 at 100 steps to 0.98 at 200 (16 tokens: 0.13 and 0.58).
  Each image costs the language model 64 tokens, but the vision tower runs once per question and
  pass (``ril_fast.models.vision_once``), not once for each of its 2G responses.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ril_fast.files import waiting_lock

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
ANSWER_TYPES = ("yes/no", "shape", "color")
# The demo trains and evaluates on these only (why: the module docstring).
DEMO_TYPES = ("shape", "color")
# The demo student (``ril_fast.tiny.make_tiny`` settings; why these: the module docstring).
STUDENT = dict(arch="qwen2_5_vl", seed=0, vocab_size=16384, vision_hidden=64, image_tokens=64)
VERSION = 5  # bump when the files written here change, so cached demos are rebuilt
_MARKER = "demo.json"
_CONTENTS = ("files", "images")  # the marker's keys that list what the folder holds (the others: its settings)


@dataclass(frozen=True)
class DemoPaths:
    """Where a built demo's files are."""

    root: Path
    train: Path
    test: Path
    teachers: tuple[Path, ...]
    student: Path


def default_root() -> Path:
    """``$RIL_FAST_DEMO`` if set, else ``~/.cache/ril_fast/demo``."""
    return Path(os.environ.get("RIL_FAST_DEMO") or Path.home() / ".cache" / "ril_fast" / "demo")


def answer_type(answer: str) -> str:
    """``yes/no``, ``shape`` or ``color`` for an easy-VQA answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in SHAPES:
        return "shape"
    if answer in COLORS:
        return "color"
    raise ValueError(f"not an easy-VQA answer: {answer!r}")


def concise(answer: str) -> str:
    """The concise teacher's response: ``Answer: {answer}.``

    Not the bare "Triangle.": the tiny student's tokenizer, trained on a few lines of text, splits
    capitalised answers into letters that other responses share ("Teal." is T·e·al·., beginning like
    "Triangle." and "The ..."), so the first token would pick a letter, not an answer or a style.
    Here each style has its own first token and the answer is one word token, as with real tokenizers.
    """
    return f"Answer: {answer}."


def verbose(answer: str) -> str:
    """The verbose teacher's response: a full sentence around the answer."""
    kind = answer_type(answer)
    if kind == "yes/no":
        return "Yes, it is." if answer == "yes" else "No, it is not."
    if kind == "shape":
        return f"The shape in the image is a {answer}."
    return f"The color of the shape is {answer}."


TEACHER_STYLES = {"teacher_concise": concise, "teacher_verbose": verbose}


def _paths(root: Path) -> DemoPaths:
    return DemoPaths(root=root, train=root / "train.jsonl", test=root / "test.jsonl",
                     teachers=tuple(root / f"{name}.jsonl" for name in TEACHER_STYLES), student=root / "student")


def _easy_vqa_split(split: str) -> tuple[list[tuple[str, str, int]], dict[int, Path]]:
    """(question, answer, image id) triples and image id -> PNG path of an easy-VQA split, read from
    the installed package's data files (the package's only import is json)."""
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the demo needs the easy-vqa package: pip install easy-vqa") from None
    if split == "train":
        texts, answers, image_ids = easy_vqa.get_train_questions()
        images = easy_vqa.get_train_image_paths()
    else:
        texts, answers, image_ids = easy_vqa.get_test_questions()
        images = easy_vqa.get_test_image_paths()
    return list(zip(texts, answers, image_ids)), {k: Path(v) for k, v in images.items()}


def _write_split(root: Path, split: str, limit: int | None, seed: int, types: tuple[str, ...]) -> list[dict]:
    """Write ``{split}.jsonl`` and copy its images: the questions whose answer type is in ``types``, a
    seeded random subset of ``limit`` of them. The test split is written in a seeded random order, so
    that evaluating on its first N lines (``eval_max_examples``) is a random sample of images and
    question types, not the first few images."""
    questions, image_paths = _easy_vqa_split(split)
    chosen = [i for i, (_, answer, _) in enumerate(questions) if answer_type(answer) in types]
    keep = len(chosen) if limit is None else min(limit, len(chosen))
    chosen = random.Random(seed).sample(chosen, keep)
    if split == "train":
        chosen.sort()
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in chosen:
        text, answer, image_id = questions[i]
        image = image_dir / f"{image_id}.png"
        if not image.exists():
            shutil.copyfile(image_paths[image_id], image)
        question = text[0].upper() + text[1:]
        rows.append({"id": f"{split}-{i:05d}", "question": question, "answer": answer,
                     "images": [str(image.relative_to(root))], "answer_type": answer_type(answer)})
    _write_jsonl(root / f"{split}.jsonl", rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_demo(root: str | Path | None = None, *, max_train: int | None = None, max_test: int | None = None,
               answer_types: tuple[str, ...] = DEMO_TYPES) -> DemoPaths:
    """Build the demo in ``root`` (default: ``default_root()``) unless it is already there; return its paths.

    ``answer_types`` keeps the questions of those answer types (``ANSWER_TYPES``; default: shape and
    colour, see the module docstring for why). ``max_train`` / ``max_test`` keep a seeded random subset
    of that many of them in each split (None: all; of easy-VQA's 38,575 / 9,673 questions, 10,168 /
    2,537 are shape or colour questions). A folder built with other settings is rebuilt, and so is one that lacks
    any of its files (a cache cleaner deleted an image or the student's weights; said on stderr in one line). One
    process builds at a time (a lock beside ``root``; the others wait, then find it built), into a sibling temporary
    folder renamed into place: no caller sees a half-written demo, and a build that was killed leaves a temporary
    folder that the next build removes. A rebuild (for other settings, or of an incomplete demo) replaces the folder's
    demo under any job still training from it (its images are read at each step): give jobs of other settings roots
    of their own (``$RIL_FAST_DEMO`` for the trainer).
    """
    types = tuple(answer_types)
    if not types or any(t not in ANSWER_TYPES for t in types):
        raise ValueError(f"answer_types must be a non-empty subset of {ANSWER_TYPES}, got {answer_types!r}")
    root = Path(root) if root is not None else default_root()
    settings = {"version": VERSION, "max_train": max_train, "max_test": max_test, "answer_types": list(types)}
    if _built(root, settings):
        return _paths(root)
    with waiting_lock(root) as locked:
        if _built(root, settings):  # by another process, while this one waited
            return _paths(root)
        marker = _marker(root)
        if marker is not None and _settings_of(marker) == settings:
            missing = _missing(root, marker)
            print(f"the built-in demo at {root} is incomplete (missing: {', '.join(missing[:3])}"
                  f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}): building it again",
                  file=sys.stderr, flush=True)
        if root.exists() and any(root.iterdir()) and not (root / _MARKER).is_file():
            paths = _paths(root)  # a demo whose marker alone was deleted: never deleted unasked (not proven ours)
            looks = paths.train.is_file() and paths.test.is_file() and paths.student.is_dir()
            raise FileExistsError(f"{root} exists and is not a ril_fast demo folder (no {_MARKER}): " + (
                "it holds a demo's files without its marker: delete the folder to build the demo again" if looks
                else "choose another root"))
        if locked:  # builds run one at a time: another's temporary folder is a killed build's
            for stale in root.parent.glob(f"{glob.escape(root.name)}.tmp-*"):  # "demo[1]": not demo1's
                shutil.rmtree(stale, ignore_errors=True)
        tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _write_demo(tmp, settings, max_train=max_train, max_test=max_test, types=types)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if root.exists():  # a demo of other settings (its marker proves the folder is ours): out of sight first,
            old = root.with_name(f"{root.name}.tmp-{os.getpid()}-old")  # so a kill mid-deletion leaves no part
            with contextlib.suppress(FileNotFoundError):
                root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(root)  # replaces root only if it is missing or an empty folder
        except OSError:
            if not _built(root, settings):
                raise
            shutil.rmtree(tmp)  # another process built the same demo first (a file system without locks)
    return _paths(root)


def _built(root: Path, settings: dict) -> bool:
    """Whether ``root`` holds a complete demo built with ``settings``: its marker's settings are those, and
    none of the files it lists is missing (:func:`_missing`)."""
    marker = _marker(root)
    return marker is not None and _settings_of(marker) == settings and not _missing(root, marker)


def _marker(root: Path) -> dict | None:
    """``root``'s marker (``demo.json``: the settings it was built with, and what it holds), or None."""
    marker = root / _MARKER
    try:
        return json.loads(marker.read_text())
    except FileNotFoundError:
        return None


def _settings_of(marker: dict) -> dict:
    return {k: v for k, v in marker.items() if k not in _CONTENTS}


def _missing(root: Path, marker: dict) -> list[str]:
    """The demo files the marker lists (``files``, and ``images``: how many images each split's folder holds) that
    ``root`` lacks (a cache cleaner deleted them): names and existence only, a millisecond for the full demo's 4,766
    images. A marker written before it listed them (demo.json of settings only) is checked for the data files, the
    student's config and weights, and each image the two splits' files name (reading them: 50 ms)."""
    paths = _paths(root)
    files = marker.get("files") or [str(p.relative_to(root)) for p in (
        paths.train, paths.test, *paths.teachers, paths.student / "config.json", paths.student / "model.safetensors")]
    missing = [name for name in files if not (root / name).is_file()]
    if "images" in marker:
        for split, count in marker["images"].items():
            folder = root / "images" / split
            held = len(os.listdir(folder)) if folder.is_dir() else 0
            if held < count:
                missing.append(f"{count - held} of the {count} images in images/{split}")
        return missing
    named = {image for data in (paths.train, paths.test) if data.is_file()
             for line in data.read_text().splitlines() for image in json.loads(line)["images"]}
    return missing + sorted(image for image in named if not (root / image).is_file())


def _write_demo(folder: Path, settings: dict, *, max_train, max_test, types) -> None:
    """Every file of the demo, into ``folder``; its marker last, with the settings and what the folder holds:
    every file's name but the images', and how many images each split's folder holds (:func:`_missing`)."""
    from ril_fast.tiny import make_tiny

    train = _write_split(folder, "train", max_train, seed=0, types=types)
    _write_split(folder, "test", max_test, seed=1, types=types)
    for name, style in TEACHER_STYLES.items():
        _write_jsonl(folder / f"{name}.jsonl", [{"id": r["id"], "response": style(r["answer"])} for r in train])
    make_tiny(folder / "student", **STUDENT)
    images = folder / "images"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and images not in p.parents)
    contents = {"files": files, "images": {split.name: len(os.listdir(split)) for split in sorted(images.iterdir())}}
    (folder / _MARKER).write_text(json.dumps({**settings, **contents}) + "\n")


def with_demo(config, demo: DemoPaths):
    """``config`` with its unset paths taken from ``demo`` (see ``ril_fast.config``).

    ``student=''`` -> the demo's student; ``train_data`` None -> the demo's train.jsonl, and then
    ``teachers`` None -> the demo's two collections and ``eval_data`` None -> its test.jsonl. With
    training data of your own, unset teachers mean RL only and unset eval_data means no evaluation.
    """
    demo_data = config.train_data is None
    changes = {}
    if config.student == "":
        changes["student"] = str(demo.student)
    if demo_data:
        changes["train_data"] = str(demo.train)
    if config.teachers is None:
        changes["teachers"] = [str(p) for p in demo.teachers] if demo_data else []
    if config.eval_data is None:
        changes["eval_data"] = str(demo.test) if demo_data else ""
    return replace(config, **changes)


def needs_demo(config) -> bool:
    """Whether ``config`` leaves any path to the demo (so ``build_demo`` must run first)."""
    return config.student == "" or config.train_data is None


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=None)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None)
    args = parser.parse_args(sys.argv[1:])
    print(build_demo(args.root, max_train=args.max_train, max_test=args.max_test).root)
