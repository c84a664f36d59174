"""Teacher-response collection: K responses per training example, appended to a teacher collection.

    python -m ril_fast.teacher --model DIR_OR_URL --data train.jsonl --out teachers/NAME.jsonl \\
        --num-responses K --max-new-tokens L [--temperature 1.0] [--top-p 1.0] [--batch-size 32] \\
        [--seed N] [--served-model NAME] [--concurrency 16] [--n-per-request 8] [--teacher NAME] \\
        [--redo-truncated] [--judge rule|hf|http ...]

``--model`` is either
* a local HF folder that ``ril_fast.models.load`` opens (a Qwen-VL / InternVL VLM, or a text LM for
  text-only data; an example it cannot answer — images for a text-only model, an image its image processor
  refuses, a prompt that leaves no room for ``--max-new-tokens`` in its context — is refused, naming the
  first such example's file:line, before the model loads), in bf16 on CUDA, fp32 on the CPU: batched sampling with
  ``ril_fast.rollout.sample_responses``, ``--batch-size`` sequences per ``generate`` call, each batch seeded from
  ``--seed`` and its first job (so that no two batches draw alike).
  ``--seed`` defaults to one drawn from the OS (printed on stderr), so that a rerun draws afresh; a given
  ``--seed`` makes the responses reproducible (for the same pending jobs and ``--batch-size``), so a
  rerun with the same seed draws the same ones again; or
* the base URL of an OpenAI-compatible server (``http://HOST:PORT/v1``, e.g. vLLM serving a 72B VLM):
  one ``/chat/completions`` request per example and batch, asking with ``"n"`` for all of the example's
  responses still pending in the batch (at most ``--n-per-request``; more take further requests), so its
  images are uploaded and encoded once, not K times; ``--concurrency`` requests in flight (a batch waits
  for its last request, so a server teacher's batch is ``--batch-size`` rounded up to whole requests of
  min(K, ``--n-per-request``) responses, and to at least ``--concurrency`` such requests), each
  example's images sent as ``data:`` URLs before its question (a file as it is, but for an image whose EXIF
  orientation turns or flips it: that one is sent upright, as ril_fast's own loader turns it, re-encoded (a JPEG as
  JPEG at quality 95, any other as PNG: ``ril_fast.images.data_url``), since some servers, SGLang or llama.cpp,
  ignore the orientation);
  ``--served-model`` names the model (default: the first the server lists). A server that ignores ``n`` (fewer
  choices than asked) is asked again for the missing responses, with a hint on stderr to pass ``--n-per-request 1``
  (one request per response, as with ``--temperature 0``: vLLM refuses ``n`` > 1 with greedy sampling). Timeouts and
  retries as the http judge's (``ril_fast.judges_http``); a request that fails for good (a timeout, an HTTP 408, 429
  or 5xx after the retries) ends the command, naming its example's file:line and id, and so does an HTTP 401, 403 or
  404 (the key, the URL or the model is wrong for every request). Any other HTTP 4xx refuses that one example
  (vLLM's 400 for a prompt plus ``max_tokens`` beyond its ``--max-model-len``, an image it cannot use): its
  responses are not written, the command goes on, and the end says how many examples were refused, naming the
  first's file:line, id and the server's message (every example of a fresh start's first batch refused, when it
  holds several, ends the command: the server refuses the requests, e.g. a parameter, not the examples). A reply is
  a complete answer when its ``finish_reason`` is ``stop``, missing, or TGI's / llama.cpp's ``eos_token``,
  ``stop_sequence`` or ``eos``; ``length`` marks it truncated; any other (vLLM's ``abort``, ``content_filter``,
  ``error``, ...) is not written but counted, with the reasons seen, and said at the end. The API key from
  ``$RIL_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``. Half an emoji at the end of a cut reply (a lone UTF-16 surrogate)
  is written as U+FFFD.

The output is ``ril_fast.data``'s teacher-collection JSONL (``load_teachers`` reads it), one line per
response::

    {"id": "q17", "index": 0, "teacher": "NAME", "question_sha": "875f90da5334", "response": "...",
     "truncated": false, "correct": true, "judge": "rule-v7+math_verify-v8@0.9.0"}  # the last two only with --judge

``index`` is k in 0..K-1; ``teacher`` is ``--teacher`` (default: the output file's stem), one teacher per file;
``question_sha`` ties the line to what the teacher was asked (``ril_fast.data.question_digest``: 12 hex digits of
the SHA-256 of the question and the image paths as the data file writes them), so that neither the trainer
(``load_teachers`` refuses such a line) nor a rerun of this tool takes an answer to another question, collected
for another dataset or an earlier version of ``--data`` under the same id, as this one's. It leaves the answer out:
the response does not depend on it, and a corrected answer should not throw away a collection; a line's ``correct``
stays the verdict on the answer it was judged against, which the trainer does not read (its teacher judge judges
the question, the answer now and the response, through its cache);
``truncated``: the response hit ``--max-new-tokens``, and the trainer leaves it out (a cut-off text is not the
teacher's answer). How many the file holds is said at the start; ``--redo-truncated`` asks again for the
responses whose every line is marked truncated (a new line each; the old ones stay, left out), e.g. with
another ``--seed`` or a larger ``--max-new-tokens`` (the trainer takes none longer than its own). With
``--judge`` each response is judged as it is written (the verdict the trainer's cached teacher judge will
find, when the judge and its cache file are the same); should the judge fail for good (or the run be stopped while
it judges), the batch's responses are written without verdicts before the command ends, not lost. The run ends
with the judge's tally of the file: how many of its untruncated responses this judge found correct (the teacher's
accuracy on ``--data``), and how many it has no verdict on; a run with nothing left to collect prints it too (the
judge is built for its name: for ``--judge hf``, its model loads).

Append-only (but for stale lines, below) and resumable: responses are written in batches of ``--batch-size``, each
batch flushed before the next starts, so a crash loses at most the batch in progress. On start the output file is
read and checked (``ril_fast.teacher_resume``): a line that is not ril_fast.teacher's (no id / index) is an error,
and the file is left as it was, and so is a line of another teacher than this run's (``--teacher``, or the file's
stem for a line without one), before any model loads: resumed under another name, one teacher's collection would be
split in two, and a second teacher's would find the first's pairs done; the error names the line and both names
(pass ``--teacher`` as found to go on, or give the second teacher another ``--out``). The (id, index) pairs already
there are skipped; a last line cut short by a crash (not JSON) is removed, and a whole last line missing its newline
is given one. Run the same command again to finish: no line is written twice, none is lost. A line whose
``question_sha`` is not its example's (the question or its images changed under the id since it was collected) is
stale: its pair is not done, and the line is set aside, appended to ``NAME.jsonl.stale`` beside the file (a name no
``*.jsonl`` matches; kept, should ``--data`` be the wrong file) and flushed to the disk, before the file is written
again without it, to a temporary file renamed over it: a crash at any moment leaves each line in one of the two (in
both, at worst: the next run sets it aside again); the start says how many. A line without ``question_sha`` (written
by hand) counts as done: nothing ties it to a question. A response that ``load_teachers`` would refuse — empty
(whitespace only), or holding one of the teacher's control tokens (a local teacher's ``Processor.control_tokens``,
e.g. ``<|endoftext|>``: its responses are decoded with special tokens kept; the trainer checks the student's, the
same for a student of the teacher's family; none are known for a server, whose text vLLM gives without them) — is
not written; how many is said at the end, and the next run asks for them again, as it does for the unfinished ones
and those of the examples refused. One command at a time appends to a file: a second one started on the same
``--out`` (which would ask for the same responses and write them twice) stops at once, naming the first's process id
(an ``flock`` on ``.NAME.jsonl.lock`` beside the file, which the system drops when the process ends).

Errors in the input (a data or output file's line, a model folder ril_fast cannot use, a server that
fails for good, an output file in use) end the command with one line, ``error: ...``, and status 1; bad
options (an ``--out`` under a file included) with argparse's status 2, before any model loads.
"""

import argparse
import hashlib
import json
import secrets
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ril_fast.data import DataError, Example, load_examples, to_sample
from ril_fast.eval import check_judge_arguments, check_model_folder, check_prompts
from ril_fast.files import InUse, lock_file, unlock_file
from ril_fast.images import data_url
from ril_fast.judge import CachedJudge, JudgeItem, add_judge_arguments, judge_store, make_judge_from_config
from ril_fast.judges_http import HTTPError, OpenAIClient
from ril_fast.teacher_resume import set_aside_stale, stale_file, truncated_pairs, verdict_counts, written_pairs


@dataclass(frozen=True)
class Job:
    """Response number ``index`` (of K) to ``example``."""

    example: Example
    index: int


def pending_jobs(examples: list[Example], k: int, done: set[tuple[str, int]]) -> list[Job]:
    """The responses still to collect, example by example."""
    return [Job(e, i) for e in examples for i in range(k) if (e.id, i) not in done]


# ----------------------------------------------------------------------------------------------------
# Teachers: a local HF model or an OpenAI-compatible server; a batch of jobs -> (text, finish) each, finish
# "stop" (a whole answer), "length" (cut at the token limit) or another reason the server gave (unfinished);
# None for a job whose example the server refused
# ----------------------------------------------------------------------------------------------------
# finish_reason of a whole answer: OpenAI / vLLM "stop" (or none given), TGI's "eos_token" / "stop_sequence",
# llama.cpp's "eos"
_COMPLETE = frozenset({"stop", None, "eos_token", "stop_sequence", "eos"})


class LocalTeacher:
    """Batched sampling from a local HF model folder (``ril_fast.rollout.sample_responses``), in
    ``ril_fast.models.compute_dtype`` (bf16 on CUDA, where ``load`` puts it when there is one; fp32 on the CPU), each
    batch seeded from ``seed`` and its first job. ``control_tokens``: the model's (``Processor.control_tokens``),
    which its responses are decoded with."""

    def __init__(self, folder: str, *, max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                 seed: int):
        import torch

        from ril_fast.models import compute_dtype, load

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where ``load`` puts it
        self.model, self.processor = load(folder, dtype=compute_dtype(device), logprobs=False)  # it only generates
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size, self.seed = batch_size, seed
        self.control_tokens = self.processor.control_tokens

    def __call__(self, jobs: list[Job]) -> list[tuple[str, str]]:
        """One sampled response per job (greedy when the temperature is 0), as (text, "length" where it hit
        ``max_new_tokens``, else "stop")."""
        from ril_fast.rollout import sample_responses

        # The seed is a function of the run's seed and the batch's first job, not of where this run started.
        first = jobs[0]
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{first.example.id}:{first.index}".encode()).digest()[:4],
                              "little")
        rollouts = sample_responses(self.model, self.processor, [to_sample(j.example) for j in jobs],
                                    group_size=1, max_new_tokens=self.max_new_tokens,
                                    temperature=self.temperature or 1.0, top_p=self.top_p, seed=seed,
                                    greedy=self.temperature == 0, max_batch=self.batch_size)
        return [(r[0].text, "length" if r[0].truncated else "stop") for r in rollouts]


def chat_messages(example: Example) -> list[dict]:
    """The user turn for ``example``: its images as data URLs, then its question (plain text if no images)."""
    if not example.images:
        return [{"role": "user", "content": example.question}]
    parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in example.images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": example.question}]}]


def without_lone_surrogates(text: str) -> str:
    """``text`` with each unpaired UTF-16 surrogate replaced by U+FFFD (a split pair is joined). A server
    that cuts a reply inside an emoji sends half of its pair (``"\\ud83d"``): ``json.loads`` keeps it, and
    no UTF-8 file or hash can take it."""
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


# HTTP statuses that say the key, the URL or the model is wrong: every request would fail so, not one example's.
_EVERY_REQUEST = frozenset({401, 403, 404})


class ServerTeacher:
    """Sampling from an OpenAI-compatible server, ``concurrency`` requests in flight, each asking for up to
    ``n_per_request`` responses to one example (``"n"``). ``refused``: example id -> the server's message, for
    each example whose request it refused with an HTTP 4xx of that example's (module docstring)."""

    def __init__(self, url: str, model: str, *, max_new_tokens: int, temperature: float, top_p: float,
                 concurrency: int, timeout_s: float, retries: int, n_per_request: int):
        self.client = OpenAIClient(url, concurrency=concurrency, timeout_s=timeout_s, retries=retries)
        self.model = model or self.client.first_model()
        self.params = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        # vLLM answers n > 1 with greedy sampling by an HTTP 400 ("n must be 1 when using greedy sampling").
        self.n_per_request = 1 if temperature == 0 else n_per_request
        self.ignores_n = False  # seen a reply with fewer choices than asked for (the hint is printed once)
        self.control_tokens = ()  # unknown without the served model's tokenizer (vLLM leaves special tokens out)
        self.refused: dict[str, str] = {}
        self._lock = threading.Lock()

    def choices(self, body: dict, n: int) -> list[tuple[str, str]]:
        """The responses of one request for ``n`` choices, in order of the choices' ``index``: up to ``n``
        (fewer when the server ignores ``n``, the first ``n`` when it sends more), each as its text (lone
        surrogates replaced) and its finish: "stop" for a whole answer (any of ``_COMPLETE``), else the
        server's ``finish_reason`` ("length": it hit the token limit)."""
        reply = self.client.request("/chat/completions", {**body, "n": n} if n > 1 else body)
        try:
            listed = list(enumerate(reply["choices"]))
            ordered = [c for _, c in sorted(listed, key=lambda pair: pair[1].get("index", pair[0]))][:n]
            if not ordered:
                raise IndexError("no choices")
            return [(without_lone_surrogates(c["message"]["content"] or ""),
                     "stop" if c.get("finish_reason") in _COMPLETE else c["finish_reason"]) for c in ordered]
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise HTTPError(f"{self.client.url}/chat/completions: malformed reply ({type(e).__name__}: {e}): "
                            f"{json.dumps(reply)[:300]}") from None

    def group(self, jobs: list[Job], messages: list[dict]) -> list[tuple[str, str] | None]:
        """One response per job, all to the same example (its ``messages``: :func:`chat_messages`): one request for
        ``len(jobs)`` choices, then further requests for the responses a server that ignores ``n`` left out. None
        for each job when the server refuses the example (an HTTP 4xx but 401, 403 and 404; ``refused``); any other
        failure is an ``HTTPError`` naming the example's file:line and id."""
        example = jobs[0].example
        body = {"model": self.model, "messages": messages, **self.params}
        try:
            got = self.choices(body, len(jobs))
            while len(got) < len(jobs):
                with self._lock:
                    first, self.ignores_n = not self.ignores_n, True
                if first:
                    print(f"{self.client.url}: asked for n={len(jobs)} choices, got {len(got)}: the server seems to "
                          f"ignore \"n\"; the missing responses are asked for again (with such a server pass "
                          f"--n-per-request 1: one request per response)", file=sys.stderr)
                got += self.choices(body, len(jobs) - len(got))
        except HTTPError as e:
            status = e.status  # of a reply refused outright; None after the retries, or for a malformed reply
            if status in _EVERY_REQUEST:
                raise
            if status is not None and 400 <= status < 500:  # (the client retries 408 and 429: never here)
                with self._lock:
                    self.refused.setdefault(example.id, str(e))
                return [None] * len(jobs)
            raise HTTPError(f"{example.where}: example {example.id!r}: {e}", status=status) from None
        return got

    def __call__(self, jobs: list[Job]) -> list[tuple[str, str] | None]:
        """One response per job, in order, or None where the server refused the job's example. Consecutive jobs
        to the same example share a request, up to ``n_per_request`` of them; the choices are given to the jobs in
        order of their ``index``. Each example's messages are made once (its images read, a turned one encoded
        again), in parallel over the examples, for all of its requests."""
        groups: list[list[Job]] = []
        for job in jobs:
            if groups and groups[-1][0].example.id == job.example.id and len(groups[-1]) < self.n_per_request:
                groups[-1].append(job)
            else:
                groups.append([job])
        examples = list({g[0].example.id: g[0].example for g in groups}.values())
        messages = dict(zip((e.id for e in examples), self.client.map(chat_messages, examples)))
        replies = self.client.map(lambda group: self.group(group, messages[group[0].example.id]), groups)
        return [response for group in replies for response in group]


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------
def collect(teacher, jobs: list[Job], out: Path, *, name: str, batch_size: int, judge=None, total: int,
            progress: bool = True) -> dict:
    """Append one line per job's response to ``out``, a batch at a time (see the module docstring); a response that
    is empty, holds one of ``teacher.control_tokens`` or is unfinished (its finish neither "stop" nor "length") is
    not written, only counted, and none is for a job the teacher gives None (its example refused: the teacher counts
    those; on a fresh start, the first batch's every example refused, when it holds several, is an ``HTTPError``:
    the server refuses the requests, not the examples). Returns ``{"written": n, "truncated": n, "empty": n,
    "control_tokens": n, "unfinished": {reason: n}}`` (``truncated``: of those written, the ones cut at the token
    budget)."""
    from tqdm import tqdm

    written = cut = empty = control = 0
    unfinished: dict = {}
    bar = tqdm(total=total, initial=total - len(jobs), unit="response", desc=name, disable=not progress,
               dynamic_ncols=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            kept = []
            replies = teacher(chunk)
            # A fresh start whose first batch, of several examples, is refused whole: the requests are (a parameter
            # the server rejects), not the examples
            if start == 0 and len(jobs) == total and len({j.example.id for j in chunk}) > 1 \
                    and all(reply is None for reply in replies):
                first = chunk[0].example
                raise HTTPError(f"the server refused every example of the first batch ({len(chunk)} responses), "
                                f"e.g. {first.where} (id {first.id!r}): {teacher.refused.get(first.id, '')}")
            for job, reply in zip(chunk, replies):
                if reply is None:  # the server refused the example
                    continue
                text, finish = reply
                if finish not in ("stop", "length"):  # cut short by the server (vLLM's "abort", ...): no answer
                    unfinished[finish] = unfinished.get(finish, 0) + 1
                elif not text.strip():
                    empty += 1
                elif any(token in text for token in teacher.control_tokens):
                    control += 1
                else:
                    kept.append((job, text, finish == "length"))
            try:
                verdicts = judge([JudgeItem(j.example.question, j.example.answer, t) for j, t, _ in kept]) \
                    if judge else []
            except BaseException:  # the responses are the costly part: kept, without verdicts
                _write(f, kept, name)
                print(f"{name}: the judge failed: this batch's {len(kept)} responses were written without verdicts "
                      f"(the trainer's teacher judge judges every response itself)", file=sys.stderr)
                raise
            _write(f, kept, name, verdicts=verdicts, judge=judge.name if judge else "")
            written += len(kept)
            cut += sum(truncated for _, _, truncated in kept)
            bar.update(len(chunk))
    bar.close()
    return {"written": written, "truncated": cut, "empty": empty, "control_tokens": control, "unfinished": unfinished}


def _write(f, kept: list[tuple[Job, str, bool]], name: str, *, verdicts: list[bool] | None = None,
           judge: str = "") -> None:
    """Append a batch's responses ``(job, text, truncated)`` to the collection ``f``, with the ``judge``'s ``verdicts``
    when there are some, and flush them: the batch is in the file before the next one starts."""
    for n, (job, text, truncated) in enumerate(kept):
        # id first: a rerun knows a line cut short by a crash by its start (ril_fast.teacher_resume)
        record = {"id": job.example.id, "index": job.index, "teacher": name, "question_sha": job.example.question_sha,
                  "response": text, "truncated": truncated}
        if judge:
            record.update(correct=verdicts[n], judge=judge)
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()


def _check_prompts(folder: str, jobs: list[Job], max_new_tokens: int) -> None:
    """Refuse (``DataError``, naming the data file and line), before the model loads, the first pending example
    the local teacher cannot answer (``ril_fast.eval.check_prompts``): else every run would die at its batch."""
    from ril_fast.processor import Processor

    examples = list({id(j.example): j.example for j in jobs}.values())
    check_prompts(Processor.from_pretrained(folder), folder, examples, max_new_tokens=max_new_tokens, who="the teacher")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m ril_fast.teacher", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local HF model folder, or an OpenAI-compatible base URL")
    p.add_argument("--data", required=True, help="training JSONL (ril_fast.data)")
    p.add_argument("--out", required=True, help="the teacher collection to append to (JSONL)")
    p.add_argument("--num-responses", type=int, default=1, help="K: responses per example")
    p.add_argument("--max-new-tokens", type=int, default=512, help="L: most tokens per response")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="responses generated, judged and written together (server: at least --concurrency requests)")
    p.add_argument("--seed", type=int, default=None,
                   help="local model: seed of the sampling (default: drawn from the OS, so that a rerun draws afresh)")
    p.add_argument("--teacher", default="", help="the teacher's name in the file (default: the output's stem)")
    p.add_argument("--served-model", default="", help="server: the model name (default: the first listed)")
    p.add_argument("--concurrency", type=int, default=16, help="server: requests in flight")
    p.add_argument("--n-per-request", type=int, default=8,
                   help="server: most responses to one example asked for in one request (\"n\"; 1: one request each)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="server: seconds to wait for each reply")
    p.add_argument("--retries", type=int, default=3,
                   help="server: retries of a request after a timeout, a dropped connection, HTTP 408, 429 or 5xx, "
                        "with back-off 0.5 s, 1 s, 2 s, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--redo-truncated", action="store_true",
                   help="ask again for responses whose lines are all marked truncated (the trainer leaves them out)")
    add_judge_arguments(p, optional=True)
    args = p.parse_args(argv)
    if min(args.num_responses, args.max_new_tokens, args.batch_size, args.concurrency, args.n_per_request) < 1:
        p.error("--num-responses, --max-new-tokens, --batch-size, --concurrency and --n-per-request must be >= 1")
    if not (args.temperature >= 0 and 0 < args.top_p <= 1):  # so written, NaN fails too
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if not (0 < args.timeout_s < 1e9 and args.retries >= 0):
        p.error("--timeout-s must be > 0 and finite (under 1e9 s), --retries >= 0")
    if Path(args.out).is_dir():
        p.error(f"--out {args.out}: is a folder; give the collection's JSONL file (e.g. "
                f"{Path(args.out) / 'NAME.jsonl'})")
    if not (above := next(d for d in Path(args.out).parents if d.exists())).is_dir():
        p.error(f"--out {args.out}: {above} is a file, not a folder")
    if not args.model.startswith(("http://", "https://")):
        check_model_folder(p, "--model", args.model)
    check_judge_arguments(p, args)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the command; returns ``{"written", "truncated", "empty", "control_tokens", "unfinished", "refused",
    "skipped", "stale", "total"}`` (responses; ``truncated``: of those written; ``empty``, ``control_tokens`` and
    ``unfinished``, a count for each finish reason the server gave, e.g. ``{"abort": 2}``: those not written, see the
    module docstring; ``refused``: the examples the server refused, whose responses were not written; ``stale``: the
    lines found collected for another question and set aside, their responses asked for again)."""
    args = parse_args(argv)
    # A second collection into the same file would ask for the same responses and write them twice.
    lock_file(args.out)
    try:
        return _run(args)
    finally:
        unlock_file(args.out)


def _run(args: argparse.Namespace) -> dict:
    """``main``'s work, with the output file locked."""
    out = Path(args.out)
    examples = load_examples(args.data)
    name = args.teacher or out.stem
    done = written_pairs(out, teacher=name)  # one teacher per file: another's lines end the command here
    if stale := set_aside_stale(out, examples):
        done = written_pairs(out, teacher=name)
        print(f"{name}: {stale} responses in {out} were collected for another question (their question_sha is not "
              f"that of their id's question and images in {args.data} now): moved to {stale_file(out)}, and asked "
              f"for again", file=sys.stderr)
    cut = truncated_pairs(out) & {(e.id, k) for e in examples for k in range(args.num_responses)}
    jobs = pending_jobs(examples, args.num_responses, done - cut if args.redo_truncated else done)
    total = len(examples) * args.num_responses
    print(f"{name}: {total - len(jobs)} of {total} responses already in {out}; {len(jobs)} to collect"
          + (f" ({len(cut)} marked truncated, which the trainer leaves out, asked for again)" if args.redo_truncated
             and cut else f"; {len(cut)} of those are marked truncated, which the trainer leaves out: "
             f"--redo-truncated asks for them again" if cut else ""), file=sys.stderr)
    stats = {"written": 0, "truncated": 0, "empty": 0, "control_tokens": 0, "unfinished": {}}
    refused: dict[str, str] = {}  # example id -> the server's message
    local = not args.model.startswith(("http://", "https://"))
    if jobs:
        batch_size = args.batch_size
        if local:
            _check_prompts(args.model, jobs, args.max_new_tokens)
            seed = secrets.randbits(32) if args.seed is None else args.seed
            print(f"{name}: sampling seed {seed}", file=sys.stderr)
            teacher = LocalTeacher(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_p=args.top_p, batch_size=args.batch_size, seed=seed)
        else:
            teacher = ServerTeacher(args.model, args.served_model, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, concurrency=args.concurrency,
                                    timeout_s=args.timeout_s, retries=args.retries, n_per_request=args.n_per_request)
            # Whole requests, and enough of them to keep --concurrency in flight (the batch waits for its last).
            per_request = min(args.num_responses, teacher.n_per_request)
            batch_size = per_request * max(args.concurrency, -(-args.batch_size // per_request))
        judge = None
        if args.judge != "none":
            judge = CachedJudge(make_judge_from_config(args), store=judge_store(args.judge_cache))
        stats = collect(teacher, jobs, out, name=name, batch_size=batch_size, judge=judge, total=total,
                        progress=not args.no_progress)
        refused = getattr(teacher, "refused", {})
    if args.judge != "none":  # after a run with nothing to collect too: the way to ask for a collection's accuracy
        judged_by = judge.name if jobs else make_judge_from_config(args).name
        correct, judged, whole = verdict_counts(out, judged_by)
        print(f"{name}: {correct} of the {judged} responses in {out} judged by {judged_by} are correct "
              f"({correct / max(judged, 1):.1%})" + (f"; {whole - judged} of its {whole} untruncated responses "
              f"have no verdict of this judge" if whole > judged else ""), file=sys.stderr)
    if unwritten := stats["empty"] + stats["control_tokens"] + sum(stats["unfinished"].values()):
        again = (" (greedy decoding, --temperature 0, is likely to give the same responses again)"
                 if args.temperature == 0 else " with another --seed (the same seed draws the same responses)"
                 if local and args.seed is not None else "")
        reasons = ", ".join(f"{reason!r} ({n})" for reason, n in sorted(stats["unfinished"].items(), key=str))
        print(f"{unwritten} responses were not written ({stats['empty']} empty, {stats['control_tokens']} holding a "
              f"control token of the teacher's, which ril_fast.data.load_teachers refuses"
              + (f", {unwritten - stats['empty'] - stats['control_tokens']} unfinished: the server ended them with "
                 f"finish_reason {reasons}" if stats["unfinished"] else "")
              + f"); run the command again to ask for them{again}", file=sys.stderr)
    if refused:
        first = next(e for e in examples if e.id in refused)  # in the data's order
        print(f"{len(refused)} examples were refused by the server (an HTTP 4xx for their request: e.g. a prompt "
              f"plus --max-new-tokens beyond its --max-model-len, or an image it cannot use), their responses not "
              f"written; the first, {first.where} (id {first.id!r}): {refused[first.id]}. Fix or leave out those "
              f"examples (or lower --max-new-tokens); a rerun asks for them again", file=sys.stderr)
    if stats["truncated"]:
        print(f"{stats['truncated']} of the {stats['written']} responses written hit --max-new-tokens "
              f"{args.max_new_tokens}: marked truncated, which the trainer leaves out; raise --max-new-tokens and run "
              f"again with --redo-truncated", file=sys.stderr)
    return {**stats, "refused": len(refused), "skipped": total - len(jobs), "stale": stale, "total": total}


if __name__ == "__main__":
    from ril_fast.processor import UnsupportedModel

    try:
        main()
    except (DataError, UnsupportedModel, HTTPError, InUse) as e:  # the message names the file and line, the model
        raise SystemExit(f"error: {e}") from None  # type, or the server and what failed
