"""The run's record: metrics.jsonl round-trip, curves.png, TensorBoard events."""

import importlib.util
import io
import json
import math
import random
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from tqdm import tqdm

from ril_fast.curves import COLUMNS, DPI, PANEL_INCHES, PANELS, plot_curves
from ril_fast.metrics import RunLog, bar_labels, read_metrics, records_until

PANEL_PX = (int(PANEL_INCHES[0] * DPI), int(PANEL_INCHES[1] * DPI))


def fake_run(steps: int, rng: random.Random, *, teachers: bool = True, eval_every: int = 5) -> list[dict]:
    """Records shaped like the trainer's: a training record per step, evaluations before and every few steps."""
    types = ("color", "shape")
    records = [{"step": 0, "eval_accuracy": 0.0, "eval_examples": 50, **{f"eval_accuracy/{t}": 0.0 for t in types}}]
    for step in range(1, steps + 1):
        r = {"step": step, "student_answer_reward": rng.random(), "loss": rng.gauss(0, 0.1), "kl": rng.random() * 1e-3,
             "grad_norm": rng.random() * 2, "tokens_per_s": rng.uniform(500, 3000), "lr": 3e-3 * rng.random(),
             "skipped": 0.0, "time/rollout": rng.random(), "peak_memory_gib": rng.uniform(1, 80),
             "mfu": rng.uniform(0, 0.6)}
        if teachers:
            r.update(student_similarity_reward=rng.random(), teacher_answer_reward=1.0,
                     teacher_similarity_reward=rng.random(), disc_accuracy=rng.random(), disc_grad_norm=rng.random())
        records.append(r)
        if step % eval_every == 0:
            records.append({"step": step, "eval_accuracy": rng.random(), "eval_examples": 50,
                            **{f"eval_accuracy/{t}": rng.random() for t in types}})
    return records


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_metrics_round_trip_and_only_the_main_rank_writes(tmp_path, _fresh_seed):
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    records = fake_run(rng.randint(3, 12), rng)
    log = RunLog(tmp_path / "run", enabled=True, total_steps=len(records), progress=False)
    for r in records:
        log.log(r)
    assert read_metrics(tmp_path / "run" / "metrics.jsonl") == records  # floats survive JSON exactly
    other = RunLog(tmp_path / "other", enabled=False, total_steps=3, progress=False)
    other.log(records[0])
    other.close()
    assert not (tmp_path / "other").exists()


def test_judge_cache_hit_rate_is_hits_over_all_lookups_of_all_ranks():
    """The logged ``teacher_judge_cache_hit_rate``: the ranks' hits over their hits and misses together (3 + 1 hits
    of 3 + 1 + 1 + 3 lookups: 0.5), 0 before any lookup, and no figure without teachers (no verdict bank)."""
    from types import SimpleNamespace

    from ril_fast.metrics import _judge_cache_stats

    ril = SimpleNamespace(bank=object())
    assert _judge_cache_stats(ril, [(3, 1), (1, 3)]) == {"teacher_judge_cache_hit_rate": 0.5}
    assert _judge_cache_stats(ril, [(1, 4)]) == {"teacher_judge_cache_hit_rate": 0.2}
    assert _judge_cache_stats(ril, [(0, 0), (0, 0)]) == {"teacher_judge_cache_hit_rate": 0.0}
    assert _judge_cache_stats(SimpleNamespace(bank=None), [(3, 1)]) == {}


@pytest.mark.parametrize("teachers", [True, False], ids=["ril", "rl_only"])
def test_close_draws_curves_png_of_the_expected_size(tmp_path, capsys, teachers, _fresh_seed):
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    records = fake_run(rng.randint(20, 40), rng, teachers=teachers)
    log = RunLog(tmp_path, enabled=True, total_steps=len(records), progress=False)
    for r in records:
        log.log(r)
    log.close()
    png = tmp_path / "curves.png"
    assert f"curves: {png}" in capsys.readouterr().out
    # RL only has no discriminator: its panel goes, the rest stay.
    panels = len(PANELS) - (0 if teachers else 1)
    rows = math.ceil(panels / COLUMNS)
    assert png_size(png) == (COLUMNS * PANEL_PX[0], rows * PANEL_PX[1])
    image = Image.open(png).convert("L")
    image.load()
    # Every panel with data has ink in it; the unused cells of the last row are blank.
    for k in range(rows * COLUMNS):
        row, col = divmod(k, COLUMNS)
        cell = image.crop((col * PANEL_PX[0], row * PANEL_PX[1], (col + 1) * PANEL_PX[0], (row + 1) * PANEL_PX[1]))
        dark = int((np.asarray(cell) < 128).sum())
        assert (dark > 500) == (k < panels), (k, dark)


def test_curves_command_plots_a_run_cut_short_and_names_a_missing_record(tmp_path):
    """``python -m ril_fast.curves RUN_DIR`` on a run killed mid-write (its last line cut short) draws the rest;
    a folder without metrics.jsonl is a one-line error."""
    records = fake_run(6, random.Random(0))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')
    done = subprocess.run([sys.executable, "-m", "ril_fast.curves", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == str(tmp_path / "curves.png"), done.stderr
    assert Image.open(tmp_path / "curves.png").size[0] > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "ril_fast.curves", str(empty)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == (f"error: no {empty / 'metrics.jsonl'}: give a run's "
                                                            f"output_dir (default runs/ril)")


def test_non_finite_values_are_written_as_strict_json_and_read_back(tmp_path):
    """A skipped step's NaN loss and infinite gradient norms: every line of metrics.jsonl is strict JSON (no bare
    NaN / Infinity, which Node's JSON.parse refuses and jq reads as null and 1.8e308), also after a resumed run
    rewrote the file; read_metrics gives the floats back, and reads a file of older code (bare NaN) alike."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    records = [{"step": 1, "loss": 0.5, "grad_norm": 1.0, "skipped": 0.0},
               {"step": 2, "loss": math.nan, "grad_norm": math.inf, "disc_grad_norm": -math.inf, "skipped": 1.0},
               {"step": 3, "loss": 0.25, "grad_norm": 2.0, "skipped": 0.0}]
    path = tmp_path / "metrics.jsonl"
    log = RunLog(tmp_path, enabled=True, total_steps=3, progress=False)
    for r in records:
        log.log(r)
    lines = path.read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[1]) == {"step": 2, "loss": "nan", "grad_norm": "inf", "disc_grad_norm": "-inf",
                                    "skipped": 1.0}
    assert repr(read_metrics(path)) == repr(records)  # repr: nan == nan
    RunLog(tmp_path, enabled=True, total_steps=3, progress=False, resume_step=2).close()  # rewrites the kept ones
    assert [json.loads(line, parse_constant=refuse)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert repr(read_metrics(path)) == repr(records[:2])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))  # as the older code wrote it
    assert repr(read_metrics(path)) == repr(records) and "NaN" in path.read_text()
    path.write_text('{"step": 1}\n"nan"\n{"step": 2}\n')  # JSON, but no record
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics record"):
        read_metrics(path)


def test_plot_curves_without_data_draws_nothing(tmp_path):
    assert plot_curves([], tmp_path / "c.png") is None
    assert plot_curves([{"step": 1, "skipped": 0.0, "loss": float("nan")}], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (optional)")
def test_tensorboard_events_hold_every_scalar(tmp_path, _fresh_seed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    records = fake_run(rng.randint(3, 8), rng)
    log = RunLog(tmp_path, enabled=True, total_steps=len(records), progress=False)
    for r in records:
        log.log(r)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step":
                expected.setdefault(k, []).append((r["step"], v))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for key, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points]
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)  # stored as fp32


def test_progress_bar_labels_are_distinct(_fresh_seed):
    # The old labels: first word[:4] + "_" + last word[:4] made both student rewards "stud_rewa".
    keys = ["student_answer_reward", "student_similarity_reward", "teacher_answer_reward", "disc_accuracy",
            "disc_loss", "loss", "eval_accuracy", "eval_accuracy/color", "kl"]
    labels = bar_labels(keys)
    assert labels == {"student_answer_reward": "ans_reward", "student_similarity_reward": "sim_reward",
                      "teacher_answer_reward": "teacher_answer_reward", "disc_accuracy": "disc_acc",
                      "disc_loss": "disc_loss", "loss": "loss", "eval_accuracy": "eval_acc",
                      "eval_accuracy/color": "eval_accuracy/color", "kl": "kl"}
    # Keys that are other keys' short labels: the clashing ones show in full, the rest stay short.
    clashing = ["student_answer_reward", "ans_reward", "sim_reward", "loss", "disc_acc", "eval_accuracy"]
    assert bar_labels(clashing) == {"student_answer_reward": "student_answer_reward", "ans_reward": "ans_reward",
                                    "sim_reward": "sim_reward", "loss": "loss", "disc_acc": "disc_acc",
                                    "eval_accuracy": "eval_acc"}
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    pool = keys + clashing + ["stud_rewa", "loss_loss", "eval_acc", "disc_loss"]
    for _ in range(200):
        chosen = rng.sample(pool, rng.randint(1, len(pool)))
        assert len(set(bar_labels(chosen).values())) == len(set(chosen)), chosen


def test_progress_bar_shows_every_number_under_its_own_label(tmp_path):
    log = RunLog(tmp_path, enabled=True, total_steps=3, progress=False)
    log.bar = tqdm(total=3, file=io.StringIO())
    log.log({"step": 1, "student_answer_reward": 0.25, "student_similarity_reward": 0.75, "disc_accuracy": 0.5,
             "loss": -0.125, "eval_accuracy": 0.375, "kl": 0.001, "clip_frac": 0.0625, "grad_norm": 1.5,
             "tokens_per_s": 12345.6, "mfu": 0.41275, "peak_memory_gib": 1.171875, "lr": 0.003})
    assert log.bar.postfix == ("ans_reward=0.25, sim_reward=0.75, disc_acc=0.5, loss=-0.125, kl=0.001, clip=0.0625, "
                               "gnorm=1.5, tok/s=12346, mfu=41.3%, mem_gib=1.17")
    assert log.bar.n == 1
    log.close()


@pytest.mark.parametrize("terminal", [True, False])
def test_each_evaluation_gets_a_line_of_its_own(tmp_path, capsys, terminal):
    """An evaluation's accuracies, per answer type too, are a line of their own above the bar (on a terminal the
    bar's postfix is cut at its width, and the next step's replaced it: no accuracy was ever seen), or below the
    step's line; a record of the final evaluation alone leaves the bar's numbers as they were."""
    log = RunLog(tmp_path, enabled=True, total_steps=3, progress=False)
    out = io.StringIO()
    if terminal:
        log.bar = tqdm(total=3, file=out)
    log.log({"step": 2, "loss": 0.5, "eval_accuracy": 0.4375, "eval_accuracy/color": 0.875,
             "eval_accuracy/shape": 0.0625, "eval_examples": 16})
    log.log({"step": 3, "eval_accuracy": 0.5, "eval_examples": 16})
    printed = capsys.readouterr().out  # tqdm.write: on stdout, the bar (stderr) cleared and drawn again below
    lines = [line for line in printed.splitlines() if "accuracy" in line]
    assert lines == ["step 2: held-out accuracy 0.438 on 16 examples (color 0.875, shape 0.0625)",
                     "step 3: held-out accuracy 0.5 on 16 examples"], printed
    if terminal:
        assert log.bar.postfix == "loss=0.5" and log.bar.n == 3
    else:
        assert "step 2: loss 0.5\n" in printed and "step 3: \n" not in printed
    log.close()


def test_an_evaluation_line_is_flushed(tmp_path, monkeypatch):
    """Without a terminal (stdout a log file, block-buffered), the evaluation's line is flushed as it is printed:
    it is not held back until the next step's line."""
    class Out(io.StringIO):
        def __init__(self):
            super().__init__()
            self.flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    out = Out()
    monkeypatch.setattr(sys, "stdout", out)
    log = RunLog(tmp_path, enabled=True, total_steps=3, progress=False)
    log.log({"step": 0, "eval_accuracy": 0.25, "eval_examples": 4})
    assert out.flushed == "step 0: held-out accuracy 0.25 on 4 examples\n"
    log.close()


def _final_eval(steps: int, rng: random.Random) -> dict:
    return {"step": steps, "eval_accuracy": rng.random(), "eval_examples": 50}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed (optional)")
@pytest.mark.parametrize("killed_at", ["mid_run", "after_final_eval", "before_first_checkpoint"])
def test_a_resumed_run_leaves_one_tensorboard_event_per_step(tmp_path, killed_at, _fresh_seed):
    """A run killed after logging some steps and started again in its folder: from its checkpoint at
    ``resume`` (mid-run; or at the last step, killed after the final evaluation, which is logged after that
    step's checkpoint under the same step number), or afresh (killed before its first checkpoint).
    TensorBoard shows what metrics.jsonl holds: the killed run's events up to ``resume``, the new run's
    after it, every scalar of every step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    steps = rng.randint(6, 12)
    resume = {"mid_run": rng.randint(1, steps - 2), "after_final_eval": steps,
              "before_first_checkpoint": None}[killed_at]
    killed, again = (fake_run(steps, rng, eval_every=steps + 1) + [_final_eval(steps, rng)] for _ in range(2))
    log = RunLog(tmp_path, enabled=True, total_steps=steps, progress=False)
    for r in killed:
        log.log(r)
    log.tensorboard.flush()  # what a killed run had written; it never closes
    # TensorBoard reads a folder's event files in name order: the writer's start second, then a
    # per-process counter (".9" sorts after ".10"). A run started again is a new process, seconds later.
    time.sleep(1 - time.time() % 1 + 0.01)
    log = RunLog(tmp_path, enabled=True, total_steps=steps, progress=False, resume_step=resume)
    kept = [] if resume is None else killed[:resume + 1]  # records 0..resume: step 0's evaluation, then steps
    for r in again[len(kept):]:
        log.log(r)
    log.close()
    expected = kept + again[len(kept):]
    assert read_metrics(tmp_path / "metrics.jsonl") == expected
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    keys = {k for r in expected for k in r if k != "step"}
    assert set(events.Tags()["scalars"]) == keys
    for key in keys:
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], r[key]) for r in expected if key in r]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as fp32


def test_a_crash_while_a_resumed_run_rewrites_the_file_keeps_the_old_one(tmp_path, monkeypatch):
    """A resumed run rewrites metrics.jsonl with the records it keeps: through a temporary file renamed over
    it, so a crash before the rename (here: the flush to the disk fails) leaves every old record."""
    import ril_fast.files

    records = fake_run(6, random.Random(0))
    log = RunLog(tmp_path, enabled=True, total_steps=6, progress=False)
    for r in records:
        log.log(r)
    log.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    (tmp_path / "metrics.jsonl.before").write_bytes(before)

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(ril_fast.files.os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        RunLog(tmp_path, enabled=True, total_steps=6, progress=False, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    monkeypatch.undo()
    RunLog(tmp_path, enabled=True, total_steps=6, progress=False, resume_step=3).close()
    assert read_metrics(tmp_path / "metrics.jsonl") == records_until(tmp_path / "metrics.jsonl.before", 3)
