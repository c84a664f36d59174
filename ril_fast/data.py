"""Training examples, teacher collections and the order questions are served in.

Training / evaluation JSONL, one example per line (blank lines are skipped)::

    {"id": "q17", "question": "What shape is this?", "answer": "triangle", "images": ["img/17.png"],
     "answer_type": "shape"}                                   # answer_type optional

``id`` is a non-empty string (an integer is taken as its decimal string) unique in the file;
``question`` and ``answer`` are non-empty strings; ``images`` is a list (possibly empty) of paths
relative to the JSONL file's folder, each a file PIL can read. Other fields are ignored.

Teacher collection, one JSONL per teacher, one saved response per line, several lines per id allowed::

    {"id": "q17", "response": "The shape is a triangle.", "teacher": "qwen72b",   # teacher optional
     "question_sha": "875f90da5334"}                                            # question_sha optional

The teacher's name is the file's stem unless a line's ``teacher`` field names it (two files may feed
one teacher only through that field: two files of the same stem are an error, not one teacher). A
line marked ``"truncated": true`` (``ril_fast.teacher`` writes it when the teacher hit its token budget)
is left out: a cut-off text is not the teacher's answer. A line that repeats an earlier one's teacher, id, ``index``
(``ril_fast.teacher`` writes the k-th response to an example as index k) and response word for word is kept and
listed in ``TeacherBank.repeated`` (a collection copied in twice, most likely; a second collection of a short
answer can repeat one by chance). Every id must be a training example's. ``question_sha`` (``ril_fast.teacher``
writes it: :func:`question_digest` of the question and the image paths, as the data file writes them, that the
teacher was asked) must be its example's: a line collected for another question (another dataset's, or an earlier
version of the file's, under a reused id) is an error, not trained on as an answer to this one. A line without it
(written by hand) is taken as it is: nothing then ties it to its question. Any malformed line raises
``DataError("FILE:LINE: what is wrong")``; so does text holding one of the student's ``control_tokens`` (e.g.
``<|im_end|>``), which the tokenizer would read as that token.

``Batches`` serves the questions: seeded shuffled epochs cut into global batches of
``questions_per_step`` (an epoch's remainder is dropped), rank r of W taking ``batch[r::W]``. The
global order depends only on (seed, examples, questions_per_step), so a run resumed from
``state_dict()`` continues exactly, with the same or a different number of ranks.
"""

from __future__ import annotations

import enum
import hashlib
import json
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from ril_fast.images import checked_sizes


class DataError(ValueError):
    """A malformed data file; the message starts with ``FILE:LINE:``."""


class StepDataError(DataError):
    """A data problem one rank meets during a step, in its own questions (an image changed since the checks): the
    rank that meets it says it, whichever rank that is."""


STUDENT = "student"  # the source of a student output (``ril_fast.rewards``): no teacher may be called so


@dataclass
class Example:
    """One training or evaluation question: images (absolute paths), question, ground-truth answer."""

    id: str
    question: str
    answer: str
    images: list[Path]
    answer_type: str | None = None
    where: str = ""  # "FILE:LINE" it was read from, for error messages
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each image, upright
    # question_digest(question, image paths as written in the data file); made in code: of the paths as given
    question_sha: str = ""

    def __post_init__(self):
        if not self.question_sha:
            self.question_sha = question_digest(self.question, [str(p) for p in self.images])


def question_digest(question: str, images: list[str]) -> str:
    """What a teacher was asked, in 12 hex digits: the first 12 of the SHA-256 of the canonical JSON (keys sorted,
    no spaces, non-ASCII escaped) of ``{"images": images, "question": question}``, ``images`` the paths as the data
    file writes them. ``ril_fast.teacher`` writes it on each line as ``question_sha``; ``load_teachers`` refuses a
    line whose digest is not its example's. The answer is left out: the teacher's response does not depend on it,
    and a corrected answer must not throw away the collection."""
    canonical = json.dumps({"images": images, "question": question}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------
# Reading JSONL with file:line errors
# ----------------------------------------------------------------------------------------------------
def _records(path: Path):
    """Yield ``(line_number, dict)`` for each non-blank line of a JSONL file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}:0: cannot read the file: {e.strerror or e}") from None
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark, as some Windows tools write
        raw = raw[3:]
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if text.startswith("\ufeff"):  # the first line's is skipped above; one further down is another file's start
            raise DataError(f"{path}:{number}: a UTF-8 byte-order mark at the start of the line (two files joined?): "
                            f"remove it")
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: bad JSON: {e.msg} (column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{path}:{number}: bad JSON: nested too deeply") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _id(record: dict, where: str) -> str:
    value = record.get("id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: 'id' must be a non-empty string, got {value!r}" if "id" in record
                        else f"{where}: missing field 'id'")
    _whole_characters(value, "id", where)
    return value


def _whole_characters(value: str, name: str, where: str) -> None:
    """A DataError for text holding a lone UTF-16 surrogate (a JSON escape such as "\\ud83d": half of a
    character), which no tokenizer takes and no UTF-8 file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: {name!r} holds half of a character (the lone surrogate "
                        f"{value[e.start]!r} at character {e.start}): mend or remove it") from None


def _text(record: dict, name: str, where: str, control_tokens: Collection[str] = (), whole: bool = True) -> str:
    """The record's non-empty string ``name``; a DataError naming ``where`` if it is not one, holds one of
    ``control_tokens``, or (``whole``) holds half of a character."""
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {name!r} is empty")
    if whole:
        _whole_characters(value, name, where)
    for token in control_tokens:
        if token in value:
            raise DataError(f"{where}: {name!r} contains {token!r}, which the student's tokenizer reads as its "
                            f"control token (it would end the turn or stand for an image): remove it")
    return value


def _image_paths(record: dict, folder: Path, where: str, first_use: dict[Path, tuple[str, str]]) -> list[Path]:
    """The example's image paths, resolved against ``folder``, each an existing file (a folder is an error that
    says so); ``first_use`` gets ``path -> (where, name)`` for each path not seen before (:func:`_image_sizes` then
    opens them)."""
    if "images" not in record:
        raise DataError(f"{where}: missing field 'images' (a list of image paths, [] for none)")
    images = record["images"]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: 'images' must be a list of non-empty path strings, got {images!r}")
    paths = []
    for name in images:
        path = (folder / name).resolve()
        if path not in first_use:
            if path.is_dir():
                raise DataError(f"{where}: image {name!r} is a folder ({path}), not an image file")
            if not path.is_file():
                raise DataError(f"{where}: image {name!r} not found (looked for {path})")
            first_use[path] = (where, name)
        paths.append(path)
    return paths


def _image_sizes(first_use: dict[Path, tuple[str, str]]) -> dict[Path, tuple[int, int]]:
    """Each image checked with PIL and its upright (width, height) (``ril_fast.images.checked_sizes``: the sizes
    from the headers, each file read through, a JPEG's pixels decoded at 1/8 scale); a DataError naming the first
    example (in ``first_use``'s order) whose image cannot be read."""
    sizes = dict(zip(first_use, checked_sizes(list(first_use))))
    for path, size in sizes.items():
        if isinstance(size, Exception):
            where, name = first_use[path]
            raise DataError(f"{where}: cannot read image {name!r}: {size}")
    return sizes


def load_examples(path: str | Path, *, control_tokens: Collection[str] = ()) -> list[Example]:
    """Every example of a training/evaluation JSONL file, in file order (format in the module docstring).
    A question holding one of ``control_tokens`` (``Processor.control_tokens``) is an error."""
    path = Path(path)
    examples, first_line, first_use = [], {}, {}
    for number, record in _records(path):
        where = f"{path}:{number}"
        example_id = _id(record, where)
        if example_id in first_line:
            raise DataError(f"{where}: duplicate id {example_id!r} (first on line {first_line[example_id]})")
        first_line[example_id] = number
        answer_type = record.get("answer_type")
        if answer_type is not None and (not isinstance(answer_type, str) or not answer_type.strip()):
            raise DataError(f"{where}: 'answer_type' must be a non-empty string or null, got {answer_type!r}")
        question, answer = _text(record, "question", where, control_tokens), _text(record, "answer", where)
        images = _image_paths(record, path.parent, where, first_use)
        examples.append(Example(id=example_id, question=question, answer=answer, images=images,
                                answer_type=answer_type, where=where,
                                question_sha=question_digest(question, record["images"])))
    if not examples:
        raise DataError(f"{path}:1: no examples in the file")
    sizes = _image_sizes(first_use)
    for e in examples:
        e.image_sizes = [sizes[p] for p in e.images]
    return examples


# ----------------------------------------------------------------------------------------------------
# Teacher collections
# ----------------------------------------------------------------------------------------------------
@dataclass
class TeacherBank:
    """Saved teacher responses: ``id -> teacher -> [responses]``, teachers in order of first appearance."""

    by_id: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    teachers: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # "FILE:LINE" of each line left out as truncated
    cut: dict[str, list[str]] = field(default_factory=dict)  # id -> "FILE:LINE" of its lines left out so
    repeated: list[str] = field(default_factory=list)  # "FILE:LINE" of lines an earlier line repeats word for word

    def responses(self, example_id: str) -> dict[str, list[str]]:
        """``{teacher: [responses]}`` for one example (empty if no teacher answered it), teachers in the bank's
        order (``teachers``), whatever the order of the example's lines: ``rewards.draw_teacher_outputs``
        rotates a group's extra outputs over the teachers in this order."""
        found = self.by_id.get(example_id, {})
        return {name: found[name] for name in self.teachers if name in found}

    def missing(self, examples: list[Example]) -> list[Example]:
        """The examples that no teacher has a response for."""
        return [e for e in examples if not self.by_id.get(e.id)]

    def counts(self) -> dict[str, int]:
        """Number of saved responses per teacher."""
        counts = dict.fromkeys(self.teachers, 0)
        for per_teacher in self.by_id.values():
            for teacher, responses in per_teacher.items():
                counts[teacher] += len(responses)
        return counts


class LongPrompts(str, enum.Enum):
    """What becomes of an example whose prompt leaves no room for a full-length response (its ``long_prompts=``
    setting). REFUSE: the run stops before any model loads, naming its line; SKIP: it is left out and counted."""

    REFUSE = "refuse"
    SKIP = "skip"


def fitting(examples: list[Example], prompt_lengths: Callable[[list], list[int]], *, budget: int,
            max_new_tokens: int, setting: str, long_prompts: LongPrompts,
            hint: str = "") -> tuple[list[Example], list[str]]:
    """The examples whose prompt leaves room for ``max_new_tokens`` within ``budget`` tokens (``setting`` names
    it: "batch.max_tokens", "the model's context"), and "FILE:LINE: why" for each other one.

    ``prompt_lengths``: ``[(question, image sizes)] -> [tokens]`` (``Processor.prompt_lengths``), raising
    ValueError for an image its image processor refuses, which leaves that example out too. With REFUSE a
    DataError at the first example left out, which names it, says what to change (and ``hint``) and counts the
    others."""
    prompts = [(e.question, e.image_sizes) for e in examples]
    try:
        lengths = prompt_lengths(prompts)
    except ValueError:  # some image is refused: count each example alone to tell which
        lengths = []
        for prompt in prompts:
            try:
                lengths.extend(prompt_lengths([prompt]))
            except ValueError as e:
                lengths.append(str(e))
    kept, left_out, remedies = [], [], []
    for e, n in zip(examples, lengths):
        if isinstance(n, str):
            left_out.append(f"{e.where}: the image processor refuses an image of the example ({n})")
            remedies.append("resize the image or drop the example")
        elif n + max_new_tokens > budget:
            fact, remedy = no_room(e.where, n, max_new_tokens=max_new_tokens, budget=budget, setting=setting,
                                   images=bool(e.images))
            left_out.append(fact)
            remedies.append(remedy)
        else:
            kept.append(e)
    if left_out and long_prompts is LongPrompts.REFUSE:
        notes = [hint] if hint else []
        if len(left_out) > 1:
            notes.append(f"{len(left_out) - 1} more such example(s) in the file")
        raise DataError(f"{left_out[0]}: {remedies[0]}" + (f" ({'; '.join(notes)})" if notes else ""))
    return kept, left_out


def no_room(where: str, prompt_tokens: int, *, max_new_tokens: int, budget: float, setting: str,
            images: bool) -> tuple[str, str]:
    """Why a prompt of ``prompt_tokens`` leaves no room for a full-length response within ``budget`` tokens
    (``setting`` names it: "batch.max_tokens", or a limit of the model's, ``preflight.length_limit``), "FILE:LINE:
    ..." for ``where``, and what to change (``images``: whether the example has any)."""
    return (f"{where}: the prompt takes {prompt_tokens} tokens (images included); with max_new_tokens="
            f"{max_new_tokens} that exceeds {setting} ({budget} tokens)",
            ("raise batch.max_tokens, " if setting == "batch.max_tokens" else "") + "lower max_new_tokens, "
            + ("use fewer or smaller images" if images else "shorten the question") + ", or drop the example")


def refuse_images(examples: list[Example], model: str) -> None:
    """For a text-only ``model`` (its words: "the student (DIR)"): a DataError at the first example with images."""
    if first := next((e for e in examples if e.images), None):
        raise DataError(f"{first.where}: the example has images, but {model} is a text-only model")


def load_teachers(paths: list[str | Path], examples: list[Example], *,
                  count_tokens: Callable[[list[str]], list[int]] | None = None,
                  max_tokens: int | None = None, control_tokens: Collection[str] = ()) -> TeacherBank:
    """Read one JSONL collection per teacher (format in the module docstring) against ``examples``.

    With ``count_tokens`` (texts -> token counts, end-of-turn token included) and ``max_tokens``, a
    response longer than ``max_tokens`` is an error: Dr.GRPO normalises every output by the generation
    budget L_max, which a longer teacher output would exceed. A response holding one of
    ``control_tokens`` is an error. Lines marked truncated are left out and counted in
    ``TeacherBank.truncated``. A line whose ``question_sha`` is not its example's ``Example.question_sha`` (collected
    for another question under the same id) is an error naming the file's first such line and counting them.
    """
    by_id = {e.id: e for e in examples}
    bank = TeacherBank()
    stems: dict[str, Path] = {}  # teacher named by a file's stem -> that file
    indexed: set[tuple] = set()  # (teacher, id, index, response) of the lines ril_fast.teacher wrote
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.resolve() in seen:
            raise DataError(f"{path}:1: the teacher file is given twice")
        seen.add(path.resolve())
        lines, named_by_stem, truncated_before, stale = [], False, len(bank.truncated), []
        for number, record in _records(path):
            where = f"{path}:{number}"
            example_id = _id(record, where)
            if example_id not in by_id:
                raise DataError(f"{where}: id {example_id!r} is not in the training data")
            if "question_sha" in record:  # what the teacher was asked (a hand-written line may leave it out)
                digest = record["question_sha"]
                if not isinstance(digest, str):
                    raise DataError(f"{where}: 'question_sha' must be a string, got {digest!r}")
                if digest != by_id[example_id].question_sha:
                    stale.append((where, example_id))
            truncated = record.get("truncated", False)
            if not isinstance(truncated, bool):
                raise DataError(f"{where}: 'truncated' must be true or false, got {truncated!r}")
            # A line left out (truncated) is not trained on: control tokens in it, or half of a character where
            # it was cut, do no harm.
            response = _text(record, "response", where, () if truncated else control_tokens, whole=not truncated)
            teacher = _text(record, "teacher", where) if "teacher" in record else path.stem
            if teacher == STUDENT:
                raise DataError(f"{where}: a teacher may not be called {STUDENT!r} (the name marks the student's "
                                f"own outputs): rename the file or set the line's 'teacher' field")
            named_by_stem |= "teacher" not in record
            if truncated:
                bank.truncated.append(where)
                bank.cut.setdefault(example_id, []).append(where)
                continue
            if isinstance(record.get("index"), int):  # the same index and text again: a collection copied in twice?
                key = (teacher, example_id, record["index"], response)
                if key in indexed:
                    bank.repeated.append(where)
                indexed.add(key)
            if teacher not in bank.teachers:
                bank.teachers.append(teacher)
            bank.by_id.setdefault(example_id, {}).setdefault(teacher, []).append(response)
            lines.append((where, response))
        if stale:
            where, example_id = stale[0]
            example = by_id[example_id].where or f"example {example_id!r}"
            data = example.rpartition(":")[0] if by_id[example_id].where else "TRAIN.jsonl"
            raise DataError(f"{where}: id {example_id!r}: collected for another question (its question_sha is not "
                            f"that of the question and images of {example}; {len(stale)} such lines in the file): "
                            f"collect it again with python -m ril_fast.teacher --data {data} --out {path} ... (which "
                            f"sets the stale lines aside and asks for them again), or remove the field to train on "
                            f"it as it is")
        if named_by_stem:
            if path.stem in stems:
                raise DataError(f"{path}:1: this file and {stems[path.stem]} would both be teacher {path.stem!r}: "
                                f"rename one, or name the teacher in each line's 'teacher' field")
            stems[path.stem] = path
        if not lines:
            raise DataError(f"{path}:1: no teacher responses in the file"
                            + (" (every line is marked truncated)" if len(bank.truncated) > truncated_before else ""))
        if count_tokens is not None and max_tokens is not None:
            counts = count_tokens([response for _, response in lines])
            too_long = [(where, n) for (where, _), n in zip(lines, counts) if n > max_tokens]
            if too_long:
                where, n = too_long[0]
                raise DataError(f"{where}: the response has {n} tokens, more than max_new_tokens={max_tokens} "
                                f"({len(too_long)} such lines in the file): raise max_new_tokens or drop them")
    return bank


# ----------------------------------------------------------------------------------------------------
# Batches of questions, sharded over ranks, resumable
# ----------------------------------------------------------------------------------------------------
class Batches:
    """Infinite iterator over this rank's share of each global batch of questions (module docstring)."""

    def __init__(self, examples: list[Example], questions_per_step: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if questions_per_step < world_size:
            raise ValueError(f"questions_per_step={questions_per_step} cannot give each of {world_size} "
                             f"ranks a question")
        if len(examples) < questions_per_step:
            raise ValueError(f"{len(examples)} examples cannot fill a batch of {questions_per_step} questions")
        self.examples = examples
        self.questions_per_step = questions_per_step
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.index = 0, 0  # the next batch: number `index` of epoch `epoch`
        self._order = self._permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches in one pass over the examples."""
        return len(self.examples) // self.questions_per_step

    def _permutation(self, epoch: int) -> list[int]:
        # A string seed hashes deterministically (sha512), unlike hash() of a tuple.
        return random.Random(f"ril_fast:{self.seed}:{epoch}").sample(range(len(self.examples)), len(self.examples))

    def global_batch(self) -> list[Example]:
        """The next global batch (all ranks' questions), consuming it."""
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.index * self.questions_per_step
        self.index += 1
        return [self.examples[i] for i in self._order[start:start + self.questions_per_step]]

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> list[Example]:
        """This rank's questions of the next global batch: ``batch[rank::world_size]``."""
        return self.global_batch()[self.rank::self.world_size]

    def state_dict(self) -> dict:
        """The position: the next batch to serve, plus what the order depends on (checked on load)."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_examples": len(self.examples), "questions_per_step": self.questions_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()``; the seed, example count and batch size must match."""
        for key, mine in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("questions_per_step", self.questions_per_step)):
            if state[key] != mine:
                why = (" (the training data changed, or long_prompts=skip left out other examples: batch.max_tokens, "
                       "max_new_tokens and max_image_pixels decide which)") if key == "num_examples" else ""
                raise ValueError(f"cannot resume: the saved batches had {key}={state[key]}, this run has {mine}{why}")
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------------
# Examples -> packing samples
# ----------------------------------------------------------------------------------------------------
def to_sample(example: Example, response: str = "", *, truncated: bool = False) -> dict:
    """The ``ril_fast.processor`` sample of an example and a response (empty: the prompt alone, for rollouts).

    ``truncated``: the response was cut at the generation budget (no end-of-turn token follows it).
    """
    sample = {"images": list(example.images), "question": example.question, "response": response}
    if truncated:
        sample["truncated"] = True
    return sample
