"""Resuming a teacher collection: what ``python -m ril_fast.teacher``'s output file already holds.

Before a run asks for responses, ``ril_fast.teacher`` reads its ``--out`` file with these (the module docstring
there says what a user sees): :func:`written_pairs` checks that each line is the tool's own and of this run's
teacher, mends a last line a crash cut short, and gives the (id, index) pairs already done; :func:`set_aside_stale`
moves the lines collected for another question to :func:`stale_file`; :func:`truncated_pairs` gives the pairs whose
every line is marked truncated (``--redo-truncated`` asks for them again); :func:`verdict_counts` tallies a judge's
verdicts in the file once a run has written it.
"""

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from ril_fast.data import DataError, Example

_LINE_START = b'{"id": '  # how each line ril_fast.teacher.collect writes begins (json.dumps, id the first key)


def _pair(line: bytes, where: str, teacher: str | None = None, stem: str = "") -> tuple[str, int]:
    """The (id, index) of a line of ril_fast.teacher; a ``DataError`` naming ``where`` for any other line, and
    for a line of another teacher than ``teacher`` (when given; ``stem``: the name of a line without one, as
    ``ril_fast.data.load_teachers`` reads it)."""
    try:
        record = json.loads(line)
        pair = str(record["id"]), int(record["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: not a line of ril_fast.teacher (no id / index: {e}); "
                        f"write to another --out") from None
    if teacher is not None and (found := record.get("teacher", stem)) != teacher:
        raise DataError(f"{where}: a response of teacher {found!r}, but this run's teacher is {teacher!r} (a file "
                        f"holds one teacher): pass --teacher {shlex.quote(str(found))} to go on collecting {found!r}, "
                        f"or give another --out for a second teacher")
    return pair


def written_pairs(out: Path, teacher: str | None = None) -> set[tuple[str, int]]:
    """The (id, index) pairs of the lines of ``out`` (empty if it does not exist); a ``DataError`` when a
    line is not one of ril_fast.teacher's, or (``teacher`` given) is another teacher's (a line without a name is
    the file stem's). Only a file found to be the tool's own is changed: a last line without its newline is cut
    off when it is the start of a line the process died writing (not JSON, beginning as ril_fast.teacher's lines do),
    and given its newline when it is a whole line."""
    if not out.exists():
        return set()
    raw = out.read_bytes()
    *lines, tail = raw.split(b"\n")
    pairs = {_pair(line, f"{out}:{number}", teacher, out.stem) for number, line in enumerate(lines, start=1)
             if line.strip()}
    if not tail.strip():
        return pairs
    try:
        json.loads(tail)
    except ValueError:  # cut short (UnicodeDecodeError, too, is a ValueError)
        if tail.startswith(_LINE_START) or _LINE_START.startswith(tail):
            with out.open("r+b") as f:
                f.truncate(len(raw) - len(tail))
            print(f"{out}: removed an incomplete last line ({len(tail)} bytes) left by an interrupted run",
                  file=sys.stderr)
            return pairs
    pairs.add(_pair(tail, f"{out}:{len(lines) + 1}", teacher, out.stem))
    with out.open("ab") as f:  # a whole line, its newline missing: the next line must not join it
        f.write(b"\n")
    return pairs


def truncated_pairs(out: Path) -> set[tuple[str, int]]:
    """The (id, index) pairs of ``out`` (read after :func:`written_pairs`) whose every line is marked truncated."""
    cut, whole = set(), set()
    for line in out.read_bytes().splitlines() if out.exists() else []:
        if line.strip():
            record = json.loads(line)
            (cut if record.get("truncated") is True else whole).add((str(record["id"]), int(record["index"])))
    return cut - whole


def verdict_counts(out: Path, judge: str) -> tuple[int, int, int]:
    """(correct, judged, whole): of the lines of ``out`` (read after :func:`written_pairs`) not marked truncated (those
    the trainer takes), how many ``judge`` (a judge's name) judged, and how many of those it found correct."""
    correct = judged = whole = 0
    for line in out.read_bytes().splitlines() if out.exists() else []:
        if line.strip() and (record := json.loads(line)).get("truncated") is not True:
            whole += 1
            if record.get("judge") == judge and isinstance(record.get("correct"), bool):
                judged += 1
                correct += record["correct"]
    return correct, judged, whole


def stale_file(out: Path) -> Path:
    """Where :func:`set_aside_stale` keeps the lines of ``out`` it takes out: ``NAME.jsonl.stale`` beside it (beside
    the file it points to, for a symbolic link)."""
    out = out.resolve()
    return out.with_name(f"{out.name}.stale")


def set_aside_stale(out: Path, examples: list[Example]) -> int:
    """Take out of ``out`` (read after :func:`written_pairs`, which checked its lines) the lines collected for
    another question: a ``question_sha`` that is not their example's (``Example.question_sha``; a line without one,
    or of an id not in ``examples``, stays); returns how many. They are appended to :func:`stale_file` and flushed
    to the disk first, then ``out`` is written again without them, to a temporary file beside it renamed over it:
    a crash at any moment leaves each line in ``out`` or the stale file (in both, at worst, and the next run sets it
    aside again), never in neither. A symbolic link ``out`` (into shared storage, say) stays one: the file it points
    to is the one written again, keeping its permissions."""
    if not out.exists():
        return 0
    out = out.resolve()
    digests = {e.id: e.question_sha for e in examples}
    *lines, tail = out.read_bytes().split(b"\n")  # as written_pairs splits it; the tail is blank after it
    kept, stale = [], []
    for line in lines:
        record = json.loads(line) if line.strip() else {}
        digest, example_id = record.get("question_sha"), str(record.get("id"))
        is_stale = digest is not None and example_id in digests and digest != digests[example_id]
        (stale if is_stale else kept).append(line + b"\n")
    if not stale:
        return 0
    kept.append(tail)
    tmp = out.with_name(f".{out.name}.tmp")
    for path, mode, chunk in ((stale_file(out), "ab", stale), (tmp, "wb", kept)):  # the stale lines safe first
        with path.open(mode) as f:
            f.write(b"".join(chunk))
            f.flush()
            os.fsync(f.fileno())
    shutil.copymode(out, tmp)
    os.replace(tmp, out)
    return len(stale)
