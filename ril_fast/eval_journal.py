"""``python -m ril_fast.eval`` goes on after a crash: every answer is kept as soon as it is generated.

Each rank appends its greedy answers to ``OUT/partial/ATTEMPT-RANK.jsonl`` before they are judged, and again with
their verdicts once they are (a JSON line per example, flushed to the disk chunk by chunk). The same command run
again reads every earlier attempt's files (rank 0, before the model loads): an example answered and judged is not
asked again, one answered but not judged (the judge failed for good, the process was killed while judging) is only
judged, and the rest are answered. ``OUT/partial/run.json`` says what the answers are of: the model folder's files
(names, sizes, modification times), ``--max-new-tokens`` and the judge (its name holds its code's version). A journal
of anything else is set aside into ``OUT/partial.stale`` (replacing an older one) and the evaluation starts over. A
line is used only for the example of its id whose question and image paths (``question_sha``), answer and answer
type it was made for; a line cut short by the crash is skipped. Once ``examples.jsonl`` and ``summary.json`` are
written the journal is removed. On several nodes without a shared file system the other nodes' journals are not
read (their examples are answered again) and not removed.
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ril_fast.data import Example
from ril_fast.files import write_text_atomic

FOLDER = "partial"
RUN = "run.json"


def run_key(model: str | Path, *, max_new_tokens: int, judge: str) -> dict:
    """What a journal's answers depend on: the ``model`` folder (its absolute path, and its files: name -> [bytes,
    mtime in ns]; a model written again, or another one, differs), the generation budget and the judge's name."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(model).iterdir()) if p.is_file()}
    return {"model": str(Path(model).resolve()), "model_files": files, "max_new_tokens": max_new_tokens,
            "judge": judge}


@dataclass
class Resumed:
    """What earlier attempts left for this one (rows as ``ril_fast.eval`` writes them)."""

    done: dict[str, dict] = field(default_factory=dict)  # id -> answered and judged
    pending: dict[str, dict] = field(default_factory=dict)  # id -> answered, not judged
    attempt: str = ""  # this attempt's name: its files are ATTEMPT-RANK.jsonl
    set_aside: str = ""  # why an earlier journal was set aside ("" when none was)


def resume(out: Path, key: dict, examples: list[Example]) -> Resumed:
    """On rank 0 alone: read ``out``'s journal (set aside if made for another ``key``: :func:`run_key`), make the
    folder and its ``run.json`` for this attempt, and return the earlier attempts' rows of ``examples``."""
    folder = out / FOLDER
    found = Resumed(attempt=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if folder.is_dir() and _key(folder) != key:
        stale = out / f"{FOLDER}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        folder.rename(stale)
        found.set_aside = (f"set aside {stale}: the answers of an earlier, unfinished evaluation of another model, "
                           f"--max-new-tokens or judge")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / RUN).is_file():
        write_text_atomic(folder / RUN, json.dumps(key, indent=1) + "\n")
    by_id = {e.id: e for e in examples}
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the last line of a killed attempt, cut short
                continue
            e = by_id.get(row.get("id")) if isinstance(row, dict) else None
            if e is None or [row.get("question_sha"), row.get("answer"), row.get("answer_type")] != [
                    e.question_sha, e.answer, e.answer_type]:
                continue
            row = {k: v for k, v in row.items() if k != "question_sha"}  # as ril_fast.eval writes its results
            if "correct" in row:
                found.done[e.id] = row
                found.pending.pop(e.id, None)
            elif e.id not in found.done:
                found.pending[e.id] = row
    return found


def _key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / RUN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Journal:
    """This rank's file of the attempt ``attempt`` in ``out``'s journal; calling it appends rows (dicts with an
    ``id``), each with its example's ``question_sha`` from ``shas`` (id -> digest), flushed to the disk before it
    returns. The file is made at the first rows."""

    def __init__(self, out: Path, attempt: str, rank: int, shas: dict[str, str]):
        self.path = out / FOLDER / f"{attempt}-{rank}.jsonl"
        self.shas = shas
        self._file = None

    def __call__(self, rows: list[dict]) -> None:
        """Append ``rows``, one JSON line each, and flush them to the disk."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(json.dumps({**r, "question_sha": self.shas[r["id"]]}, ensure_ascii=False) + "\n"
                                 for r in rows))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file (nothing when none was made)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def finish(out: Path) -> None:
    """Remove ``out``'s journal: the evaluation's results are written."""
    shutil.rmtree(out / FOLDER, ignore_errors=True)
