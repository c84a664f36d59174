"""Correctness judges: a batch of (question, ground-truth answer, response) -> booleans.

RIL's answer reward is r_ans = 1[judge says correct] (shared/RIL.md). Every judge has one interface,
``Judge``: a ``name`` that identifies its verdicts (the cache key) and ``__call__(items) -> list[bool]``.
The kind is picked in one place, ``make_judge`` (``make_judge_from_config`` reads the trainer's
``judge*`` settings, or the same-named command-line options of ``ril_fast.eval`` / ``ril_fast.teacher``):

    rule   RuleJudge: normalised matching, no model                        (ril_fast.judges_rule)
    hf     HFJudge: a local causal LM, p("yes") vs p("no"), batched         (ril_fast.judges_hf)
    http   HTTPJudge: an OpenAI-compatible server such as vLLM, concurrent  (ril_fast.judges_http)

The two LLM judges ask the same question, ``judge_messages`` (a system turn and a user turn):

    system: You are a strict grader. You decide whether a response to a question gives the same
            final answer as the ground-truth answer. Wording, case, punctuation and extra
            explanation do not matter; a different, hedged or missing answer is wrong.
    user:   Question: {question}
            Ground-truth answer: {answer}
            Response: {response}

            Does the response give the same final answer as the ground-truth answer? Answer with one
            word: yes or no.

and decide alike: p_yes / (p_yes + p_no) > 0.5, where p_yes is the probability of the first answer
token being a "yes" token (any token that reads "yes" once stripped and lowercased: "Yes", " yes",
"YES", ...) and p_no likewise; the http judge sums over the top log-probs the server returns. A tie
is "wrong". ``PROMPT_VERSION``, a short hash of the prompt text, is part of their names, so a changed
prompt never reads verdicts cached under the old one.

Teacher responses never change, so their verdicts are computed once: ``CachedJudge`` wraps any judge
with a store keyed by a hash of (judge name, question, answer, response). The store is an in-memory
dict by default; ``judge_store(path)`` gives the persistent one, an SQLite file that several processes
(ranks, runs, ``ril_fast.teacher``) share (``ril_fast.judges_cache``).
"""

import enum
import hashlib
import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Protocol

from ril_fast.judges_rule import RuleJudge


@dataclass(frozen=True)
class JudgeItem:
    """One judgement: does ``response`` answer ``question`` consistently with ground truth ``answer``?"""

    question: str
    answer: str
    response: str


class Judge(Protocol):
    """A correctness judge. ``name`` identifies its verdicts: two judges with the same name must agree."""

    name: str

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item, in order."""
        ...


class JudgeKind(str, enum.Enum):
    """Which judge the trainer uses (its ``judge=`` setting)."""

    RULE = "rule"
    HF = "hf"
    HTTP = "http"


def make_judge(kind: JudgeKind | str, **options) -> Judge:
    """The judge of ``kind`` built with ``options``, the keyword arguments of its class: ``RuleJudge``,
    ``ril_fast.judges_hf.HFJudge`` (``model=DIR``, ...) or ``ril_fast.judges_http.HTTPJudge``
    (``url=``, ``model=``, ...). The model-backed kinds are imported only when asked for."""
    kind = JudgeKind(kind)
    if kind is JudgeKind.RULE:
        return RuleJudge(**options)
    if kind is JudgeKind.HF:
        from ril_fast.judges_hf import HFJudge

        return HFJudge(**options)
    from ril_fast.judges_http import HTTPJudge

    return HTTPJudge(**options)


def make_judge_from_config(cfg) -> Judge:
    """The judge a run's settings name: ``cfg.judge`` (rule | hf | http) with ``judge_model``,
    ``judge_url``, ``judge_batch_size``, ``judge_concurrency``, ``judge_timeout_s`` and
    ``judge_retries`` (a ``ril_fast.config.Config``, or the parsed options of ``add_judge_arguments``).
    Uncached: wrap it in ``CachedJudge(judge, store=judge_store(cfg.judge_cache))`` to cache it."""
    kind = JudgeKind(cfg.judge)
    if kind is JudgeKind.RULE:
        return make_judge(kind)
    if kind is JudgeKind.HF:
        return make_judge(kind, model=cfg.judge_model, batch_size=cfg.judge_batch_size)
    return make_judge(kind, url=cfg.judge_url, model=cfg.judge_model, concurrency=cfg.judge_concurrency,
                      timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries)


def judge_store(path: str) -> MutableMapping[str, bool] | None:
    """The persistent verdict store at ``path`` (an SQLite file, made if missing), or None for an
    empty path (``CachedJudge`` then keeps its verdicts in memory). A path that cannot be the store (a text file,
    a folder, a folder that cannot be made) is a ValueError saying why, for the caller to name its setting."""
    if not path:
        return None
    import sqlite3

    from ril_fast.judges_cache import SqliteStore

    try:
        return SqliteStore(path)
    except (sqlite3.DatabaseError, OSError) as e:  # OperationalError (a folder) is a DatabaseError
        raise ValueError(f"cannot use it as the verdict cache (an SQLite file): {e}") from None


def add_judge_arguments(parser, *, optional: bool = False) -> None:
    """Add ``--judge``, ``--judge-model``, ``--judge-url``, ``--judge-cache``, ``--judge-batch-size``,
    ``--judge-concurrency``, ``--judge-timeout-s`` and ``--judge-retries`` to an argparse parser, with
    the trainer's defaults and help (``ril_fast.config.Config``), for ``make_judge_from_config``.
    ``optional``: ``--judge`` also takes ``none``, its default (no judging)."""
    from dataclasses import fields

    from ril_fast.config import Config  # here, not at the top: config imports this module

    for f in fields(Config):
        if f.name == "judge":
            kinds = [k.value for k in JudgeKind] + (["none"] if optional else [])
            parser.add_argument("--judge", choices=kinds, default="none" if optional else f.default.value,
                                help=f.metadata["help"] + (" | none" if optional else ""))
        elif f.name.startswith("judge_"):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                                default=f.default, help=f.metadata["help"])


# ---- the LLM judges' question ---------------------------------------------------------------------

JUDGE_SYSTEM = ("You are a strict grader. You decide whether a response to a question gives the same final "
                "answer as the ground-truth answer. Wording, case, punctuation and extra explanation do not "
                "matter; a different, hedged or missing answer is wrong.")
JUDGE_USER = ("Question: {question}\nGround-truth answer: {answer}\nResponse: {response}\n\n"
              "Does the response give the same final answer as the ground-truth answer? "
              "Answer with one word: yes or no.")
# A hash of the prompt text, so an edited prompt is a new version without anyone bumping it by hand.
PROMPT_VERSION = hashlib.sha256(f"{JUDGE_SYSTEM}\0{JUDGE_USER}".encode()).hexdigest()[:8]


def judge_messages(item: JudgeItem) -> list[dict]:
    """The chat messages an LLM judge is given for ``item`` (the prompt in the module docstring)."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=item.question, answer=item.answer,
                                                          response=item.response)}]


def verdict_word(token: str) -> str | None:
    """The word "yes" or "no" when ``token`` reads so once stripped and lowercased ("Yes", " no"), else None."""
    word = token.strip().lower()
    return word if word in ("yes", "no") else None


def decide(p_yes: float, p_no: float) -> bool:
    """The LLM judges' binarisation: p_yes / (p_yes + p_no) > 0.5 (a tie, or neither, is wrong)."""
    return p_yes > p_no


# ---- caching -------------------------------------------------------------------------------------

def judge_key(name: str, item: JudgeItem) -> str:
    """The cache key of ``item`` under the judge called ``name``: sha256 of the four strings. A lone
    UTF-16 surrogate (a server's reply cut inside an emoji) is hashed as is rather than refused."""
    blob = json.dumps([name, item.question, item.answer, item.response], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class CachedJudge:
    """Wraps ``judge`` so each distinct (question, answer, response) is judged once.

    ``store`` maps ``judge_key`` -> verdict; by default an in-memory dict, or any
    ``MutableMapping[str, bool]`` backed by disk, such as ``judge_store(path)`` (shared by processes).
    Misses of one call go to the inner judge as a single batch, duplicates removed, and are written
    to the store with one ``update`` (one transaction on disk).
    ``misses`` counts the items the inner judge was given, ``hits`` every other item asked about (an
    item repeated within one call is a hit after its first time): hit rate = hits / (hits + misses).
    """

    def __init__(self, judge: Judge, store: MutableMapping[str, bool] | None = None):
        self.judge = judge
        self.name = judge.name
        self.store = {} if store is None else store
        self.hits = 0
        self.misses = 0

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item; only items never seen before reach the inner judge."""
        keys = [judge_key(self.name, item) for item in items]
        known, todo = {}, {}
        for k, item in zip(keys, items):
            if k in known or k in todo:
                continue
            verdict = self.store.get(k)  # one look-up (a query, on disk)
            if verdict is None:
                todo[k] = item
            else:
                known[k] = verdict
        if todo:
            fresh = {k: bool(v) for k, v in zip(todo, self.judge(list(todo.values())))}
            self.store.update(fresh)
            known.update(fresh)
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return [bool(known[k]) for k in keys]

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses) so far (0 before the first call)."""
        return self.hits / max(self.hits + self.misses, 1)
