"""Judge throughput on the same cases: rule, hf (batched) and http (concurrent, against vLLM), and the
request rate vLLM itself reaches under a plain concurrent load of the same requests.

    .venv/bin/python bench/judges.py --hf-model DIR --vllm-python /work/vllm-venv/bin/python
    .venv/bin/python bench/judges.py --hf-model DIR --vllm-url http://127.0.0.1:8000/v1   # a running server
    python -m ril_fast.tiny DIR --arch smollm2            # DIR: SmolLM2-135M-Instruct, for both judges

The cases: ``--cases`` (1,000) easy-VQA test questions (seeded), each with a response in one of the
demo's two teacher styles ("Triangle." / "The shape in the image is a triangle.") giving either the
right answer or another answer of the same type (half each). On these templated responses the rule
judge is exact, so its verdicts are the labels the LLM judges' agreement is measured against.

The plain load sends exactly the http judge's request bodies from ``--concurrency`` threads (urllib,
the reply read and dropped, no retries, no parsing): the rate the server sustains for these requests.
It runs before and after the http judge (vLLM's prefix cache and the machine's other load shift
between runs); the judge's rate is compared with their mean. One row per measurement is appended to
``--out`` (CSV) with the device, date, git SHA, the torch / transformers / math-verify versions and the
judge's own name (its code and prompt versions).
"""

import argparse
import datetime
import json
import os
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py
sys.path.insert(0, str(ROOT / "tests"))  # tests/vllm_server.py
from _common import append_csv, device_name, git_sha, markdown_table, sig, versions  # noqa: E402

from ril_fast.demo import COLORS, SHAPES, concise, verbose  # noqa: E402
from ril_fast.judge import JudgeItem, RuleJudge, make_judge  # noqa: E402

# judge_name: the judge's own name (its code and prompt versions: the judge cache's key), math_verify: the
# package the rule judge calls.
COLUMNS = ["date", "git_sha", "device", "torch", "transformers", "math_verify", "judge", "judge_name", "concurrency",
           "batch_size", "cases", "seconds", "per_second", "agreement_with_rule", "note"]


def cases(n: int, seed: int = 0) -> list[JudgeItem]:
    """``n`` easy-VQA test questions with a templated response, right or wrong (half each, seeded)."""
    import easy_vqa

    texts, answers, _ = easy_vqa.get_test_questions()
    rng = random.Random(seed)
    items = []
    for i in rng.sample(range(len(texts)), n):
        answer = answers[i]
        pool = ("yes", "no") if answer in ("yes", "no") else SHAPES if answer in SHAPES else COLORS
        said = answer if rng.random() < 0.5 else rng.choice([a for a in pool if a != answer])
        style = rng.choice((concise, verbose))
        items.append(JudgeItem(texts[i][0].upper() + texts[i][1:], answer, style(said)))
    return items


def plain_load(url: str, bodies: list[dict], concurrency: int) -> float:
    """Seconds to POST every body to ``{url}/chat/completions`` from ``concurrency`` threads."""
    def post(body: dict) -> None:
        req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as reply:
            reply.read()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies))
    return time.perf_counter() - start


def timed(judge, items: list[JudgeItem]) -> tuple[float, list[bool]]:
    """Seconds for one call of ``judge`` on all ``items``, and its verdicts."""
    start = time.perf_counter()
    verdicts = judge(items)
    return time.perf_counter() - start, verdicts


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the measurements (module docstring); returns the rows written."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--hf-model", default="", help="SmolLM2 folder for the hf judge and the server ('' skips hf)")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--vllm-url", default="", help="a running server's /v1 URL serving --served-model")
    p.add_argument("--vllm-python", default="", help="or: start vLLM with this python on --hf-model")
    p.add_argument("--served-model", default="smollm2")
    p.add_argument("--concurrency", default="16", help="comma-separated request concurrencies to measure")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "judges.csv"))
    args = p.parse_args(argv)

    items = cases(args.cases)
    labels = RuleJudge()(items)
    common = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_sha": git_sha(),
              "device": device_name(), **versions("torch", "transformers", "math-verify"), "cases": len(items),
              "note": f"load average at start {os.getloadavg()[0]:.2f}"}
    rows = []

    def row(judge: str, seconds: float, verdicts=None, judge_name: str = "", **extra) -> None:
        agree = None if verdicts is None else sig(sum(v == y for v, y in zip(verdicts, labels)) / len(items))
        rows.append({**common, "judge": judge, "judge_name": judge_name, "seconds": sig(seconds),
                     "per_second": sig(len(items) / seconds), "agreement_with_rule": agree, **extra})
        print(rows[-1], flush=True)

    rule = RuleJudge()
    seconds, verdicts = timed(rule, items)
    row("rule", seconds, verdicts, rule.name)
    if args.hf_model:
        hf = make_judge("hf", model=args.hf_model, batch_size=args.hf_batch_size)
        seconds, verdicts = timed(hf, items)
        row("hf", seconds, verdicts, hf.name, batch_size=args.hf_batch_size)
        del hf
    if args.vllm_url or args.vllm_python:
        from vllm_server import VLLMServer

        server = None
        if not args.vllm_url:
            server = VLLMServer(args.vllm_python, args.hf_model, args.served_model, log="/tmp/ril_fast_vllm.log")
            server.__enter__()
        url = args.vllm_url or server.url
        try:
            for c in [int(x) for x in args.concurrency.split(",")]:
                judge = make_judge("http", url=url, model=args.served_model, concurrency=c)
                bodies = [judge.body(item) for item in items]
                plain_load(url, bodies[:2 * c], c)  # warm-up: the shared prompt prefix, the server's threads
                before = plain_load(url, bodies, c)
                row("plain load (vLLM)", before, concurrency=c)
                seconds, verdicts = timed(judge, items)
                row("http", seconds, verdicts, judge.name, concurrency=c)
                after = plain_load(url, bodies, c)
                row("plain load (vLLM)", after, concurrency=c)
                plain_rate = len(items) / ((before + after) / 2)
                print(f"concurrency {c}: http judge {len(items) / seconds:.2f}/s = "
                      f"{100 * len(items) / seconds / plain_rate:.1f}% of the plain load's {plain_rate:.2f}/s",
                      flush=True)
        finally:
            if server is not None:
                server.__exit__()
    append_csv(args.out, rows, COLUMNS)
    print(markdown_table(rows, [(c, c) for c in ("judge", "concurrency", "batch_size", "seconds", "per_second",
                                                 "agreement_with_rule")]))
    return rows


if __name__ == "__main__":
    main()
