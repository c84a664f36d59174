"""The built-in demo: easy-VQA's training split for training, its test split held out, two teacher styles."""

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import easy_vqa
import pytest

import ril_fast.demo as demo_module

from ril_fast.config import load_config
from ril_fast.data import load_examples, load_teachers
from ril_fast.demo import (ANSWER_TYPES, DemoPaths, answer_type, build_demo, concise, default_root, needs_demo,
                           verbose, with_demo)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> DemoPaths:
    return build_demo(tmp_path_factory.mktemp("cache") / "demo", max_train=50, max_test=20)


def test_files_load_with_the_right_counts_and_types(demo):
    train, test = load_examples(demo.train), load_examples(demo.test)
    assert (len(train), len(test)) == (50, 20)
    for e in train + test:
        assert e.answer_type == answer_type(e.answer) and e.question[0].isupper()  # easy-VQA's are lower case
        assert len(e.images) == 1 and e.images[0].parent.parent == demo.root / "images"
    # Shape and colour questions only (the demo's default; why: ril_fast.demo's docstring), both present.
    assert {e.answer_type for e in train} == {e.answer_type for e in test} == {"shape", "color"}
    bank = load_teachers(list(demo.teachers), train)
    assert bank.teachers == ["teacher_concise", "teacher_verbose"]
    assert bank.counts() == {"teacher_concise": 50, "teacher_verbose": 50} and bank.missing(train) == []
    for e in train:
        assert bank.responses(e.id) == {"teacher_concise": [concise(e.answer)], "teacher_verbose": [verbose(e.answer)]}


def test_train_comes_from_the_training_split_and_test_is_held_out(demo):
    train, test = load_examples(demo.train), load_examples(demo.test)
    questions = {"train": easy_vqa.get_train_questions(), "test": easy_vqa.get_test_questions()}
    for split, exs in (("train", train), ("test", test)):
        texts, answers, image_ids = questions[split]
        for e in exs:
            prefix, index = e.id.split("-")
            i = int(index)
            assert prefix == split and e.question.lower() == texts[i] and e.answer == answers[i]
            assert e.images[0].name == f"{image_ids[i]}.png"
    assert not {e.id for e in train} & {e.id for e in test}
    digest = lambda exs: {hashlib.sha256(e.images[0].read_bytes()).hexdigest() for e in exs}  # noqa: E731
    assert not digest(train) & digest(test)
    assert not {e.images[0] for e in train} & {e.images[0] for e in test}


def test_teacher_styles():
    assert [concise(a) for a in ("triangle", "yes", "teal")] == ["Answer: triangle.", "Answer: yes.", "Answer: teal."]
    assert verbose("triangle") == "The shape in the image is a triangle."
    assert (verbose("yes"), verbose("no")) == ("Yes, it is.", "No, it is not.")
    assert verbose("teal") == "The color of the shape is teal."
    assert [answer_type(a) for a in ("no", "circle", "brown")] == ["yes/no", "shape", "color"]
    with pytest.raises(ValueError, match="not an easy-VQA answer"):
        answer_type("purple")


def test_student_is_a_tiny_qwen2_5_vl(demo):
    config = json.loads((demo.student / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert (demo.student / "model.safetensors").is_file() and (demo.student / "preprocessor_config.json").is_file()


def test_cached_rebuilt_on_new_settings_and_never_clobbers(demo, tmp_path):
    stamp = demo.train.stat().st_mtime_ns
    assert build_demo(demo.root, max_train=50, max_test=20) == demo
    assert demo.train.stat().st_mtime_ns == stamp  # cached: nothing rewritten
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a ril_fast demo folder"):
        build_demo(other, max_train=5, max_test=5)
    assert (other / "notes.txt").read_text() == "keep me"
    small = build_demo(tmp_path / "d", max_train=5, max_test=3)
    assert len(load_examples(small.train)) == 5
    assert len(load_examples(build_demo(small.root, max_train=7, max_test=3).train)) == 7
    assert not list(tmp_path.glob("*.tmp-*"))
    (small.root / "demo.json").unlink()  # the demo's files are kept, and the error says what the folder is
    with pytest.raises(FileExistsError, match=r"not a ril_fast demo folder \(no demo.json\): it holds a demo's "
                                              r"files without its marker: delete the folder to build the demo again"):
        build_demo(small.root, max_train=7, max_test=3)
    assert len(load_examples(small.train)) == 7


def test_a_demo_missing_files_is_built_again(tmp_path, capsys):
    """A cache cleaner deleting an image or the student's weights: the next build finds the demo incomplete, says
    so and builds it again (it was taken as built, and the run failed on the missing image or weights); so for a
    marker written before it listed the files (settings only). An intact demo is not rebuilt."""
    root = tmp_path / "demo"
    paths = build_demo(root, max_train=4, max_test=2)
    image = root / load_examples(paths.train)[2].images[0].relative_to(root)
    weights = paths.student / "model.safetensors"
    kept = {p: p.read_bytes() for p in (image, weights, paths.teachers[1])}
    images = len(list(image.parent.iterdir()))
    stamp = paths.train.stat().st_mtime_ns
    assert build_demo(root, max_train=4, max_test=2) == paths and paths.train.stat().st_mtime_ns == stamp
    capsys.readouterr()
    for gone in kept:
        gone.unlink()
        assert build_demo(root, max_train=4, max_test=2) == paths
        assert {p: p.read_bytes() for p in kept if p.exists()} == kept and gone.exists()
        said = capsys.readouterr().err  # (then transformers' own lines, writing the student)
        what = f"1 of the {images} images in images/train" if gone == image else gone.relative_to(root)
        assert said.splitlines()[0] == f"the built-in demo at {root} is incomplete (missing: {what}): building it again"
    marker = json.loads((root / "demo.json").read_text())
    settings = {k: v for k, v in marker.items() if k not in ("files", "images")}
    (root / "demo.json").write_text(json.dumps(settings))  # an earlier build's marker: its settings only
    assert build_demo(root, max_train=4, max_test=2) == paths and "incomplete" not in capsys.readouterr().err
    image.unlink()
    assert build_demo(root, max_train=4, max_test=2) == paths and image.read_bytes() == kept[image]
    assert f"(missing: {image.relative_to(root)})" in capsys.readouterr().err
    assert json.loads((root / "demo.json").read_text()) == marker
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


def test_one_process_builds_at_a_time_and_a_killed_build_leaves_nothing_in_the_way(tmp_path, monkeypatch):
    """Callers rebuilding a demo of other settings at once (two jobs after an upgrade) wait for the lock beside it
    instead of deleting and renaming over each other; a build interrupted while writing, or while deleting the old
    demo, leaves temporary folders only, which the next build removes."""
    root = tmp_path / "demo"
    build_demo(root, max_train=4, max_test=2)
    marker = json.loads((root / "demo.json").read_text())
    (root / "demo.json").write_text(json.dumps({**marker, "version": marker["version"] - 1}))  # an older release's
    holder = subprocess.Popen([sys.executable, "-c", f"import sys\nfrom ril_fast.files import waiting_lock\n"
                               f"with waiting_lock({str(root)!r}):\n    print('held', flush=True)\n"
                               f"    sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    built = []
    waiting = threading.Thread(target=lambda: built.append(build_demo(root, max_train=4, max_test=2)))
    waiting.start()
    waiting.join(timeout=2.0)
    assert waiting.is_alive() and not list(tmp_path.glob("demo.tmp-*"))  # waits, and has not started to build
    holder.stdin.close()
    holder.wait(timeout=60)
    waiting.join(timeout=120)
    assert built == [demo_module._paths(root)] and json.loads((root / "demo.json").read_text()) == marker

    (tmp_path / "demo.tmp-999999").mkdir()  # a build killed by SIGTERM or SIGKILL
    (tmp_path / "demo.tmp-999999" / "train.jsonl").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:  # Ctrl-C while writing
        m.setattr("ril_fast.tiny.make_tiny", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_demo(root, max_train=5, max_test=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]  # its own removed, the killed one too
    rmtree = shutil.rmtree
    with monkeypatch.context() as m:  # Ctrl-C while deleting the demo of other settings
        m.setattr(demo_module.shutil, "rmtree", lambda path, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                  if Path(path).name.endswith("-old") else rmtree(path, *a, **k))
        with pytest.raises(KeyboardInterrupt):
            build_demo(root, max_train=5, max_test=2)
    assert not root.exists()  # moved out of sight whole: never a demo folder without its marker
    assert len(load_examples(build_demo(root, max_train=5, max_test=2).train)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


def test_with_demo_fills_only_unset_paths(demo, monkeypatch, tmp_path):
    config = load_config([])
    assert needs_demo(config)
    full = with_demo(config, demo)
    assert full.student == str(demo.student) and full.train_data == str(demo.train)
    assert full.teachers == [str(p) for p in demo.teachers] and full.eval_data == str(demo.test)
    assert not full.rl_only and not needs_demo(full)
    assert needs_demo(load_config(["train_data=own.jsonl"])) and needs_demo(load_config(["student=own"]))
    rl = with_demo(load_config(["teachers="]), demo)
    assert rl.teachers == [] and rl.rl_only and rl.eval_data == str(demo.test)
    own = with_demo(load_config(["train_data=own.jsonl"]), demo)
    assert own.train_data == "own.jsonl" and own.teachers == [] and own.eval_data == ""
    assert own.student == str(demo.student)
    monkeypatch.setenv("RIL_FAST_DEMO", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"


def test_answer_types_choose_the_questions_and_test_order_is_random(tmp_path):
    every = build_demo(tmp_path / "all", max_train=60, max_test=40, answer_types=ANSWER_TYPES)
    train, test = load_examples(every.train), load_examples(every.test)
    assert {e.answer_type for e in train} == set(ANSWER_TYPES)
    # The training file is in easy-VQA's order; the test file in a random one, so that its first lines
    # (eval_max_examples) are a sample of many images, not all the questions of the first few.
    assert [e.id for e in train] == sorted(e.id for e in train)
    assert [e.id for e in test] != sorted(e.id for e in test)
    colour = build_demo(tmp_path / "all", max_train=20, max_test=5, answer_types=("color",))  # rebuilt
    assert {e.answer_type for e in load_examples(colour.train) + load_examples(colour.test)} == {"color"}
    for bad in ((), ("colour",)):
        with pytest.raises(ValueError, match="answer_types must be"):
            build_demo(tmp_path / "bad", answer_types=bad)


def test_a_split_smaller_than_asked_is_kept_whole(tmp_path):
    """``max_test`` beyond the split's questions of the chosen types keeps all of them (no error)."""
    _, answers, _ = easy_vqa.get_test_questions()
    shapes = sum(answer_type(a) == "shape" for a in answers)
    paths = build_demo(tmp_path / "demo", max_train=4, max_test=10**6, answer_types=("shape",))
    assert len(load_examples(paths.test)) == shapes


def test_only_its_own_killed_builds_are_removed(tmp_path, monkeypatch):
    """A build removes the temporary folders of killed builds of its own root, never another root's (a name
    with glob characters: "demo[1]" must not take "demo1.tmp-*"), and none where no lock tells that no other
    build is running (a file system that keeps no locks)."""
    root = tmp_path / "demo[1]"
    for name in ("demo[1].tmp-999998", "demo1.tmp-999999"):
        (tmp_path / name).mkdir()
    build_demo(root, max_train=4, max_test=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo[1].lock", "demo1.tmp-999999", "demo[1]"]

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "no locks")
    monkeypatch.setattr("ril_fast.files.fcntl.flock", no_locks)
    (tmp_path / "demo[1].tmp-999998").mkdir()
    paths = build_demo(root, max_train=5, max_test=2)  # other settings: built again, unlocked
    assert (tmp_path / "demo[1].tmp-999998").is_dir() and len(load_examples(paths.train)) == 5
