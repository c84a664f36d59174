"""The http judge, and the small OpenAI-compatible client it and ``ril_fast.teacher`` talk through.

``OpenAIClient(url)`` posts JSON to ``{url}/chat/completions`` (or any route) of an OpenAI-compatible
server (vLLM, SGLang, llama.cpp, a hosted API); ``map`` runs calls on a pool of ``concurrency``
threads, so that many requests are in flight at once and the server can batch them. Standard library
only (urllib), one connection per request.

Errors, per request:
* a timeout (``timeout_s`` on connecting and on each read), a dropped connection, HTTP 408, 429 and HTTP
  5xx are retried up to ``retries`` times, after ``backoff_s``, 2·``backoff_s``, 4·``backoff_s``, ..., or
  after what a 429's or 503's ``Retry-After`` header asks (seconds or an HTTP date, at most
  ``RETRY_AFTER_MAX_S`` = 60 s) where that is longer; each wait is stretched by a random 0-25 % so that the
  pool's threads, turned away together, do not come back together. The most a request waits in all is
  1.25·``backoff_s``·(2^``retries`` - 1) without ``Retry-After`` (4.4 s at the defaults: 0.5 s, 3 retries), and
  1.25·60 s a retry with it (225 s at the defaults); after the last attempt ``HTTPError`` says the URL, the
  number of attempts and the last failure;
* any other HTTP status (a 400: bad model name, prompt too long) fails at once with the server's
  message: asking again gives the same answer;
* a reply that is not the JSON expected (an HTML page, a cut body) fails at once, quoting its start:
  it means a wrong URL or a server that is not OpenAI-compatible, which retrying does not fix.
The first request that fails for good cancels the calls not yet started and raises.

The API key comes from the environment only — ``RIL_JUDGE_API_KEY``, else ``OPENAI_API_KEY`` — and is
sent as ``Authorization: Bearer KEY``; none is sent when neither is set (a local vLLM needs none).

``HTTPJudge`` asks ``ril_fast.judge.judge_messages`` with ``max_tokens=1``, ``temperature=0`` and
``logprobs`` / ``top_logprobs``: one token, no generation beyond it. Its verdict is
``ril_fast.judge.decide`` on p("yes") and p("no") summed over the top log-probs of that token;
when the server returns no log-probs, or neither word is among them, the token itself decides (right
iff it reads "yes").
"""

import email.utils
import http.client
import json
import math
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ril_fast.judge import PROMPT_VERSION, JudgeItem, decide, judge_messages, verdict_word

API_KEY_ENV = ("RIL_JUDGE_API_KEY", "OPENAI_API_KEY")
# Failures worth another attempt: the server is slow, restarting or overloaded.
_TRANSIENT = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException, urllib.error.URLError)
RETRY_AFTER_MAX_S = 60.0  # the longest wait a Retry-After header gets (a longer one is cut to it)
_JITTER = 0.25  # each wait is stretched by up to this fraction, at random


class HTTPError(RuntimeError):
    """A request to an OpenAI-compatible server that failed for good; the message says why. ``status``: the HTTP
    status of a reply that was not retried (a 4xx other than 408 and 429), else None (retries spent, a malformed
    reply)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def api_key_from_env() -> str | None:
    """The API key from ``RIL_JUDGE_API_KEY`` or else ``OPENAI_API_KEY`` (None when neither is set)."""
    return next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)


class OpenAIClient:
    """JSON requests to the OpenAI-compatible API at ``url`` (e.g. ``http://127.0.0.1:8000/v1``)."""

    def __init__(self, url: str, *, concurrency: int = 16, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the server URL must start with http:// or https://, got {url!r}")
        if concurrency < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"need concurrency >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0, got "
                             f"{concurrency}, {retries}, {timeout_s}, {backoff_s}")
        self.url = url.rstrip("/")
        self.concurrency, self.timeout_s, self.retries, self.backoff_s = concurrency, timeout_s, retries, backoff_s
        self.api_key = api_key_from_env()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="ril-http")

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def request(self, route: str, body: dict | None = None) -> dict:
        """POST ``body`` (GET when None) to ``{url}{route}``; the reply's JSON object. Retries as the
        module docstring says; raises ``HTTPError`` when the request fails for good."""
        url = self.url + route
        data = None if body is None else json.dumps(body).encode()
        method = "GET" if body is None else "POST"
        last, retry_after = "", 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.wait_s(attempt, retry_after))
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(), method=method)
                with urllib.request.urlopen(req, timeout=self.timeout_s) as reply:
                    raw = reply.read()
            except urllib.error.HTTPError as e:
                try:
                    detail = _excerpt(e.read())
                except _TRANSIENT as cut:  # the error's body cut off or stalled (a proxy dropping the connection)
                    detail = f"(its body was cut off: {type(cut).__name__})"
                if e.code in (408, 429) or e.code >= 500:
                    last = f"HTTP {e.code}: {detail}"
                    retry_after = retry_after_s((e.headers or {}).get("Retry-After")) if e.code in (429, 503) else 0.0
                    continue
                raise HTTPError(f"{method} {url}: HTTP {e.code} (not retried): {detail}", status=e.code) from None
            except _TRANSIENT as e:
                last, retry_after = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}", 0.0
                continue
            return parse_json(raw, url)
        raise HTTPError(f"{method} {url}: failed {self.retries + 1} times (timeout {self.timeout_s} s, "
                        f"{self.retries} retries); last failure: {last}")

    def wait_s(self, attempt: int, retry_after: float = 0.0) -> float:
        """Seconds to wait before retry ``attempt`` (1, 2, ...): the back-off ``backoff_s``·2^(attempt-1), or the
        server's ``retry_after`` where longer, stretched by a random 0-25 %."""
        return max(self.backoff_s * 2 ** (attempt - 1), retry_after) * (1 + _JITTER * random.random())

    def map(self, fn, items: list) -> list:
        """``[fn(x) for x in items]`` with up to ``concurrency`` calls at once, results in order. The
        first call that raises cancels the calls not yet started; its exception is raised."""
        futures = [self._pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def serving(self, model: str) -> str | None:
        """What keeps this server from answering as ``model``, in words (None: nothing found): it cannot be
        reached (after the retries) or refuses the request, or it lists its models (``GET {url}/models``) and
        ``model`` is not one of them. A server without that route is given the benefit of the doubt."""
        try:
            reply = self.request("/models")
        except HTTPError as e:
            return None if "HTTP 404" in str(e) else str(e)
        listed = [m.get("id") for m in reply.get("data") or [] if isinstance(m, dict)]
        if listed and model not in listed:
            return f"it serves {', '.join(map(str, listed[:10]))}, not {model!r}"
        return None

    def first_model(self) -> str:
        """The id of the first model the server lists (``GET {url}/models``)."""
        reply = self.request("/models")
        try:
            return reply["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise HTTPError(f"GET {self.url}/models: no model listed: {_excerpt(json.dumps(reply))}") from None


def retry_after_s(value: str | None, now: float | None = None) -> float:
    """The seconds a ``Retry-After`` header ``value`` asks to wait (delta-seconds, "5", or an HTTP date, "Wed, 21
    Oct 2015 07:28:00 GMT", against ``now``, default ``time.time()``), within [0, ``RETRY_AFTER_MAX_S``]; 0 where
    there is none or it cannot be read."""
    if not value:
        return 0.0
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - (time.time() if now is None else now)
        except (TypeError, ValueError, OverflowError):  # neither a number nor a date
            return 0.0
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S) if math.isfinite(seconds) else 0.0


def _excerpt(raw: bytes | str, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def parse_json(raw: bytes, url: str) -> dict:
    """The JSON object of a reply body; ``HTTPError`` quoting the body when it is not one."""
    try:
        reply = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPError(f"{url}: the reply is not JSON ({e}); is this an OpenAI-compatible API? "
                        f"Body: {_excerpt(raw)}") from None
    if not isinstance(reply, dict):
        raise HTTPError(f"{url}: the reply is JSON but not an object: {_excerpt(raw)}")
    return reply


class HTTPJudge:
    """The http judge: an OpenAI-compatible chat model served at ``url``, as ``model`` (module docstring).

    ``concurrency`` requests in flight at once; ``timeout_s``, ``retries`` and ``backoff_s`` as in
    ``OpenAIClient``. The name (its cache identity) holds every setting that can change a verdict: the
    model, the prompt and how many top log-probs are summed, ``http:{model}:{PROMPT_VERSION}:top{top_logprobs}``.
    The URL and the request settings change none, so the same model behind another URL shares cached verdicts.
    """

    def __init__(self, url: str, model: str, *, concurrency: int = 16, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5, top_logprobs: int = 10):
        if not model:
            raise ValueError("the http judge needs the served model's name (judge_model=NAME)")
        self.client = OpenAIClient(url, concurrency=concurrency, timeout_s=timeout_s, retries=retries,
                                   backoff_s=backoff_s)
        self.model = model
        self.top_logprobs = top_logprobs
        self.name = f"http:{model}:{PROMPT_VERSION}:top{top_logprobs}"

    def body(self, item: JudgeItem) -> dict:
        """The /chat/completions request for ``item``: one greedy token with its top log-probs."""
        return {"model": self.model, "messages": judge_messages(item), "max_tokens": 1, "temperature": 0,
                "logprobs": True, "top_logprobs": self.top_logprobs}

    def verdict(self, item: JudgeItem) -> bool:
        """One request, one verdict."""
        reply = self.client.request("/chat/completions", self.body(item))
        try:
            choice = reply["choices"][0]
            token = choice["message"]["content"] or ""
            content = (choice.get("logprobs") or {}).get("content") or []
            top = (content[0].get("top_logprobs") or [content[0]]) if content else []
            p = {"yes": 0.0, "no": 0.0}
            for entry in top:
                word = verdict_word(entry["token"])
                if word:
                    p[word] += math.exp(entry["logprob"])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise HTTPError(f"{self.client.url}/chat/completions: malformed reply ({type(e).__name__}: {e}): "
                            f"{_excerpt(json.dumps(reply))}") from None
        if p["yes"] + p["no"] > 0:
            return decide(p["yes"], p["no"])
        return verdict_word(token.split()[0] if token.split() else "") == "yes"

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item, up to ``concurrency`` requests in flight."""
        return self.client.map(self.verdict, items)
