"""A small OpenAI-compatible server on 127.0.0.1 for the http judge and teacher tests, with injected faults.

It answers ``POST /v1/chat/completions`` and ``GET /v1/models``. A judge request (the prompt of
``ril_fast.judge.judge_messages``) is answered by the rule judge, as a one-token reply with top
log-probs; any other request gets a teacher-style reply naming the question, ``n`` choices of it
(``ignore_n=True``: one, whatever ``n`` asks for). A marker in the last user message injects a fault,
counted per distinct message (``attempts``):

    FAULT:slow        every attempt sleeps ``slow_s`` before replying (longer than the client's timeout)
    FAULT:slow-once   the first attempt sleeps ``slow_s``, later ones answer at once
    FAULT:500         every attempt is an HTTP 500
    FAULT:500x2       the first two attempts are HTTP 500s
    FAULT:408-once    the first attempt is an HTTP 408 (the server timed out waiting for the request)
    FAULT:429-once    the first attempt is an HTTP 429 with the header ``Retry-After: {retry_after}``
    FAULT:503-once    the first attempt is an HTTP 503 with the same header
    FAULT:400         an HTTP 400 with an error message (not to be retried)
    FAULT:malformed   HTTP 200 with a body that is not JSON
    FAULT:nochoices   HTTP 200 with JSON that has no ``choices``
"""

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ril_fast.judge import RuleJudge

_JUDGE_PROMPT = re.compile(r"Question: (.*)\nGround-truth answer: (.*)\nResponse: (.*)\n\nDoes the response", re.S)
_FAULT = re.compile(r"FAULT:([\w-]+)")


class FakeOpenAI:
    """Start with ``with FakeOpenAI() as server:``; ``server.url`` is the API base (``.../v1``).

    ``delay_s``: every reply waits this long. ``logprobs``: judge replies carry top log-probs (False: the
    token alone). ``slow_s``: the sleep of a slow fault. ``ignore_n``: teacher replies have one choice
    whatever ``n`` asks for (as a server without ``n``). ``retry_after``: the ``Retry-After`` header of a 429
    or 503 fault (seconds or an HTTP date). ``requests``: (path, body, headers) of every request seen;
    ``times``: when each attempt at each distinct message came (``time.monotonic()``); ``max_in_flight``: the most
    POSTs in flight at once.

    ``hold``: each POST is held until ``hold`` of them are in flight together, then those are answered
    (a ``threading.Barrier``, used again for the next ``hold``): a client that keeps ``hold`` requests in
    flight shows ``max_in_flight == hold`` however slowly it sends them, whatever sleep lengths. One that
    never has ``hold`` in flight fails the wait after ``hold_timeout_s``; from then on nothing is held,
    so its test fails on ``max_in_flight`` instead of hanging.
    """

    def __init__(self, *, delay_s: float = 0.0, slow_s: float = 1.0, logprobs: bool = True, ignore_n: bool = False,
                 hold: int = 0, hold_timeout_s: float = 30.0, retry_after: str = "1"):
        self.delay_s, self.slow_s, self.logprobs, self.ignore_n = delay_s, slow_s, logprobs, ignore_n
        self.retry_after = retry_after
        self.gate = threading.Barrier(hold, timeout=hold_timeout_s) if hold else None
        self.requests: list[tuple[str, dict, dict]] = []
        self.attempts: Counter = Counter()
        self.times: dict[str, list[float]] = {}
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.rule = RuleJudge(use_math_verify=False)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- replies ---------------------------------------------------------------------------------------
    def judge_reply(self, question: str, answer: str, response: str) -> dict:
        """The rule judge's verdict as a one-token chat completion. With log-probs the top token is "No"
        either way: when right, "yes" wins only on the sum of its two spellings (0.3 + 0.25 > 0.4)."""
        right = self.rule.check(answer, response)
        top = ([("No", 0.4), ("Yes", 0.3), (" yes", 0.25)] if right else
               [("No", 0.5), ("Yes", 0.2), (" yes", 0.1), ("The", 0.15)])
        token = top[0][0] if self.logprobs else "Yes" if right else "No"
        choice = {"index": 0, "message": {"role": "assistant", "content": token}, "finish_reason": "length"}
        if self.logprobs:
            entries = [{"token": t, "logprob": math.log(p)} for t, p in top]
            choice["logprobs"] = {"content": [dict(entries[0], top_logprobs=entries)]}
        return {"object": "chat.completion", "choices": [choice]}

    def teacher_reply(self, body: dict, text: str) -> dict:
        """``n`` teacher-style answers (one if ``ignore_n``), each naming the question, its choice index and
        how many images came with it."""
        images = sum(1 for m in body["messages"] if isinstance(m["content"], list)
                     for part in m["content"] if part.get("type") == "image_url")
        n = 1 if self.ignore_n else body.get("n", 1)
        return {"object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content":
                                                     f"About '{text}' (choice {i}): the answer, having seen "
                                                     f"{images} image(s)."},
                             "finish_reason": "stop"} for i in range(n)]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: bytes, ctype: str = "application/json", headers: dict | None = None):
                self._done()  # in flight until its reply starts: the client may send its next one at once
                try:
                    self.send_response(status)
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timed out) and closed the connection
                    pass

            def do_GET(self):
                fake.requests.append((self.path, {}, dict(self.headers)))
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"data": [{"id": "fake-model"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append((self.path, body, dict(self.headers)))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    self.in_flight = True
                try:
                    if fake.gate is not None:
                        try:
                            fake.gate.wait()
                        except threading.BrokenBarrierError:  # fewer than hold came: hold nothing from now on
                            pass
                    self._reply(body)
                finally:
                    self._done()

            def _done(self):
                with fake.lock:
                    if getattr(self, "in_flight", False):
                        fake.in_flight -= 1
                        self.in_flight = False

            def _reply(self, body: dict):
                last = body["messages"][-1]["content"]
                text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
                with fake.lock:
                    fake.attempts[text] += 1
                    attempt = fake.attempts[text]
                    fake.times.setdefault(text, []).append(time.monotonic())
                fault = (_FAULT.search(text) or [None, None])[1]
                time.sleep(fake.delay_s)
                if fault == "slow" or (fault == "slow-once" and attempt == 1):
                    time.sleep(fake.slow_s)
                if fault == "500" or (fault == "500x2" and attempt <= 2):
                    return self._send(500, b'{"error": "injected server error"}')
                if fault == "408-once" and attempt == 1:
                    return self._send(408, b'{"error": {"message": "injected: request timeout"}}')
                if fault in ("429-once", "503-once") and attempt == 1:
                    return self._send(int(fault[:3]), b'{"error": {"message": "injected: rate limit reached"}}',
                                      headers={"Retry-After": fake.retry_after})
                if fault == "400":
                    return self._send(400, b'{"error": {"message": "injected: this model does not exist"}}')
                if fault == "malformed":
                    return self._send(200, b"<html>not json{", "text/html")
                if fault == "nochoices":
                    return self._send(200, b'{"object": "chat.completion"}')
                prompt = _JUDGE_PROMPT.search(text)
                reply = fake.judge_reply(*prompt.groups()) if prompt else fake.teacher_reply(body, text)
                self._send(200, json.dumps(reply).encode())

        return Handler
