"""python -m ril_fast.teacher: a local HF model and an OpenAI-compatible server (tests/fake_openai.py) as
teachers; the output loads as a teacher collection; a run killed with SIGKILL resumes with no duplicate
and no lost line. Against a real vLLM server: tests/test_vllm.py (opt-in)."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_openai import FakeOpenAI
from models_fixtures import one_thread, tiny_folder  # noqa: F401
from transformers import AutoConfig

from ril_fast.data import DataError, load_examples, load_teachers
from ril_fast.demo import build_demo
from ril_fast.judge import RuleJudge
from ril_fast.judges_http import HTTPError
from ril_fast.teacher import main
from ril_fast.teacher_resume import set_aside_stale, stale_file, written_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("teacher") / "demo", max_train=40, max_test=4)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stats(**counts) -> dict:
    """What ``main`` returns: ``counts``, and 0 (``unfinished``: none) for the rest."""
    return {"written": 0, "truncated": 0, "empty": 0, "control_tokens": 0, "unfinished": {}, "refused": 0,
            "skipped": 0, "stale": 0, "total": 0, **counts}


def test_local_model_teacher_with_judging(demo, tmp_path, capsys, _fresh_seed):
    data = demo.root / "train6.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(demo.train.read_text().splitlines(keepends=True)[:6]))
    out = tmp_path / "teachers" / "tiny.jsonl"
    argv = ["--model", str(demo.student), "--data", str(data), "--out", str(out), "--num-responses", "2",
            "--max-new-tokens", "4", "--batch-size", "5", "--judge", "rule", "--no-progress",
            "--seed", str(_fresh_seed)]  # RIL_TEST_SEED replays the draws
    stats = main(argv)
    lines = _lines(out)
    # a random student may sample nothing or one of its control tokens: those are counted, not written
    assert stats["written"] + stats["empty"] + stats["control_tokens"] == 12 and len(lines) == stats["written"]
    examples = load_examples(data)
    truncated = [f"{out}:{n}" for n, line in enumerate(lines, start=1) if line["truncated"]]
    # said at the end of the run that wrote them, not only at the next one's start
    assert stats["truncated"] == len(truncated) > 0  # a random student seldom ends within 4 tokens
    assert (f"{len(truncated)} of the {len(lines)} responses written hit --max-new-tokens 4: marked truncated, which "
            f"the trainer leaves out; raise --max-new-tokens and run again with --redo-truncated"
            in capsys.readouterr().err)
    if len(truncated) < len(lines):  # the trainer reads the collection, leaving the truncated lines out
        bank = load_teachers([out], examples)
        assert bank.teachers == ["tiny"] and bank.counts() == {"tiny": len(lines) - len(truncated)}
        assert bank.truncated == truncated
    else:  # a random student seldom ends within 4 tokens
        with pytest.raises(DataError, match="every line is marked truncated"):
            load_teachers([out], examples)
    answers = {e.id: e.answer for e in examples}
    rule = RuleJudge()
    for line in lines:
        assert line["index"] in (0, 1) and isinstance(line["truncated"], bool)
        assert line["judge"] == rule.name and line["correct"] == rule.check(answers[line["id"]], line["response"])
    assert len({(line["id"], line["index"]) for line in lines}) == len(lines)
    before = out.read_bytes()
    again = main(argv)  # what is there is kept; only what was not written is asked for again
    assert again["skipped"] == len(lines) and again["total"] == 12
    after = out.read_bytes()
    assert after.startswith(before) and len(_lines(out)) == len(lines) + again["written"]
    if len(lines) == 12:
        assert after == before


def test_server_teacher_sends_images_as_data_urls(demo, tmp_path):
    examples = load_examples(demo.train)[:3]
    out = tmp_path / "srv.jsonl"
    with FakeOpenAI() as server:
        stats = main(["--model", server.url, "--data", str(demo.train), "--out", str(out), "--num-responses", "2",
                      "--max-new-tokens", "7", "--temperature", "0.5", "--concurrency", "3", "--no-progress",
                      "--teacher", "big-vlm"])
    assert stats == _stats(written=80, total=80)
    bodies = [body for path, body, _ in server.requests if path == "/v1/chat/completions"]
    assert [p for p, _, _ in server.requests if p != "/v1/chat/completions"] == ["/v1/models"]
    by_question = {}
    for body in bodies:
        assert body["model"] == "fake-model" and body["max_tokens"] == 7 and body["temperature"] == 0.5
        (message,) = body["messages"]
        image, text = message["content"]
        by_question.setdefault(text["text"], []).append(image["image_url"]["url"])
    for e in examples:
        urls = by_question[e.question]
        expected = "data:image/png;base64," + base64.b64encode(e.images[0].read_bytes()).decode()
        assert expected in urls
    lines = _lines(out)
    bank = load_teachers([out], load_examples(demo.train))
    assert bank.teachers == ["big-vlm"] and bank.counts() == {"big-vlm": 80}
    assert all(line["response"].endswith("having seen 1 image(s).") for line in lines)


def test_server_teacher_sends_top_p_and_the_served_model_and_judges_only_when_asked(demo, tmp_path):
    """--top-p and --served-model reach every request (the server is not asked for its models then), a base URL with
    a trailing slash still posts to .../v1/chat/completions, and without --judge the lines carry no verdict."""
    data, out = _first(demo, 2), tmp_path / "p.jsonl"
    with FakeOpenAI() as server:  # it answers any model name
        assert main(["--model", server.url + "/", "--data", str(data), "--out", str(out), "--num-responses", "2",
                     "--top-p", "0.9", "--served-model", "other", "--no-progress"]) == _stats(written=4, total=4)
    assert [path for path, _, _ in server.requests] == ["/v1/chat/completions"] * 2
    assert all(body["top_p"] == 0.9 and body["model"] == "other" for _, body, _ in server.requests)
    assert all(line.keys().isdisjoint({"correct", "judge"}) for line in _lines(out))


def _first(demo, n: int) -> Path:
    """The demo's first ``n`` training examples, beside the images their paths are relative to."""
    data = demo.root / f"train{n}.jsonl"
    data.write_text("".join(demo.train.read_text().splitlines(keepends=True)[:n]))
    return data


def _asked(server, examples) -> dict[str, list[int]]:
    """Example id -> the ``n`` of each chat request the server saw for it (1 when absent), sorted. A request
    is matched to its example by its (image data URL, question), and must carry the image once."""
    key_of = {("data:image/png;base64," + base64.b64encode(e.images[0].read_bytes()).decode(), e.question): e.id
              for e in examples}
    assert len(key_of) == len(examples)  # each example is told apart
    asked = {}
    for path, body, _ in server.requests:
        if path == "/v1/chat/completions":
            (message,) = body["messages"]
            image, text = message["content"]
            asked.setdefault(key_of[image["image_url"]["url"], text["text"]], []).append(body.get("n", 1))
    return {i: sorted(ns) for i, ns in asked.items()}


def test_server_teacher_asks_for_an_examples_responses_in_one_request(demo, tmp_path):
    """K responses in one request with n = K: the example's image is uploaded once, not K times. The
    choices go to the indices in order of the choices' index, not of their place in the reply."""
    examples = load_examples(demo.train)
    out = tmp_path / "n.jsonl"
    with FakeOpenAI() as server:
        reply = server.teacher_reply
        server.teacher_reply = lambda body, text: {"choices": reply(body, text)["choices"][::-1]}
        stats = main(["--model", server.url, "--data", str(demo.train), "--out", str(out), "--num-responses", "4",
                      "--n-per-request", "8", "--concurrency", "3", "--no-progress"])
    assert stats == _stats(written=160, total=160)
    assert _asked(server, examples) == {e.id: [4] for e in examples}
    by_id = {}
    for line in _lines(out):
        by_id.setdefault(line["id"], []).append(line)
    for e in examples:
        lines = sorted(by_id[e.id], key=lambda line: line["index"])
        assert [line["index"] for line in lines] == [0, 1, 2, 3]
        assert len({line["response"] for line in lines}) == 4
        assert all(f"(choice {line['index']})" in line["response"] for line in lines)
    assert load_teachers([out], examples).counts() == {"n": 160}


def test_server_teacher_resumed_asks_only_for_the_missing_indices(demo, tmp_path):
    data = _first(demo, 3)
    examples = load_examples(data)
    e0, e1, e2 = (e.id for e in examples)
    out = tmp_path / "resumed.jsonl"
    kept = [(e0, 0), (e0, 2)] + [(e1, k) for k in range(4)]  # e2: none yet
    out.write_text("".join(json.dumps({"id": i, "index": k, "teacher": "resumed", "response": "earlier",
                                       "truncated": False}) + "\n" for i, k in kept))
    with FakeOpenAI() as server:
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "4",
                      "--no-progress"])
    assert stats == _stats(written=6, skipped=6, total=12)
    assert _asked(server, examples) == {e0: [2], e2: [4]}
    new = {(line["id"], line["index"]): line["response"] for line in _lines(out)[len(kept):]}
    assert set(new) == {(e0, 1), (e0, 3)} | {(e2, k) for k in range(4)}
    assert "(choice 0)" in new[e0, 1] and "(choice 1)" in new[e0, 3]  # in order of the choices' index
    assert written_pairs(out) == {(e.id, k) for e in examples for k in range(4)}


def test_server_that_ignores_n_still_yields_every_response(demo, tmp_path, capsys):
    data = _first(demo, 3)
    examples = load_examples(data)
    out = tmp_path / "ignores.jsonl"
    with FakeOpenAI(ignore_n=True) as server:
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "4",
                      "--concurrency", "3", "--no-progress"])
    assert stats == _stats(written=12, total=12)
    pairs = [(line["id"], line["index"]) for line in _lines(out)]
    assert sorted(pairs) == sorted((e.id, k) for e in examples for k in range(4))
    # One choice a reply: asked for 4, then for the 3, 2 and 1 still missing.
    assert _asked(server, examples) == {e.id: [1, 2, 3, 4] for e in examples}
    err = capsys.readouterr().err
    assert err.count("--n-per-request 1") == 1, err
    assert f"{server.url}: asked for n=4 choices, got 1: the server seems to ignore \"n\"" in err


@pytest.mark.parametrize("args, asked", [
    (["--n-per-request", "1"], [1, 1, 1, 1]),  # the old way: one request per response, no "n" sent
    (["--n-per-request", "3"], [1, 3]),
    (["--temperature", "0"], [1, 1, 1, 1]),  # vLLM refuses n > 1 with greedy sampling
])
def test_server_requests_per_example(demo, tmp_path, args, asked):
    data = _first(demo, 3)
    examples = load_examples(data)
    out = tmp_path / "per.jsonl"
    with FakeOpenAI() as server:
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "4",
                      "--no-progress", *args])
    assert stats == _stats(written=12, total=12)
    assert _asked(server, examples) == {e.id: asked for e in examples}
    assert written_pairs(out) == {(e.id, k) for e in examples for k in range(4)}


def test_server_reply_with_more_choices_than_asked_or_none(demo, tmp_path):
    """More choices than asked: the first n by index are used. No choice at all: a malformed reply."""
    data = _first(demo, 3)
    out = tmp_path / "more.jsonl"
    with FakeOpenAI() as server:
        reply = server.teacher_reply
        server.teacher_reply = lambda body, text: reply({**body, "n": body.get("n", 1) + 2}, text)
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2",
                      "--no-progress"])
        assert stats["written"] == 6 and len(server.requests) == 1 + 3  # /models, then one request per example
        assert all(f"(choice {line['index']})" in line["response"] for line in _lines(out))
        server.teacher_reply = lambda body, text: {"choices": []}
        with pytest.raises(HTTPError, match=r"malformed reply \(IndexError: no choices\)"):
            main(["--model", server.url, "--data", str(data), "--out", str(tmp_path / "none.jsonl"),
                  "--num-responses", "2", "--no-progress"])


def test_server_reply_cut_inside_an_emoji_is_written_and_judged(demo, tmp_path):
    """A server that cuts a reply in the middle of an emoji sends half its UTF-16 surrogate pair, which
    json.loads keeps: it must be written (as U+FFFD) and judged, not crash the batch on every rerun."""
    data = demo.root / "train3.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(demo.train.read_text().splitlines(keepends=True)[:3]))
    out = tmp_path / "cut.jsonl"
    with FakeOpenAI() as server:
        server.teacher_reply = lambda body, text: {  # the JSON on the wire holds "\ud83d"
            "choices": [{"message": {"content": "It is blue \ud83d"}, "finish_reason": "stop"}]}
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2",
                      "--judge", "rule", "--no-progress"])
    assert stats == _stats(written=6, total=6)
    examples = load_examples(data)
    answers = {e.id: e.answer for e in examples}
    lines = _lines(out)
    assert [line["response"] for line in lines] == ["It is blue \ufffd"] * 6
    assert [line["correct"] for line in lines] == [answers[line["id"]] == "blue" for line in lines]
    assert {line["correct"] for line in lines} == {True, False}  # the demo's first answers: rectangle, blue
    assert load_teachers([out], examples).counts() == {"cut": 6}


def test_server_reply_unfinished_is_not_written_and_asked_for_again(demo, tmp_path, capsys):
    """finish_reason "stop", none, or TGI's / llama.cpp's spellings: a whole answer; "length": truncated; any other
    (vLLM's "abort", "content_filter", ...): not an answer, so not written, counted by reason, said at the end,
    and asked for again by the next run."""
    data = _first(demo, 3)
    examples = load_examples(data)
    out = tmp_path / "fin.jsonl"
    reasons = [None, "stop", "eos_token", "stop_sequence", "eos", "length", "abort", "content_filter"]
    with FakeOpenAI() as server:
        reply = server.teacher_reply

        def with_reasons(body, text):  # choice i ends with reasons[i]; None: no finish_reason at all
            choices = reply(body, text)["choices"]
            for choice in choices:
                choice.pop("finish_reason")
                if reasons[choice["index"]] is not None:
                    choice["finish_reason"] = reasons[choice["index"]]
            return {"choices": choices}

        server.teacher_reply = with_reasons
        argv = ["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "8", "--no-progress"]
        stats = main(argv)
        assert stats == _stats(written=18, truncated=3, unfinished={"abort": 3, "content_filter": 3}, total=24)
        assert ("6 responses were not written (0 empty, 0 holding a control token of the teacher's, which "
                "ril_fast.data.load_teachers refuses, 6 unfinished: the server ended them with finish_reason 'abort' "
                "(3), 'content_filter' (3)); run the command again to ask for them") in capsys.readouterr().err
        lines = _lines(out)
        assert sorted((line["id"], line["index"]) for line in lines) == [(e.id, k) for e in examples for k in range(6)]
        assert all(line["truncated"] == (line["index"] == 5) for line in lines)
        server.requests.clear()
        reasons[6:] = ["stop", "stop"]
        assert main(argv) == _stats(written=6, skipped=18, total=24)
    assert _asked(server, examples) == {e.id: [2] for e in examples}  # only the two unfinished indices
    assert {(line["id"], line["index"]) for line in _lines(out)[18:]} == {(e.id, k) for e in examples for k in (6, 7)}
    assert "(choice 0)" in _lines(out)[18]["response"]


def _with_fault(demo, n: int, line: int, fault: str) -> Path:
    """The demo's first ``n`` training examples, the question on ``line`` (1-based) carrying ``fault``."""
    rows = [json.loads(row) for row in demo.train.read_text().splitlines()[:n]]
    rows[line - 1]["question"] += f" {fault}"
    data = demo.root / f"fault{n}.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data


def test_an_example_the_server_refuses_is_left_out_and_the_run_goes_on(demo, tmp_path, capsys):
    """One example's HTTP 400 (vLLM's prompt + max_tokens beyond --max-model-len, an image it cannot use) would end
    every run at that example: the example is counted as refused, its responses not written, the rest collected,
    and the end names the first refused example's file:line, id and the server's message."""
    data = _with_fault(demo, 6, 4, "FAULT:400")
    examples = load_examples(data)
    out = tmp_path / "refused.jsonl"
    with FakeOpenAI() as server:
        argv = ["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2",
                "--batch-size", "2", "--concurrency", "2", "--no-progress"]
        assert main(argv) == _stats(written=10, refused=1, total=12)
        err = capsys.readouterr().err
        assert (f"1 examples were refused by the server (an HTTP 4xx for their request: e.g. a prompt plus "
                f"--max-new-tokens beyond its --max-model-len, or an image it cannot use), their responses not "
                f"written; the first, {data}:4 (id {examples[3].id!r}): POST {server.url}/chat/completions: HTTP 400 "
                f"(not retried): '{{\"error\": {{\"message\": \"injected: this model does not exist\"}}}}'. ") in err
        assert {line["id"] for line in _lines(out)} == {e.id for i, e in enumerate(examples) if i != 3}
        assert main(argv) == _stats(refused=1, skipped=10, total=12)  # asked for again, refused again
    assert len(_lines(out)) == 10


def test_a_rerun_whose_only_pending_examples_are_refused_goes_on(demo, tmp_path, capsys):
    """Lines 2 and 5 refused: the end names the first in the data's order; the rerun asks only for those two, refused
    again, which is not the whole first batch of a fresh start (the server does take requests) and ends no command."""
    rows = [json.loads(row) for row in demo.train.read_text().splitlines()[:6]]
    for i in (1, 4):
        rows[i]["question"] += " FAULT:400"
    data = demo.root / "fault2of6.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "r.jsonl"
    with FakeOpenAI() as server:
        argv = ["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2", "--no-progress"]
        assert main(argv) == _stats(written=8, refused=2, total=12)
        assert "2 examples were refused by the server" in (err := capsys.readouterr().err)
        assert f"the first, {data}:2 (id {rows[1]['id']!r}): " in err
        assert main(argv) == _stats(refused=2, skipped=8, total=12)
        assert f"the first, {data}:2 (id {rows[1]['id']!r}): " in capsys.readouterr().err


@pytest.mark.parametrize("status, refused", [(400, True), (413, True), (422, True), (401, False), (403, False),
                                             (404, False)])
def test_which_http_4xx_refuses_one_example_and_which_ends_the_command(demo, tmp_path, monkeypatch, status, refused):
    """401 / 403 / 404: the key, the URL or the model is wrong for every request: those end the command. Another
    4xx: that example's (408 and 429 never come here: the client retries them)."""
    from ril_fast.judges_http import OpenAIClient

    request = OpenAIClient.request

    def refusing(self, route, body=None):
        if body is not None and "REFUSE-ME" in json.dumps(body):
            raise HTTPError(f"POST {self.url}{route}: HTTP {status} (not retried): 'no'", status=status)
        return request(self, route, body)

    monkeypatch.setattr(OpenAIClient, "request", refusing)
    data = _with_fault(demo, 3, 2, "REFUSE-ME")
    e1 = load_examples(data)[1]
    out = tmp_path / "s.jsonl"
    with FakeOpenAI() as server:
        argv = ["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2", "--no-progress"]
        if refused:
            assert main(argv) == _stats(written=4, refused=1, total=6)
            return
        with pytest.raises(HTTPError, match=rf"^POST {server.url}/chat/completions: HTTP {status} "):
            main(argv)
    assert out.read_text() == ""  # the batch failed: nothing written


def test_a_server_refusing_the_whole_first_batch_ends_the_command(demo, tmp_path):
    """Every example of the first batch refused (a 400 for a parameter the server rejects, not for any example's
    prompt): one error, not a pass over the whole data refusing each example."""
    rows = [json.loads(row) for row in demo.train.read_text().splitlines()[:3]]
    data = demo.root / "all_refused.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(row | {"question": row["question"] + " FAULT:400"}) + "\n" for row in rows))
    with FakeOpenAI() as server:
        with pytest.raises(HTTPError, match=rf"^the server refused every example of the first batch \(3 responses\), "
                                            rf"e.g. {data}:1 \(id .*HTTP 400"):
            main(["--model", server.url, "--data", str(data), "--out", str(tmp_path / "f.jsonl"), "--no-progress"])
        # A first batch of one example (K = 4 responses, one a request, two requests in flight) refused: that
        # example's, not the requests'; the others are collected.
        data = _with_fault(demo, 3, 1, "FAULT:400")
        argv = ["--model", server.url, "--data", str(data), "--out", str(tmp_path / "g.jsonl"), "--no-progress",
                "--num-responses", "4", "--n-per-request", "1", "--concurrency", "2", "--batch-size", "4"]
        assert main(argv) == _stats(written=8, refused=1, total=12)


def test_server_failing_after_its_retries_names_the_example(demo, tmp_path):
    """A timeout or an HTTP 5xx after the retries still ends the command, naming the example's file:line and id."""
    data = _with_fault(demo, 3, 3, "FAULT:500")
    e2 = load_examples(data)[2]
    with FakeOpenAI() as server:
        with pytest.raises(HTTPError, match=rf"^{data}:3: example {e2.id!r}: POST {server.url}/chat/completions: "
                                            rf"failed 1 times .* last failure: HTTP 500"):
            main(["--model", server.url, "--data", str(data), "--out", str(tmp_path / "f.jsonl"), "--retries", "0",
                  "--no-progress"])


def test_each_example_s_images_are_encoded_once_for_all_its_requests(demo, tmp_path, monkeypatch):
    """K = 4 responses one a request (--n-per-request 1), all in flight together: the example's images are read
    (and a turned photo encoded again: seconds for 12 megapixels) once, not once a request."""
    import ril_fast.teacher as teacher

    encoded, data_url = [], teacher.data_url
    monkeypatch.setattr(teacher, "data_url", lambda path: encoded.append(path) or data_url(path))
    data = _with_fault(demo, 3, 1, "")
    examples = load_examples(data)
    with FakeOpenAI() as server:
        assert main(["--model", server.url, "--data", str(data), "--out", str(tmp_path / "t.jsonl"), "--no-progress",
                     "--num-responses", "4", "--n-per-request", "1", "--concurrency", "8"]) == _stats(written=12,
                                                                                                     total=12)
        assert sum(server.attempts.values()) == 12  # 4 requests an example
    assert sorted(encoded) == sorted(p for e in examples for p in e.images)


def _exif_image(path: Path, orientation: int | None) -> None:
    """A landscape image with a red bar on its left, saved at ``path`` with that EXIF orientation (None: no EXIF);
    a ``.tiff`` one grey, of 32-bit integer pixels (PIL mode I) of 8-bit values (the data's check lets them in); a
    ``.mpo`` one a phone's multi-picture JPEG (two pictures)."""
    from PIL import Image

    image = Image.new("RGB", (64, 32), "white")
    image.paste((255, 0, 0), (0, 0, 8, 32))
    if path.suffix == ".tiff":
        image = image.convert("L").convert("I")
    exif = image.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    if path.suffix == ".mpo":
        image.save(path, format="MPO", save_all=True, append_images=[image.rotate(180)], exif=exif)
    else:
        image.save(path, exif=exif)


@pytest.mark.parametrize("name, orientation, turned", [
    ("phone.jpg", 6, True),  # a phone's portrait photo: 90 degrees clockwise for display
    ("phone.mpo", 6, True),  # a phone's multi-picture JPEG (Pillow's format MPO): sent as a JPEG too
    ("flipped.png", 4, True),  # an eXIf chunk in a PNG
    ("tagged.webp", 8, True),
    ("grey.tiff", 6, True),  # PNG holds no 32-bit integer pixels: sent as 8-bit grey (was: OSError, a traceback)
    ("upright.jpg", 1, False),
    ("none.jpg", None, False),
    ("none.png", None, False),
])
def test_server_teacher_sends_an_image_upright_as_the_loader_turns_it(tmp_path, name, orientation, turned):
    """ril_fast's loader turns an image upright by its EXIF orientation; a server that ignores it (SGLang,
    llama.cpp) would see the image turned: such an image is sent upright (a JPEG, an MPO's first picture included, as
    JPEG, others as PNG); any other file as it is."""
    import io

    import numpy as np
    from PIL import Image

    from ril_fast.data import Example
    from ril_fast.images import load_image
    from ril_fast.teacher import chat_messages

    path = tmp_path / name
    _exif_image(path, orientation)
    (image, text), = [m["content"] for m in chat_messages(Example("x", "Where is the red bar?", "top", [path]))]
    assert text == {"type": "text", "text": "Where is the red bar?"}
    mime, sent = image["image_url"]["url"].removeprefix("data:").split(";base64,")
    sent = base64.b64decode(sent)
    if not turned:
        assert (mime, sent) == (f"image/{'jpeg' if name.endswith('.jpg') else 'png'}", path.read_bytes())
        return
    jpeg = name.endswith((".jpg", ".mpo"))
    assert mime == ("image/jpeg" if jpeg else "image/png")
    with Image.open(io.BytesIO(sent)) as im:
        assert im.format == ("JPEG" if jpeg else "PNG") and im.getexif().get(0x0112) in (None, 1)
        got, want = np.asarray(im.convert("RGB"), dtype=np.int16), np.asarray(load_image(path), dtype=np.int16)
        if jpeg:  # encoded again at quality 95, 4:4:4: within a few levels of the loader's pixels
            assert got.shape == want.shape and np.abs(got - want).max() <= 8  # (turned 180 degrees: 43 on average)
        else:
            assert np.array_equal(got, want)
    assert load_image(path).size == ((32, 64) if orientation in (6, 8) else (64, 32))


def test_killed_mid_run_resumes_with_no_duplicate_and_no_lost_line(demo, tmp_path):
    out = tmp_path / "killed.jsonl"
    with FakeOpenAI(delay_s=0.2) as server:  # 2 requests a batch: 4 lines per 0.2 s, 80 in 4 s
        argv = ["--model", server.url, "--data", str(demo.train), "--out", str(out), "--num-responses", "2",
                "--max-new-tokens", "8", "--batch-size", "4", "--concurrency", "2", "--no-progress"]
        proc = subprocess.Popen([sys.executable, "-m", "ril_fast.teacher", *argv], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not out.exists() or out.read_bytes().count(b"\n") < 12) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        survived = out.read_bytes()
        assert 12 <= survived.count(b"\n") < 80  # killed mid-run, not before and not after
        # each batch (2 requests of 2 responses) flushed whole before the next starts: no line cut by a buffer
        assert survived.endswith(b"\n") and survived.count(b"\n") % 4 == 0
        # A crash in the middle of a write leaves half a line: the resumed run must cut it off.
        with out.open("ab") as f:
            f.write(b'{"id": "train-0001", "index": 1, "teacher": "kil')
        stats = main(argv)
    final = out.read_bytes()
    assert final.startswith(survived)  # append-only: what was written stays as it was
    lines = _lines(out)
    pairs = [(line["id"], line["index"]) for line in lines]
    examples = load_examples(demo.train)
    assert len(pairs) == len(set(pairs)) == 80
    assert set(pairs) == {(e.id, k) for e in examples for k in (0, 1)}
    assert stats["skipped"] == survived.count(b"\n") and stats["written"] == 80 - stats["skipped"]
    assert load_teachers([out], examples).counts() == {"killed": 80}
    assert written_pairs(out) == set(pairs)


def test_cli_data_error_is_one_line_naming_the_file_and_line(demo, tmp_path):
    data = demo.root / "bad_line.jsonl"  # beside the images its paths are relative to
    data.write_text(demo.train.read_text().splitlines(keepends=True)[0] + '{"id": "b", "question": \n')
    out = tmp_path / "t.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ril_fast.teacher", "--model", str(demo.student), "--data", str(data),
                           "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {data}:2: bad JSON"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.parametrize("option, value", [("--n-per-request", "0"), ("--top-p", "0")])
def test_an_option_out_of_its_range_is_refused_with_status_2(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as caught:
        main(["--model", "http://127.0.0.1:9/v1", "--data", str(_text_data(tmp_path, 1)), "--out",
              str(tmp_path / "o.jsonl"), "--served-model", "m", "--retries", "0", "--no-progress", option, value])
    assert caught.value.code == 2 and option in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_out_that_is_a_folder_is_refused_before_any_work(demo, tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo.student), "--data", str(demo.train), "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2  # argparse's status for a bad argument
    err = capsys.readouterr().err
    assert (f"error: --out {tmp_path}: is a folder; give the collection's JSONL file "
            f"(e.g. {tmp_path / 'NAME.jsonl'})") in err
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


@pytest.mark.parametrize("extra, said", [
    (["--model", "http://127.0.0.1:9/v1", "--timeout-s", "0"], "--timeout-s must be > 0 and finite"),
    (["--model", "http://127.0.0.1:9/v1", "--timeout-s", "nan"], "--timeout-s must be > 0 and finite"),
    (["--model", "http://127.0.0.1:9/v1", "--retries", "-1"], "--timeout-s must be > 0 and finite (under 1e9 s), "
                                                             "--retries >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--model", "NOWHERE"], "--model NOWHERE: no such folder"),
    (["--judge", "hf"], "--judge hf needs --judge-model"),
    (["--judge", "hf", "--judge-model", "NOWHERE"], "--judge-model NOWHERE: no such folder"),
])
def test_a_model_or_judge_that_cannot_load_is_refused_before_any_work(demo, tmp_path, capsys, monkeypatch, extra,
                                                                       said):
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    nowhere = str(tmp_path / "nowhere")
    out = tmp_path / "t.jsonl"
    with pytest.raises(SystemExit) as e:  # the last --model wins
        main(["--model", str(demo.student), "--data", str(demo.train), "--out", str(out), "--no-progress",
              *[a.replace("NOWHERE", nowhere) for a in extra]])
    assert e.value.code == 2  # argparse's status for a bad argument
    assert "error: " + said.replace("NOWHERE", nowhere) in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# A local text model whose sampling is stubbed: what it "generates" is set by the test
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    return tiny_folder(tmp_path_factory, "qwen2")


def _text_data(tmp_path: Path, n: int) -> Path:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"What is {i} plus {i}?", "answer": str(2 * i),
                                        "images": []}) + "\n" for i in range(n)))
    return data


def _stub_sampling(monkeypatch, respond) -> list[int]:
    """Replace ``sample_responses`` by one that gives ``respond(seed, i)`` as the i-th sequence's text; the
    seeds it was called with are returned (appended to as it is called)."""
    seeds = []

    def sample_responses(model, processor, examples, *, seed, **kwargs):
        seeds.append(seed)
        return [[SimpleNamespace(text=respond(seed, i), truncated=False)] for i in range(len(examples))]

    monkeypatch.setattr("ril_fast.rollout.sample_responses", sample_responses)
    return seeds


def test_local_teacher_rerun_draws_the_empty_responses_afresh(text_model, tmp_path, monkeypatch, capsys):
    """An empty response is asked for again by the next run, which must not draw the same sample again (the
    seed from the OS by default); a given --seed reproduces the draws."""
    drawn = {}  # seed -> its draw: the same seed draws the same; the first draw is empty
    seeds = _stub_sampling(monkeypatch, lambda seed, i: drawn.setdefault(seed, "a response" if drawn else ""))
    data = _text_data(tmp_path, 1)

    def run(out: str, *extra: str) -> dict:
        return main(["--model", str(text_model), "--data", str(data), "--out", str(tmp_path / out),
                     "--num-responses", "2", "--max-new-tokens", "4", "--no-progress", *extra])

    assert run("t.jsonl")["empty"] == 2
    assert "2 responses were not written (2 empty, 0 holding a control token" in capsys.readouterr().err
    assert run("t.jsonl") == _stats(written=2, total=2)
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    assert {line["response"] for line in _lines(tmp_path / "t.jsonl")} == {"a response"}
    assert run("s1.jsonl", "--seed", "7") == run("s2.jsonl", "--seed", "7")
    assert seeds[2] == seeds[3]  # the same seed, the same draw


def test_redo_truncated_asks_again_for_responses_cut_off(text_model, tmp_path, monkeypatch, capsys):
    """Responses that hit --max-new-tokens are written marked truncated and counted as collected (the trainer
    leaves them out); the start says how many there are, and --redo-truncated asks for them again, appending:
    the trainer then has a response for every example."""
    cut_off = {"now": True}

    def sample_responses(model, processor, examples, **kwargs):
        return [[SimpleNamespace(text="a long answer that", truncated=cut_off["now"])] for _ in examples]

    monkeypatch.setattr("ril_fast.rollout.sample_responses", sample_responses)
    data, out = _text_data(tmp_path, 3), tmp_path / "t.jsonl"

    def run(*extra: str) -> dict:
        return main(["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
                     "--max-new-tokens", "4", "--no-progress", *extra])

    stats = run()
    assert stats["written"] == stats["truncated"] == 6
    assert "6 of the 6 responses written hit --max-new-tokens 4: marked truncated" in capsys.readouterr().err
    with pytest.raises(DataError, match="every line is marked truncated"):
        load_teachers([out], load_examples(data))
    capsys.readouterr()
    assert run()["written"] == 0
    assert "6 of those are marked truncated, which the trainer leaves out: --redo-truncated" in capsys.readouterr().err
    cut_off["now"] = False
    assert run("--redo-truncated") == _stats(written=6, total=6)
    assert "(6 marked truncated, which the trainer leaves out, asked for again)" in capsys.readouterr().err
    assert run("--redo-truncated")["written"] == 0  # each now has a whole response
    bank = load_teachers([out], load_examples(data))
    assert bank.counts() == {"t": 6} and len(bank.truncated) == 6


def test_local_teacher_response_with_a_control_token_is_not_written(text_model, tmp_path, monkeypatch, capsys):
    """The local teacher decodes with special tokens kept: a response holding one of its control tokens, which
    load_teachers refuses, is treated as an empty one: not written, counted, asked for again."""
    from ril_fast.processor import Processor

    control = Processor.from_pretrained(text_model).control_tokens
    assert {"<|endoftext|>", "<|im_end|>"} <= set(control)
    texts = ["fine", "stop<|im_end|>", "  ", "x <|endoftext|> y"]
    _stub_sampling(monkeypatch, lambda seed, i: texts[i])
    data = _text_data(tmp_path, 1)
    out = tmp_path / "c.jsonl"
    argv = ["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "4",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == _stats(written=1, empty=1, control_tokens=2, total=4)
    assert "3 responses were not written (1 empty, 2 holding a control token" in capsys.readouterr().err
    assert [(line["index"], line["response"]) for line in _lines(out)] == [(0, "fine")]
    texts[:] = ["again"] * 4
    assert main(argv) == _stats(written=3, skipped=1, total=4)
    bank = load_teachers([out], load_examples(data), control_tokens=control)
    assert bank.counts() == {"c": 4}


def test_a_judge_failing_for_good_loses_no_response(text_model, tmp_path, monkeypatch, capsys):
    """The judge fails for good at the second batch: that batch's responses are written without verdicts before the
    command ends (the costly part of a collection is the teacher's text), the first batch's with theirs; a rerun
    has nothing left to collect, and the trainer's loader takes every line."""
    from ril_fast.processor import Processor

    _stub_sampling(monkeypatch, lambda seed, i: f"answer {i}")
    calls = []

    def judge(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise HTTPError("http://judge/v1: 3 retries spent")
        return [True] * len(items)

    judge.name = "failing"
    monkeypatch.setattr("ril_fast.teacher.make_judge_from_config", lambda args: judge)
    data = _text_data(tmp_path, 3)
    out = tmp_path / "j.jsonl"
    argv = ["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
            "--max-new-tokens", "4", "--batch-size", "4", "--no-progress", "--judge", "rule"]
    with pytest.raises(HTTPError, match="3 retries spent"):
        main(argv)
    assert "the judge failed: this batch's 2 responses were written without verdicts" in capsys.readouterr().err
    assert [(line["id"], line["index"], line.get("correct"), line.get("judge")) for line in _lines(out)] == \
        [("t0", 0, True, "failing"), ("t0", 1, True, "failing"), ("t1", 0, True, "failing"),
         ("t1", 1, True, "failing"), ("t2", 0, None, None), ("t2", 1, None, None)]
    assert calls == [4, 2]
    assert main(argv) == _stats(skipped=6, total=6)
    control = Processor.from_pretrained(text_model).control_tokens
    assert load_teachers([out], load_examples(data), control_tokens=control).counts() == {"j": 6}


def test_the_run_ends_with_the_judges_tally_of_the_file(text_model, tmp_path, monkeypatch, capsys):
    """With --judge the run ends saying how many of the file's untruncated responses this judge found correct, and
    how many have no verdict of it (a line written by hand, one another judge judged): the teacher's accuracy, for
    choosing teachers. A truncated line, which the trainer leaves out, is not counted, judged or not."""
    texts = iter(["bad", "good", "bad"])
    _stub_sampling(monkeypatch, lambda seed, i: next(texts))

    def judge(items):
        return [item.response == "good" for item in items]

    judge.name = "fake-judge"
    monkeypatch.setattr("ril_fast.teacher.make_judge_from_config", lambda args: judge)
    data = _text_data(tmp_path, 3)
    out = tmp_path / "k.jsonl"
    shas = [e.question_sha for e in load_examples(data)]
    out.write_text(json.dumps({"id": "t0", "index": 0, "teacher": "k", "question_sha": shas[0], "response": "mine",
                               "truncated": False}) + "\n" +
                   json.dumps({"id": "t1", "index": 0, "teacher": "k", "question_sha": shas[1], "response": "good",
                               "truncated": True, "correct": True, "judge": "fake-judge"}) + "\n" +
                   json.dumps({"id": "t2", "index": 0, "teacher": "k", "question_sha": shas[2], "response": "good",
                               "truncated": False, "correct": True, "judge": "another-judge"}) + "\n")
    assert main(["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
                 "--max-new-tokens", "4", "--no-progress", "--judge", "rule"]) == _stats(written=3, skipped=3, total=6)
    assert [line.get("correct") for line in _lines(out)] == [None, True, True, False, True, False]
    tally = (f"k: 1 of the 3 responses in {out} judged by fake-judge are correct (33.3%); 2 of its 5 untruncated "
             f"responses have no verdict of this judge")
    assert tally in capsys.readouterr().err
    # Again, with nothing left to collect: the way to ask for a finished collection's accuracy
    assert main(["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
                 "--max-new-tokens", "4", "--no-progress", "--judge", "rule"]) == _stats(skipped=6, total=6)
    assert tally in capsys.readouterr().err


def test_the_local_teacher_samples_as_the_options_say(text_model, tmp_path, monkeypatch):
    """--temperature 0 samples greedily (at temperature 1, unused), another samples at it; --top-p and --batch-size
    reach ``sample_responses``."""
    calls = []

    def sample_responses(model, processor, examples, **kwargs):
        calls.append(kwargs)
        return [[SimpleNamespace(text="an answer", truncated=False)] for _ in examples]

    monkeypatch.setattr("ril_fast.rollout.sample_responses", sample_responses)
    data = _text_data(tmp_path, 2)
    for temperature, out in (("0", "g.jsonl"), ("0.7", "s.jsonl")):
        assert main(["--model", str(text_model), "--data", str(data), "--out", str(tmp_path / out), "--top-p", "0.9",
                     "--batch-size", "3", "--temperature", temperature, "--max-new-tokens", "4", "--num-responses",
                     "2", "--no-progress"])["written"] == 4
    assert [(c["greedy"], c["temperature"], c["top_p"], c["max_batch"], c["max_new_tokens"]) for c in calls] == \
        [(True, 1.0, 0.9, 3, 4)] * 2 + [(False, 0.7, 0.9, 3, 4)] * 2  # batches of 3 and 1


def test_each_batch_of_the_local_teacher_draws_with_its_own_seed(text_model, tmp_path, monkeypatch):
    """K=4 responses to an example in batches of 2: a seed shared by the batches would draw the same responses
    for indices 0-1 and 2-3. Each batch's seed is the run's --seed and its first job's, so a rerun with that seed
    draws the same."""
    seeds = _stub_sampling(monkeypatch, lambda seed, i: f"drawn with seed {seed}, sequence {i}")
    data = _text_data(tmp_path, 2)

    def run(out: str) -> list[tuple[str, int, str]]:
        main(["--model", str(text_model), "--data", str(data), "--out", str(tmp_path / out), "--num-responses", "4",
              "--batch-size", "2", "--max-new-tokens", "4", "--seed", "1", "--no-progress"])
        return [(line["id"], line["index"], line["response"]) for line in _lines(tmp_path / out)]

    lines = run("a.jsonl")
    assert len(seeds) == len(set(seeds)) == 4  # 8 responses, 4 batches
    for example in ("t0", "t1"):
        assert len({response for i, _, response in lines if i == example}) == 4  # no two indices alike
    assert run("b.jsonl") == lines and seeds[4:] == seeds[:4]


def test_a_local_teacher_whose_head_ril_fast_cannot_train_still_answers(tmp_path, tmp_path_factory):
    """A teacher only generates, through its own logits: a head the trainer refuses (Phi-2's bias: its log-probs
    would not be ``hidden @ Wᵀ``) is no reason to refuse it as a teacher, nor as a model to evaluate."""
    from models_fixtures import text_family

    from ril_fast.eval import main as evaluate_main
    from ril_fast.models import load
    from ril_fast.processor import UnsupportedModel

    phi = text_family(tmp_path_factory, "phi")
    with pytest.raises(UnsupportedModel, match="adds a bias to its logits"):
        load(phi, device="cpu")  # as a student
    data, out = _text_data(tmp_path, 2), tmp_path / "t.jsonl"
    stats = main(["--model", str(phi), "--data", str(data), "--out", str(out), "--num-responses", "2",
                  "--max-new-tokens", "4", "--no-progress"])
    assert stats["total"] == 4 and len(_lines(out)) == stats["written"]
    summary = evaluate_main(["--model", str(phi), "--data", str(data), "--out", str(tmp_path / "eval"),
                             "--judge", "rule", "--max-new-tokens", "4"])
    assert summary["examples"] == 2


def test_local_teacher_loads_in_bf16_on_cuda_and_fp32_on_the_cpu(monkeypatch):
    """ril_fast.models.load defaults to fp32, on CUDA too: twice the memory, and half the decoding speed of bf16."""
    import torch

    from ril_fast.teacher import LocalTeacher

    loaded = []

    def load(folder, dtype=torch.float32, **kwargs):  # its default
        loaded.append(dtype)
        return None, SimpleNamespace(control_tokens=())

    monkeypatch.setattr("ril_fast.models.load", load)
    for cuda, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        LocalTeacher("folder", max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=2, seed=0)
    assert loaded == [torch.bfloat16, torch.float32]


# ----------------------------------------------------------------------------------------------------
# Resuming a file: only the tool's own file is changed
# ----------------------------------------------------------------------------------------------------
_OWN = b'{"id": "t0", "index": 0, "teacher": "t", "response": "a", "truncated": false}\n'


@pytest.mark.parametrize("content, error", [
    (b'{"id": "t0", "response": "a"}\n{"id": "t1", "response": "b"}', ":1: not a line of ril_fast.teacher"),
    (b'{"id": "t1", "response": "b"}', ":1: not a line of ril_fast.teacher"),  # JSON: a whole line, not ours
    (_OWN + b"my notes", ":2: not a line of ril_fast.teacher"),  # not the start of one of ours
    (_OWN + b'{"id": "t1", "response": "b"}', ":2: not a line of ril_fast.teacher"),
    (b'{"id": "t0", "index": null}\n', ":1: not a line of ril_fast.teacher"),  # int(None): a TypeError
    (_OWN + b"[1]\n", ":2: not a line of ril_fast.teacher"),  # JSON, not an object
])
def test_resume_leaves_a_file_not_of_the_tool_as_it_was(tmp_path, content, error):
    out = tmp_path / "foreign.jsonl"
    out.write_bytes(content)
    with pytest.raises(DataError, match=error):
        written_pairs(out)
    assert out.read_bytes() == content


def test_resume_cuts_only_an_incomplete_last_line_and_ends_a_whole_one(tmp_path):
    out = tmp_path / "own.jsonl"
    whole = _OWN.replace(b'"t0"', b'"t1"').rstrip(b"\n")
    out.write_bytes(_OWN + whole)  # a whole last line, its newline missing: kept, and given its newline
    assert written_pairs(out) == {("t0", 0), ("t1", 0)} and out.read_bytes() == _OWN + whole + b"\n"
    for cut in (b"{", whole[:20], whole[:-1], "{\"id\": \"é".encode()[:-1]):  # the last: inside a UTF-8 character
        out.write_bytes(_OWN + cut)
        assert written_pairs(out) == {("t0", 0)} and out.read_bytes() == _OWN


def test_resume_reads_a_nameless_line_as_the_stem_s_and_passes_blank_lines(tmp_path):
    """A line without ``teacher`` is the file stem's (as load_teachers reads it), so another teacher's run refuses
    it; a blank line (an editor's) is no line at all."""
    out = tmp_path / "a.jsonl"
    nameless = _OWN.replace(b', "teacher": "t"', b"")
    out.write_bytes(nameless)
    with pytest.raises(DataError, match=rf"^{out}:1: a response of teacher 'a', but this run's teacher is 'b' "):
        written_pairs(out, teacher="b")
    assert written_pairs(out, teacher="a") == {("t0", 0)}
    out.write_bytes(nameless + b"\n  \n" + nameless.replace(b'"t0"', b'"t1"'))
    assert written_pairs(out, teacher="a") == {("t0", 0), ("t1", 0)}


def test_a_file_of_another_teacher_is_refused_before_any_model_loads(demo, text_model, tmp_path, monkeypatch):
    """A file holds one teacher. A second teacher collected into it would find the first's (id, index) pairs done
    and collect nothing; a resume under another --teacher would split one teacher's collection in two: both are
    refused, naming the line and both names, the file left as it was."""
    data = _first(demo, 3)
    out = tmp_path / "qwen.jsonl"
    with FakeOpenAI() as server:
        argv = ["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "2", "--no-progress"]
        assert main([*argv, "--teacher", "qwen72b"])["written"] == 6
        before = out.read_bytes()
        with pytest.raises(DataError, match=rf"^{out}:1: a response of teacher 'qwen72b', but this run's teacher "
                                            rf"is 'internvl78b' \(a file holds one teacher\): pass --teacher qwen72b "
                                            rf"to go on collecting 'qwen72b', or give another --out for a second "
                                            rf"teacher$"):
            main([*argv, "--teacher", "internvl78b"])
        with pytest.raises(DataError, match=rf"^{out}:1: .* this run's teacher is 'qwen' .* pass --teacher qwen72b"):
            main(argv)  # the default name, the file's stem
        assert out.read_bytes() == before
        assert main([*argv, "--teacher", "qwen72b"])["skipped"] == 6  # its own name goes on
        other = tmp_path / "internvl78b.jsonl"
        assert main([*argv[:4], "--out", str(other), *argv[6:]])["written"] == 6  # a second teacher, another file
    assert load_teachers([out, other], load_examples(data)).counts() == {"qwen72b": 6, "internvl78b": 6}
    # Checked before the model loads; a line without a name is the file stem's (as load_teachers reads it), and the
    # last line, its newline missing, is checked before it is given one.
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    text = tmp_path / "t.jsonl"
    text.write_bytes(_OWN.replace(b', "teacher": "t"', b"") + _OWN.replace(b'"t0"', b'"t1"').replace(b'"t"', b'"u"')
                     .rstrip(b"\n"))
    content = text.read_bytes()
    with pytest.raises(DataError, match=rf"^{text}:2: a response of teacher 'u', but this run's teacher is 't' "):
        main(["--model", str(text_model), "--data", str(_text_data(tmp_path, 2)), "--out", str(text), "--no-progress"])
    assert text.read_bytes() == content


def test_a_rerun_on_changed_questions_collects_them_again(text_model, tmp_path, monkeypatch, capsys):
    """Each line carries its question's digest (question and image paths as written). Rerun on data whose ids were
    kept but whose questions changed, the tool takes those lines for what they are, answers to other questions: it
    sets them aside (kept in NAME.jsonl.stale, should --data be the wrong file), says how many, and collects those
    pairs again, the rest kept; the trainer then reads the file against the new data. A crash while setting them
    aside leaves every line in the collection or the stale file, and the next run finishes. A hand-written line
    (no digest) counts as done."""
    _stub_sampling(monkeypatch, lambda seed, i: f"answer drawn with seed {seed}, sequence {i}")
    data, out = _text_data(tmp_path, 3), tmp_path / "t.jsonl"
    argv = ["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
            "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == _stats(written=6, total=6)
    sha = {e.id: e.question_sha for e in load_examples(data)}
    assert [(line["id"], line["question_sha"]) for line in _lines(out)] == [(i, sha[i]) for i in sha for _ in "01"]
    first = out.read_bytes()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["question"] = "What is 1 times 7?"  # a new version of the file: the same ids, question t1 changed
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(argv) == _stats(written=2, skipped=4, stale=2, total=6)
    assert (f"t: 2 responses in {out} were collected for another question (their question_sha is not that of their "
            f"id's question and images in {data} now): moved to {stale_file(out)}, and asked for again"
            in capsys.readouterr().err)
    old_t1 = [line for line in first.splitlines(keepends=True) if b'"t1"' in line]
    assert stale_file(out).read_bytes() == b"".join(old_t1)
    new = load_examples(data)
    assert load_teachers([out], new).counts() == {"t": 6}  # nothing stale is left to refuse
    assert {line["question_sha"] for line in _lines(out) if line["id"] == "t1"} == {new[1].question_sha}
    assert main(argv) == _stats(skipped=6, total=6)  # done
    # A crash between the stale file's write and the rename: the collection is as it was, and a rerun finishes
    rows[2]["question"] = "What is 2 times 9?"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = out.read_bytes()
    old_t2 = [line for line in before.splitlines(keepends=True) if b'"t2"' in line]
    with monkeypatch.context() as m:
        m.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
        with pytest.raises(OSError, match="killed"):
            main(argv)
    assert out.read_bytes() == before and stale_file(out).read_bytes() == b"".join(old_t1 + old_t2)  # appended
    assert main(argv) == _stats(written=2, skipped=4, stale=2, total=6)
    assert stale_file(out).read_bytes() == b"".join(old_t1 + old_t2 + old_t2)  # nothing set aside is ever lost
    assert load_teachers([out], load_examples(data)).counts() == {"t": 6}
    # A hand-written line, without question_sha: nothing ties it to a question, and its pair counts as done
    hand = tmp_path / "hand.jsonl"
    hand.write_text(json.dumps({"id": "t0", "index": 0, "teacher": "hand", "response": "By hand."}) + "\n")
    assert main([*argv[:4], "--out", str(hand), *argv[6:]]) == _stats(written=5, skipped=1, total=6)


def test_setting_aside_keeps_a_linked_collection_linked(tmp_path):
    """A collection reached through a symbolic link (into shared storage, say): the lines set aside leave the file
    it points to, which keeps its permissions, and the link stays a link (a rename over it would replace the link by
    a local copy, and the shared file would keep the stale lines)."""
    examples = load_examples(_text_data(tmp_path, 2))
    shared = tmp_path / "shared" / "t.jsonl"
    shared.parent.mkdir()
    lines = [json.dumps({"id": "t0", "index": 0, "teacher": "t", "question_sha": "0" * 12, "response": "old"}),
             json.dumps({"id": "t1", "index": 0, "teacher": "t", "question_sha": examples[1].question_sha,
                         "response": "kept"})]
    shared.write_text("".join(line + "\n" for line in lines))
    shared.chmod(0o640)
    link = tmp_path / "t.jsonl"
    link.symlink_to(shared)
    assert set_aside_stale(link, examples) == 1
    assert link.is_symlink() and link.resolve() == shared.resolve()
    assert shared.read_text() == lines[1] + "\n" and shared.stat().st_mode & 0o777 == 0o640
    assert stale_file(shared).read_text() == lines[0] + "\n"
    # A line of an id the data no longer holds is not stale: nothing says which question it answers now
    gone = json.dumps({"id": "t9", "index": 0, "teacher": "t", "question_sha": "0" * 12, "response": "gone"}) + "\n"
    with shared.open("a") as f:
        f.write(gone)
    assert set_aside_stale(link, examples) == 0
    assert shared.read_text() == lines[1] + "\n" + gone and stale_file(shared).read_text() == lines[0] + "\n"


# ----------------------------------------------------------------------------------------------------
# One-line errors, before any model loads where they can be
# ----------------------------------------------------------------------------------------------------
def test_cli_server_that_cannot_be_reached_is_a_one_line_error(demo, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    out = tmp_path / "t.jsonl"
    proc = subprocess.run([sys.executable, "-m", "ril_fast.teacher", "--model", url, "--data", str(demo.train),
                           "--out", str(out), "--retries", "0", "--no-progress"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1].startswith(f"error: GET {url}/models: failed 1 times"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_out_under_a_file_is_refused_before_any_work(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "sub" / "t.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo.student), "--data", str(demo.train), "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    assert f"error: --out {out}: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_text_model_on_data_with_images_is_refused_before_it_loads(demo, text_model, tmp_path, monkeypatch):
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    out = tmp_path / "t.jsonl"
    with pytest.raises(DataError, match=rf"^{demo.train}:1: the example has images, but the teacher "
                                        rf"\({text_model}\) is a text-only model$"):
        main(["--model", str(text_model), "--data", str(demo.train), "--out", str(out), "--no-progress"])
    assert not out.exists()


def test_an_example_the_local_teacher_cannot_answer_is_refused_before_it_loads(demo, tmp_path, monkeypatch):
    """An image its image processor refuses, or a prompt with no room for --max-new-tokens in its context, would
    end every run at that example's batch: refused before the model loads, naming the line."""
    from PIL import Image

    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    Image.new("RGB", (3000, 10)).save(tmp_path / "wide.png")
    rows = [json.loads(line) for line in demo.train.read_text().splitlines()[:3]]
    rows[1]["images"] = [str(tmp_path / "wide.png")]
    data = demo.train.parent / "wide.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.jsonl"
    with pytest.raises(DataError, match=rf"^{data}:2: the image processor refuses an image of the example "
                                        r"\(absolute aspect ratio must be smaller than 200"):
        main(["--model", str(demo.student), "--data", str(data), "--out", str(out), "--no-progress"])
    context = AutoConfig.from_pretrained(demo.student).text_config.max_position_embeddings
    with pytest.raises(DataError, match=rf"^{demo.train}:1: the prompt takes \d+ tokens .* exceeds the model's "
                                        rf"context \({context} tokens\)"):
        main(["--model", str(demo.student), "--data", str(demo.train), "--out", str(out), "--no-progress",
              "--max-new-tokens", str(context)])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Throughput: a server teacher keeps --concurrency requests in flight
# ----------------------------------------------------------------------------------------------------
def test_server_teacher_keeps_concurrency_requests_in_flight(demo, tmp_path):
    """A batch waits for its last request: a server teacher's batch holds whole requests, at least
    --concurrency of them, whatever --batch-size says."""
    data = _first(demo, 12)
    examples = load_examples(data)
    out = tmp_path / "busy.jsonl"
    with FakeOpenAI(hold=6) as server:  # a request is answered once 6 are in flight (12 requests: 2 rounds)
        stats = main(["--model", server.url, "--data", str(data), "--out", str(out), "--num-responses", "4",
                      "--batch-size", "6", "--concurrency", "6", "--no-progress"])
    assert stats == _stats(written=48, total=48)
    assert server.max_in_flight == 6
    assert _asked(server, examples) == {e.id: [4] for e in examples}  # whole requests (batches of 6 would split some)


def test_a_file_another_collection_is_writing_is_refused(text_model, tmp_path, monkeypatch):
    """Two collections appending to one file would ask for the same responses and write them twice: while another
    process holds the file, the command stops at once with one error line naming it, the file untouched; once
    that process ends, however it ends, the file is free. Another file beside it is not held."""
    _stub_sampling(monkeypatch, lambda seed, i: f"response {i}")
    data = _text_data(tmp_path, 2)
    out = tmp_path / "teachers" / "t.jsonl"
    argv = ["--model", str(text_model), "--data", str(data), "--num-responses", "2", "--max-new-tokens", "4",
            "--no-progress"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ril_fast.files import lock_file; "
                               "lock_file(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = subprocess.run([sys.executable, "-m", "ril_fast.teacher", *argv, "--out", str(out)],
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and not out.exists()
        assert refused.stderr.strip().splitlines() == [f"error: {out} is in use by another process (pid {holder.pid})"]
        assert main([*argv, "--out", str(out.with_name("u.jsonl"))])["written"] == 4  # another file is free
    finally:
        holder.kill()
        holder.wait()
    assert main([*argv, "--out", str(out)])["written"] == 4  # SIGKILL dropped the lock
    assert len(_lines(out)) == 4


def test_a_judge_interrupted_loses_no_response_and_says_how_many_were_written(text_model, tmp_path, monkeypatch,
                                                                               capsys):
    """A Ctrl-C while the judge judges the second batch (a KeyboardInterrupt, no Exception) still writes that batch's
    responses without verdicts; the message counts the responses written (one: the other was empty), not the batch's
    jobs."""
    texts = iter(["a", "b", "c", ""])
    _stub_sampling(monkeypatch, lambda seed, i: next(texts))
    calls = []

    def judge(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [True] * len(items)

    judge.name = "interrupted"
    monkeypatch.setattr("ril_fast.teacher.make_judge_from_config", lambda args: judge)
    data = _text_data(tmp_path, 2)
    out = tmp_path / "i.jsonl"
    with pytest.raises(KeyboardInterrupt):
        main(["--model", str(text_model), "--data", str(data), "--out", str(out), "--num-responses", "2",
              "--max-new-tokens", "4", "--batch-size", "2", "--no-progress", "--judge", "rule"])
    assert "the judge failed: this batch's 1 responses were written without verdicts" in capsys.readouterr().err
    assert [(line["id"], line["index"], line["response"], line.get("correct")) for line in _lines(out)] == \
        [("t0", 0, "a", True), ("t0", 1, "b", True), ("t1", 0, "c", None)]


def test_each_batch_is_in_the_file_before_the_next_is_asked_for(text_model, tmp_path, monkeypatch):
    """A batch's lines are flushed to the file before the teacher is asked for the next batch (a crash in it loses
    none of them)."""
    out = tmp_path / "f.jsonl"
    seen = []

    def respond(seed, i):
        if i == 0:
            seen.append(len(out.read_text().splitlines()) if out.exists() else None)
        return f"response {i}"

    _stub_sampling(monkeypatch, respond)
    assert main(["--model", str(text_model), "--data", str(_text_data(tmp_path, 3)), "--out", str(out),
                 "--num-responses", "2", "--max-new-tokens", "4", "--batch-size", "2",
                 "--no-progress"])["written"] == 6
    assert seen == [0, 2, 4]


def test_a_tally_of_a_file_this_judge_judged_whole_says_only_its_accuracy(text_model, tmp_path, monkeypatch, capsys):
    """Every untruncated line judged by this judge: the tally is the accuracy alone, no count of lines without a
    verdict (none of them)."""
    _stub_sampling(monkeypatch, lambda seed, i: "good" if i == 0 else "bad")

    def judge(items):
        return [item.response == "good" for item in items]

    judge.name = "fake-judge"
    monkeypatch.setattr("ril_fast.teacher.make_judge_from_config", lambda args: judge)
    out = tmp_path / "w.jsonl"
    main(["--model", str(text_model), "--data", str(_text_data(tmp_path, 1)), "--out", str(out), "--num-responses",
          "2", "--max-new-tokens", "4", "--no-progress", "--judge", "rule"])
    assert f"w: 1 of the 2 responses in {out} judged by fake-judge are correct (50.0%)\n" in capsys.readouterr().err


def test_the_tally_leaves_out_a_verdict_that_is_no_boolean(tmp_path):
    """``verdict_counts`` counts as judged only a line of this judge whose ``correct`` is true or false (a line
    written by hand with ``null`` or ``1`` has no verdict); a truncated line is not counted at all."""
    from ril_fast.teacher_resume import verdict_counts

    out = tmp_path / "v.jsonl"
    lines = [{"correct": True}, {"correct": None}, {"correct": 1}, {"correct": True, "truncated": True}]
    out.write_text("".join(json.dumps({"id": f"t{n}", "index": 0, "response": "r", "truncated": False, "judge": "j",
                                       **line}) + "\n" for n, line in enumerate(lines)))
    assert verdict_counts(out, "j") == (1, 1, 3)
    assert verdict_counts(out, "other") == (0, 0, 3)
