"""Held-out evaluation of a model folder: greedy answers, judged; accuracy overall and per answer type.

    python -m ril_fast.eval --model DIR --data test.jsonl --judge rule|hf|http [--judge-model M]
        [--judge-url URL] [--max-new-tokens 16] [--batch-size 64] [--max-examples N] [--out runs/eval]
    torchrun --nproc_per_node=N -m ril_fast.eval ...        # each rank answers its share

The same code as the trainer's ``eval_data=`` evaluation (``ril_fast.evaluate.evaluate``): greedy
decoding, batched, the examples sharded over ranks, the model in bf16 on a GPU (the dtype the trainer's
mixed precision evaluates in) and fp32 on the CPU (``ril_fast.models.compute_dtype``), the judge given as
``--judge`` with the trainer's ``judge_*`` settings as ``--judge-*`` options (``--help`` lists them). Prints the
accuracy overall and per answer type, and writes

    OUT/examples.jsonl   one line per example: id, answer_type, question, answer, response, truncated, correct
    OUT/summary.json     model, data, judge, examples, correct, accuracy, per_type {type: {examples, correct,
                         accuracy}} (``untyped``: examples without a type), truncated (answers cut short at
                         --max-new-tokens), max_new_tokens, resumed (examples answered by an earlier attempt),
                         seconds (of this attempt)

Nothing is lost on a crash: every answer is kept in ``OUT/partial/`` as soon as it is generated, and its verdict as
soon as it is judged; the same command run again after a kill, a Ctrl-C or a judge that failed for good judges the
answers it kept without one and answers only the rest (``ril_fast.eval_journal``). Both files are written whole or
not at all, and then the journal is removed. A second evaluation into the same ``--out`` stops, naming the first's
process.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

from ril_fast.files import model_folder_problem


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (module docstring)."""
    from ril_fast.judge import add_judge_arguments

    p = argparse.ArgumentParser(prog="python -m ril_fast.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the model folder to evaluate (HF format)")
    p.add_argument("--data", required=True, help="evaluation JSONL (ril_fast.data)")
    p.add_argument("--out", default="runs/eval", help="folder for examples.jsonl and summary.json")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of each answer")
    p.add_argument("--batch-size", type=int, default=64, help="questions answered per generate call")
    p.add_argument("--max-examples", type=int, default=0, help="evaluate the first this many examples (0: all)")
    add_judge_arguments(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.max_examples < 0:
        p.error("--max-new-tokens and --batch-size must be >= 1, --max-examples >= 0")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out}: exists and is not a folder")
    try:  # made now: a folder that cannot be made fails before any model loads, not after the evaluation
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot make the folder: {e.strerror or e}")
    check_model_folder(p, "--model", args.model)
    check_judge_arguments(p, args)
    return args


def check_model_folder(parser: argparse.ArgumentParser, flag: str, folder: str) -> None:
    """A usage error naming ``flag`` unless ``folder`` is a folder holding ``config.json``: found before any
    model loads, and said in words (transformers would take a missing folder for a malformed hub id)."""
    if problem := model_folder_problem(folder):
        parser.error(f"{flag} {folder}: {problem}")


def check_judge_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors for ``add_judge_arguments``' options that no judge can be built from: the trainer's checks
    of its ``judge_*`` settings (``ril_fast.config.judge_checks``) in the options' words, a ``--judge-cache``
    that cannot be opened as the verdict cache (:func:`check_judge_cache`), an hf judge's model folder and an
    http judge's server; before any model loads. Nothing is checked for ``--judge none``."""
    from ril_fast.config import judge_checks
    from ril_fast.judges_hf import judge_model_problem
    from ril_fast.judges_http import OpenAIClient

    if args.judge == "none":
        return
    for ok, message in judge_checks(args):
        if not ok:
            parser.error(re.sub(r"\bjudge_(\w+)", lambda m: "--judge-" + m.group(1).replace("_", "-"),
                                re.sub(r"\bjudge=(\w+)", r"--judge \1", message)))
    check_judge_cache(parser, args.judge_cache)
    if args.judge == "hf" and (problem := judge_model_problem(args.judge_model)):
        parser.error(f"--judge-model {args.judge_model}: {problem}")
    if args.judge == "http" and (problem := OpenAIClient(args.judge_url, timeout_s=args.judge_timeout_s,
                                                         retries=args.judge_retries).serving(args.judge_model)):
        parser.error(f"--judge-url {args.judge_url}: the judge server cannot be used: {problem}")


def check_judge_cache(parser: argparse.ArgumentParser, path: str) -> None:
    """A usage error naming ``--judge-cache`` unless ``path`` (empty: no cache) opens as the verdict cache, an
    SQLite file (made, with its folder, if missing: ``ril_fast.judge.judge_store``): a text file, a folder or a
    folder that cannot be made is one line before any model loads, in the words of the trainer's check of
    ``judge_cache`` (``ril_fast.preflight``), not SQLite's traceback after the model loaded."""
    from ril_fast.judge import judge_store

    try:
        store = judge_store(path)
    except ValueError as e:
        parser.error(f"--judge-cache {path}: {e}")
    if store is not None:
        store.close()  # main opens it again for the judge


def summarise(records: list[dict]) -> dict:
    """Counts and accuracy overall and per answer type (``untyped``: the examples without one), and how many
    answers were cut short by the token budget (``truncated``)."""
    from ril_fast.evaluate import UNTYPED

    per_type: dict[str, dict] = {}
    for r in records:
        t = per_type.setdefault(r["answer_type"] or UNTYPED, {"examples": 0, "correct": 0})
        t["examples"] += 1
        t["correct"] += int(r["correct"])
    for t in per_type.values():
        t["accuracy"] = t["correct"] / t["examples"]
    correct = sum(int(r["correct"]) for r in records)
    return {"examples": len(records), "correct": correct, "accuracy": correct / max(len(records), 1),
            "per_type": dict(sorted(per_type.items())), "truncated": sum(int(r["truncated"]) for r in records)}


def read_examples(args: argparse.Namespace) -> list:
    """The examples of ``--data`` (the first ``--max-examples``), checked before the model loads against its
    tokenizer and image processor (:func:`check_prompts`; leaving an example out would change the accuracy's
    denominator)."""
    from ril_fast.data import load_examples
    from ril_fast.processor import Processor

    tokens = Processor.from_pretrained(args.model)
    examples = load_examples(args.data, control_tokens=tokens.control_tokens)
    if args.max_examples:
        examples = examples[:args.max_examples]
    check_prompts(tokens, args.model, examples, max_new_tokens=args.max_new_tokens, who="the model")
    return examples


def check_prompts(tokens, folder: str, examples: list, *, max_new_tokens: int, who: str) -> None:
    """A DataError naming the line of the first example that the model in ``folder`` (``who``: "the model",
    "the teacher") cannot answer, before it loads: images for a text-only model, an image its image processor
    refuses, or a prompt that leaves no room for ``max_new_tokens`` within its limit (its context, sliding window or
    LongRoPE original context: ``ril_fast.preflight.length_limit``). ``tokens``: its
    ``Processor``."""
    from transformers import AutoConfig

    from ril_fast.data import LongPrompts, fitting, refuse_images
    from ril_fast.preflight import length_limit
    from ril_fast.processor import ModelKind

    if tokens.kind is ModelKind.TEXT:
        refuse_images(examples, f"{who} ({folder})")
    limit, setting = length_limit(AutoConfig.from_pretrained(folder))
    fitting(examples, tokens.prompt_lengths, budget=limit or float("inf"), max_new_tokens=max_new_tokens,
            setting=setting, long_prompts=LongPrompts.REFUSE)


def main(argv: list[str] | None = None) -> dict:
    """Run the evaluation (module docstring); returns the summary (on every rank)."""
    from ril_fast import distributed
    from ril_fast.eval_journal import FOLDER, Journal, resume, run_key
    from ril_fast.evaluate import evaluate
    from ril_fast.judge import CachedJudge, judge_store, make_judge_from_config

    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    dist = distributed.init()
    out = Path(args.out)
    examples = distributed.on_rank0(lambda: _start(args))
    judge = CachedJudge(make_judge_from_config(args), store=judge_store(args.judge_cache))
    key = run_key(args.model, max_new_tokens=args.max_new_tokens, judge=judge.name)
    resumed = distributed.on_rank0(lambda: resume(out, key, examples))
    if dist.is_main and resumed.set_aside:
        print(resumed.set_aside, file=sys.stderr)
    if dist.is_main and (resumed.done or resumed.pending):
        print(f"going on from {out / FOLDER}: {len(resumed.done)} examples answered and judged, "
              f"{len(resumed.pending)} answered and not yet judged", file=sys.stderr)
    journal = Journal(out, resumed.attempt, dist.rank, {e.id: e.question_sha for e in examples})
    metrics = None
    try:
        mine = _judge_pending(list(resumed.pending.values())[dist.rank::dist.world_size], judge, journal)
        todo = [e for e in examples if e.id not in resumed.done and e.id not in resumed.pending]
        if todo:  # the same on every rank: all load the model, or none
            from ril_fast.models import compute_dtype, load

            model, processor = load(args.model, dtype=compute_dtype(dist.device), device=dist.device, logprobs=False)
            metrics = evaluate(model, processor, todo, judge, dist, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, records=mine, progress=sys.stderr.isatty(), journal=journal)
    except BaseException:
        if journal.path.exists() or resumed.done or resumed.pending:
            print(f"the answers so far are kept in {out / FOLDER}: the same command goes on from them",
                  file=sys.stderr)
        raise
    finally:
        journal.close()
    gathered = distributed.all_gather_objects(mine)
    order = {e.id: i for i, e in enumerate(examples)}
    records = sorted([*resumed.done.values(), *(r for rank in gathered for r in rank)], key=lambda r: order[r["id"]])
    assert [r["id"] for r in records] == [e.id for e in examples]  # each example once: answered now or before
    if metrics is not None:  # evaluate()'s own reduction over ranks and the gathered records tell the same story
        answered = summarise([r for r in records if r["id"] not in resumed.done and r["id"] not in resumed.pending])
        assert metrics["eval_examples"] == answered["examples"] == len(todo)
        assert abs(metrics["eval_accuracy"] - answered["accuracy"]) < 1e-9
    summary = {"model": str(args.model), "data": str(args.data), "judge": judge.name, **summarise(records),
               "max_new_tokens": args.max_new_tokens, "resumed": len(resumed.done) + len(resumed.pending),
               "seconds": round(time.perf_counter() - start, 3)}
    if dist.is_main:
        _write(out, records, summary, args.max_new_tokens)
    return summary


def _start(args: argparse.Namespace) -> list:
    """Rank 0, before any model loads: hold ``--out`` for this process (two evaluations into one folder would mix
    their journals) and read the examples (:func:`read_examples`)."""
    from ril_fast.files import lock_folder

    lock_folder(args.out)
    return read_examples(args)


def _judge_pending(rows: list[dict], judge, journal) -> list[dict]:
    """Verdicts on answers an earlier attempt kept without them, journaled; the rows with ``correct``."""
    from ril_fast.evaluate import judged

    if not rows:
        return []
    rows = judged(rows, judge)
    journal(rows)
    return rows


def _write(out: Path, records: list[dict], summary: dict, max_new_tokens: int) -> None:
    """Write ``examples.jsonl`` and ``summary.json`` (each whole or not at all), print the figures, and remove the
    journal, which the results now hold."""
    from ril_fast.eval_journal import finish
    from ril_fast.files import write_text_atomic

    write_text_atomic(out / "examples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    finish(out)
    print(f"accuracy {summary['accuracy']:.4f} ({summary['correct']}/{summary['examples']}), judge {summary['judge']}")
    for name, t in summary["per_type"].items():
        print(f"  {name:<12} {t['accuracy']:.4f} ({t['correct']}/{t['examples']})")
    if summary["truncated"]:
        print(f"{summary['truncated']} of {summary['examples']} answers were cut short at --max-new-tokens "
              f"{max_new_tokens}: raise it if the model's answers are longer")
    print(f"wrote {out / 'examples.jsonl'} and {out / 'summary.json'}")


if __name__ == "__main__":
    from ril_fast import distributed
    from ril_fast.data import DataError
    from ril_fast.files import InUse
    from ril_fast.judges_http import HTTPError
    from ril_fast.processor import UnsupportedModel

    try:
        main()
    except (DataError, UnsupportedModel, HTTPError, InUse) as e:  # names the file and line, the model type, the
        # judge's URL, or the process that evaluates into --out
        distributed.destroy()  # as below, on this way out too
        raise SystemExit(f"error: {e}") from None
    # Leave the process group before the interpreter tears down, as the trainer does: a gloo group destroyed during
    # finalization aborted a finished rank ("terminate called without an active exception": 2 of 9 two-rank runs).
    distributed.destroy()
