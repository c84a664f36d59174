"""The http judge against a small OpenAI-compatible server started here (tests/fake_openai.py): verdicts
on real cases, the yes/no decision, requests in flight, retries, timeouts and clear errors.

The same judge against a real vLLM server: tests/test_vllm.py (opt-in)."""

import email.utils
import io
import math
import random
import re
import socket
import threading
import time
import urllib.error

import pytest
from fake_openai import FakeOpenAI
from test_judge import CASES

from ril_fast.judge import CachedJudge, JudgeItem, RuleJudge
from ril_fast.judges_http import RETRY_AFTER_MAX_S, HTTPError, HTTPJudge, OpenAIClient, retry_after_s


def _items(cases):
    return [JudgeItem("What is the answer?", a, r) for a, r, _ in cases]


def _judge(server, **kw):
    kw = dict(concurrency=4, timeout_s=5.0, retries=2, backoff_s=0.01) | kw
    return HTTPJudge(server.url, "fake-model", **kw)


@pytest.mark.parametrize("logprobs", [True, False], ids=["top_logprobs", "token_only"])
def test_verdicts_on_real_cases_in_order(logprobs, _fresh_seed):
    """The server judges with the rule judge: every verdict must come back, in the order asked, whether
    it is read from the summed top log-probs or, without them, from the token."""
    cases = random.Random(_fresh_seed).sample(CASES, len(CASES))  # RIL_TEST_SEED replays the order
    rule = RuleJudge(use_math_verify=False)
    with FakeOpenAI(logprobs=logprobs) as server:
        verdicts = _judge(server)(_items(cases))
    assert verdicts == [rule.check(a, r) for a, r, _ in cases]
    assert len(server.requests) == len(cases)  # one request per item, no retries
    for path, body, headers in server.requests:
        assert path == "/v1/chat/completions"
        assert body["model"] == "fake-model" and body["max_tokens"] == 1 and body["temperature"] == 0
        assert body["logprobs"] is True and body["top_logprobs"] >= 2
        assert [m["role"] for m in body["messages"]] == ["system", "user"]


def test_top_logprobs_is_part_of_the_cache_identity(monkeypatch):
    """A server returns as many top log-probs as asked for (vLLM does): "yes" wins on its two spellings
    with 10, "No" wins alone with 1. Two judges that differ only there must not share a cached verdict."""
    top = [("No", 0.4), ("Yes", 0.3), (" yes", 0.25)]

    def vllm_like(route, body):
        entries = [{"token": t, "logprob": math.log(p)} for t, p in top[:body["top_logprobs"]]]
        return {"choices": [{"message": {"content": "No"},
                             "logprobs": {"content": [dict(entries[0], top_logprobs=entries)]}}]}

    item, store, verdicts = JudgeItem("What colour?", "red", "red"), {}, []
    for n in (10, 1):
        judge = HTTPJudge("http://127.0.0.1:9/v1", "fake-model", top_logprobs=n)
        monkeypatch.setattr(judge.client, "request", vllm_like)
        verdicts.append((judge([item]), CachedJudge(judge, store)([item])))
    assert verdicts == [([True], [True]), ([False], [False])]  # uncached, then through the shared store
    assert len(store) == 2


def test_requests_in_flight_up_to_the_limit():
    with FakeOpenAI(hold=4) as server:  # a request is answered once 4 are in flight (24 requests: 6 rounds)
        verdicts = _judge(server, concurrency=4, timeout_s=60.0)(_items(CASES[:24]))  # longer than the hold
    assert len(verdicts) == 24
    assert server.max_in_flight == 4


def test_5xx_and_timeouts_are_retried():
    # A slow reply comes 5 s late, past the 2 s timeout; a plain one well within it, even on a busy machine.
    with FakeOpenAI(slow_s=5.0) as server:
        items = [JudgeItem("q", "red", "red FAULT:500x2"), JudgeItem("q", "red", "blue FAULT:slow-once"),
                 JudgeItem("q", "red", "red")]
        assert _judge(server, timeout_s=2.0, retries=2)(items) == [True, False, True]
    attempts = sorted(server.attempts.values())
    assert attempts == [1, 2, 3]  # the plain item once, the slow one twice, the 500 one three times


def test_gives_up_after_the_last_retry_with_a_clear_error():
    with FakeOpenAI(slow_s=5.0) as server:  # a slow reply comes 5 s late, past the 2 s timeout below
        start = time.perf_counter()
        with pytest.raises(HTTPError, match=r"failed 3 times .*last failure: HTTP 500.*injected server error"):
            _judge(server, retries=2, backoff_s=0.1)([JudgeItem("q", "a", "FAULT:500")])
        assert time.perf_counter() - start >= 0.1 + 0.2  # back-off 0.1 s, then 0.2 s
        with pytest.raises(HTTPError, match=r"failed 2 times \(timeout 2.0 s.*last failure: .*timed out"):
            _judge(server, retries=1, timeout_s=2.0)([JudgeItem("q", "a", "r"), JudgeItem("q", "a", "FAULT:slow")])
    assert [n for text, n in server.attempts.items() if "FAULT:500" in text] == [3]


@pytest.mark.parametrize("fault", ["429-once", "503-once"])
def test_a_rate_limit_is_waited_out_as_the_server_asks(fault):
    """A 429 (or 503) with ``Retry-After: 1``: the retry comes no sooner, though the back-off is 0.01 s (the
    header was ignored: a hosted API's 5 s limit used up the trainer's 3 retries in 3.5 s and failed the run)."""
    with FakeOpenAI(retry_after="1") as server:
        assert _judge(server, retries=1, backoff_s=0.01)([JudgeItem("q", "red", f"red FAULT:{fault}")]) == [True]
    (first, second), = server.times.values()  # two attempts
    assert second - first >= 1.0


def test_a_408_is_retried():
    """HTTP 408: the server timed out waiting for the request, which may well go through the next time."""
    with FakeOpenAI() as server:
        assert _judge(server, retries=1, backoff_s=0.01)([JudgeItem("q", "red", "red FAULT:408-once")]) == [True]
    assert list(server.attempts.values()) == [2]


def test_retry_after_header_is_read_and_capped():
    """Delta-seconds or an HTTP date, within [0, 60 s]; anything else is no header."""
    now = time.time()
    values = [None, "", "2", " 3 ", "0.5", "120", "-5", "soon", "nan", "inf"]
    assert [retry_after_s(v, now) for v in values] == [0, 0, 2, 3, 0.5, RETRY_AFTER_MAX_S, 0, 0, 0, 0]
    assert RETRY_AFTER_MAX_S == 60
    assert retry_after_s(email.utils.formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_s(email.utils.formatdate(now - 30, usegmt=True), now) == 0
    assert retry_after_s(email.utils.formatdate(now + 3600, usegmt=True), now) == RETRY_AFTER_MAX_S


def test_waits_are_the_longer_of_back_off_and_retry_after_with_jitter():
    """Each wait is at least the back-off (or the server's Retry-After, where longer) and at most 25 % more, spread
    at random so that the pool's threads, turned away at once, do not all come back at once."""
    client = OpenAIClient("http://127.0.0.1:9/v1", backoff_s=0.5)
    for attempt, retry_after, base in [(1, 0.0, 0.5), (3, 0.0, 2.0), (1, 5.0, 5.0), (3, 1.0, 2.0)]:
        waits = [client.wait_s(attempt, retry_after) for _ in range(200)]
        assert all(base <= w <= 1.25 * base for w in waits), (attempt, retry_after, min(waits), max(waits))
        assert max(waits) - min(waits) > 0.1 * base, (attempt, retry_after)  # 200 draws: spread over ~25 %


@pytest.mark.parametrize("fault,message,status", [
    ("malformed", r"the reply is not JSON .*<html>not json", None),
    ("nochoices", r"malformed reply \(KeyError: 'choices'\)", None),
    ("400", r"HTTP 400 \(not retried\).*this model does not exist", 400),
])
def test_bad_replies_fail_at_once_and_say_why(fault, message, status):
    """Each fails after one attempt; the error carries the HTTP status of a reply refused outright (the teacher tool
    goes on past one example's 4xx)."""
    with FakeOpenAI() as server:
        with pytest.raises(HTTPError, match=message) as caught:
            _judge(server, retries=3)([JudgeItem("q", "a", f"FAULT:{fault}")])
    assert list(server.attempts.values()) == [1]
    assert caught.value.status == status


def _read_request(conn: socket.socket) -> bytes:
    """One HTTP request read from ``conn``, its headers and its Content-Length of body (http.client may send
    them in two writes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    while length and len(body) < int(length.group(1)):
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("status,retried", [(502, True), (400, False)])
def test_an_error_reply_whose_body_is_cut_off(status, retried):
    """A 5xx whose body never arrives whole (a proxy dropping the connection: 8 of the 100 bytes it announced) is
    retried like any 5xx, and a 4xx so cut is refused at once as a 4xx: neither is http.client's IncompleteRead
    escaping the retries as a traceback."""
    attempts = []

    def serve(listener):
        for _ in range(2 if retried else 1):  # then the thread ends, before the listener closes
            conn, _ = listener.accept()
            with conn:
                _read_request(conn)  # whole: a close with some of it unread would be a reset, not a cut-off body
                attempts.append(1)
                if len(attempts) == 1:
                    conn.sendall(b"HTTP/1.1 %d Oops\r\nContent-Length: 100\r\n\r\nupstream" % status)
                else:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"ok\": true}")

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        client = OpenAIClient(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", retries=2, backoff_s=0.01,
                              timeout_s=5.0)
        if retried:
            assert client.request("/chat/completions", {}) == {"ok": True}
        else:
            with pytest.raises(HTTPError, match=r"HTTP 400 \(not retried\): \(its body was cut off: IncompleteRead\)"):
                client.request("/chat/completions", {})
    assert len(attempts) == (2 if retried else 1)


def test_no_server_is_retried_then_reported():
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAIClient(f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.0, timeout_s=1.0)
    with pytest.raises(HTTPError, match=r"failed 2 times .*Connection refused"):
        client.request("/chat/completions", {})


def test_api_key_only_from_the_environment(monkeypatch):
    for name in ("RIL_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with FakeOpenAI() as server:
        _judge(server)([JudgeItem("q", "a", "a")])
        monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
        _judge(server)([JudgeItem("q", "a", "b")])
        monkeypatch.setenv("RIL_JUDGE_API_KEY", "sk-ril")  # takes precedence
        _judge(server)([JudgeItem("q", "a", "c")])
        assert OpenAIClient(server.url).first_model() == "fake-model"
        monkeypatch.setenv("RIL_JUDGE_API_KEY", "")  # set but empty: as if unset, not hiding OPENAI_API_KEY
        _judge(server)([JudgeItem("q", "a", "d")])
    auth = [headers.get("Authorization") for _, _, headers in server.requests]
    assert auth == [None, "Bearer sk-openai", "Bearer sk-ril", "Bearer sk-ril", "Bearer sk-openai"]


def test_serving_says_what_keeps_a_server_from_judging():
    """The trainer's start-up check of judge=http: a served model is fine, another model or no server is said
    in words, and a server without GET /models (404) is given the benefit of the doubt."""
    with FakeOpenAI() as server:
        client = OpenAIClient(server.url, retries=0, timeout_s=5.0)
        assert client.serving("fake-model") is None
        assert client.serving("other") == "it serves fake-model, not 'other'"
        assert OpenAIClient(server.url + "/elsewhere", retries=0).serving("fake-model") is None
        # a base URL given with a trailing slash: the routes are still /v1/..., not /v1//...
        assert HTTPJudge(server.url + "/", "fake-model", retries=0)([JudgeItem("q", "a", "a")]) == [True]
        assert OpenAIClient(server.url + "/", retries=0).serving("other") == "it serves fake-model, not 'other'"
    assert [path for path, _, _ in server.requests[-2:]] == ["/v1/chat/completions", "/v1/models"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    said = OpenAIClient(f"http://127.0.0.1:{port}/v1", retries=0, timeout_s=1.0).serving("fake-model")
    assert "failed 1 times" in said and "Connection refused" in said


class _Replies:
    """A stand-in for ``urllib.request.urlopen`` that plays ``replies`` in turn: an exception is raised, bytes are
    the body of an HTTP 200."""

    def __init__(self, *replies):
        self.replies = list(replies)

    def __call__(self, request, timeout=None):
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return io.BytesIO(reply)


def test_a_retry_after_holds_for_its_own_retry_only(monkeypatch):
    """A 429 asking for 30 s, then a dropped connection: the second wait is the back-off again, not another 30 s
    (the server's ask was for the retry after its 429)."""
    limited = urllib.error.HTTPError("http://h/v1/x", 429, "Too Many Requests", {"Retry-After": "30"}, io.BytesIO())
    monkeypatch.setattr("urllib.request.urlopen", _Replies(limited, urllib.error.URLError("refused"), b'{"ok": 1}'))
    waits = []
    monkeypatch.setattr("time.sleep", waits.append)
    assert OpenAIClient("http://h/v1", retries=2, backoff_s=0.01).request("/x", {}) == {"ok": 1}
    assert len(waits) == 2 and 30 <= waits[0] <= 37.5 and waits[1] < 1


@pytest.mark.parametrize("body, serving, first", [
    (b'{"data": []}', None, r"no model listed: '\{\"data\": \[\]\}'"),  # lists none: nothing to say against it
    (b'{"data": "x"}', None, r"no model listed"),
    (b"[1]", r"the reply is JSON but not an object: '\[1\]'", r"the reply is JSON but not an object: '\[1\]'"),
], ids=["empty_list", "not_a_list", "not_an_object"])
def test_a_models_list_that_lists_nothing(monkeypatch, body, serving, first):
    """GET /models answered with no model in it, or not in the shape of a list: ``serving`` finds nothing against
    the model when none is listed, and ``first_model`` is an HTTPError saying why, not a traceback."""
    client = OpenAIClient("http://h/v1", retries=0)
    monkeypatch.setattr("urllib.request.urlopen", _Replies(body, body))
    said = client.serving("m")
    assert said is None if serving is None else re.search(serving, said)
    with pytest.raises(HTTPError, match=first):
        client.first_model()


def test_the_first_call_that_fails_cancels_those_not_started():
    """One thread, ten calls, the first fails: the calls still queued are cancelled, not run after the error (a
    teacher's batch would go on posting requests for nothing)."""
    calls = []

    def call(x):
        calls.append(x)
        time.sleep(0.05)
        if x == 0:
            raise RuntimeError("boom")
        return x

    client = OpenAIClient("http://127.0.0.1:9/v1", concurrency=1)
    with pytest.raises(RuntimeError, match="boom"):
        client.map(call, list(range(10)))
    client._pool.shutdown(wait=True)
    assert len(calls) <= 2  # the failed one, and at most one the thread took before the cancelling
