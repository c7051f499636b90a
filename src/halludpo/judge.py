"""A judge model behind any OpenAI-compatible chat-completions endpoint, for benchmarks scored by a judge
(MMHal-Bench: halludpo.metrics.mmhal).

    judge = Judge.from_config(cfg.eval.judge)
    print(judge.estimate([messages, ...]).line())     # dry run: calls, tokens, cost; nothing is sent
    reply = judge.complete(messages, temperature=0.0)  # POST {base_url}/chat/completions, or the disk cache

- The model is pinned in the config (a dated snapshot, not an alias) and recorded with every reply, beside the
  model the endpoint says answered.
- The API key is read from the environment variable NAMED by ``api_key_env`` when a request is sent; it is never
  written to a file, a log or an error message.
- Every reply is cached on disk under ``cache_dir``, keyed by the sha256 of (model, messages, parameters): the
  same question is never paid for twice, and cached replies are read without a key or an endpoint.
- HTTP 429, 5xx, timeouts and connection errors are retried up to ``max_retries`` times with exponential backoff
  (``backoff`` seconds, doubling, at most ``backoff_max``; a longer Retry-After is honoured); other HTTP errors
  fail at once.
- Every failure is a :class:`JudgeError` whose message is one line.

Standard library only (urllib), so the judge adds no dependency.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RETRY_STATUS = frozenset({429}) | frozenset(range(500, 600))  # too many requests, server errors
# Rough token count for the dry-run estimate (no tokenizer dependency): about 4 characters of English text per
# token, plus 4 tokens of framing per message and 3 that prime the reply (OpenAI's chat-format accounting).
CHARS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3
TOKEN_ESTIMATE = "ceil(characters / 4) per message content + 4 per message + 3 per request"


class JudgeError(RuntimeError):
    """A judge failure; str() is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Reply:
    content: str
    model: str                      # the model the endpoint says answered
    requested_model: str            # the pinned model
    usage: dict[str, int]
    cached: bool
    key: str                        # the cache key: sha256 of (model, messages, parameters)


@dataclass(frozen=True)
class Estimate:
    calls: int                      # requests asked for
    cached: int                     # of which already in the cache (free)
    input_tokens: int               # rough count, uncached requests only (TOKEN_ESTIMATE)
    output_tokens: int              # max_tokens, or output_tokens_estimate, per uncached request
    cost: float                     # USD at the configured prices
    model: str
    method: str = field(default=TOKEN_ESTIMATE)

    @property
    def to_send(self) -> int:
        return self.calls - self.cached

    def line(self) -> str:
        return (f"judge {self.model}: {self.calls} calls ({self.cached} cached, {self.to_send} to send), "
                f"~{self.input_tokens} input + ~{self.output_tokens} output tokens, ~${self.cost:.4f}")


def estimate_tokens(messages: Messages) -> int:
    """Rough input tokens of one request: see TOKEN_ESTIMATE."""
    return TOKENS_PER_REPLY + sum(TOKENS_PER_MESSAGE + math.ceil(len(str(m.get("content", ""))) / CHARS_PER_TOKEN)
                                  for m in messages)


def request_key(model: str, messages: Messages, parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of (model, messages, parameters): the cache key."""
    canonical = json.dumps({"model": model, "messages": list(messages), "parameters": dict(parameters)},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class Judge:
    """An OpenAI-compatible chat-completions client with a disk cache, retries and a cost estimate."""

    def __init__(self, base_url: str | None, model: str, cache_dir: str | os.PathLike,
                 api_key_env: str = "OPENAI_API_KEY", max_retries: int = 5, timeout: float = 60.0,
                 backoff: float = 1.0, backoff_max: float = 60.0,
                 price_input_per_1k: float = 0.0, price_output_per_1k: float = 0.0,
                 output_tokens_estimate: int = 400, parameters: Mapping[str, Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not model:
            raise JudgeError("eval.judge.model is not set: pin the judge model (a dated snapshot)")
        if not isinstance(api_key_env, str) or not ENV_NAME.match(api_key_env):
            # the value is not echoed: it may be the key itself
            raise JudgeError("eval.judge.api_key_env must be the NAME of an environment variable that holds the key "
                             "(letters, digits, _), not the key")
        self.base_url = base_url.rstrip("/") if base_url else None
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.price_input_per_1k = price_input_per_1k
        self.price_output_per_1k = price_output_per_1k
        self.output_tokens_estimate = output_tokens_estimate
        self.parameters = dict(parameters or {})
        self.sleep = sleep
        self.sent = 0  # requests sent by this instance (attempts included)

    @classmethod
    def from_config(cls, judge: Mapping[str, Any], **overrides: Any) -> Judge:
        """From the eval.judge block (base_url, model, api_key_env, max_retries, timeout, backoff, backoff_max,
        price_input_per_1k, price_output_per_1k, output_tokens_estimate, cache_dir, parameters)."""
        keys = ("base_url", "model", "cache_dir", "api_key_env", "max_retries", "timeout", "backoff", "backoff_max",
                "price_input_per_1k", "price_output_per_1k", "output_tokens_estimate", "parameters")
        kwargs = {k: judge[k] for k in keys if k in judge and (judge[k] is not None or k == "base_url")}
        if "parameters" in kwargs:
            kwargs["parameters"] = dict(kwargs["parameters"])
        return cls(**(kwargs | overrides))

    # -- protocol ----------------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What a result file records about the judge (never the key)."""
        return {"endpoint": f"{self.base_url}/chat/completions" if self.base_url else None, "model": self.model,
                "parameters": self.parameters, "api_key_env": self.api_key_env, "cache_dir": str(self.cache_dir),
                "cache_key": "sha256 of (model, messages, parameters)"}

    def _parameters(self, parameters: Mapping[str, Any]) -> dict[str, Any]:
        return self.parameters | dict(parameters)

    # -- cache --------------------------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def cached(self, messages: Messages, **parameters: Any) -> Reply | None:
        """The cached reply to this request, or None."""
        params = self._parameters(parameters)
        key = request_key(self.model, messages, params)
        path = self._cache_path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return self._reply(entry["response"], key, cached=True)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, UnicodeDecodeError):
            log.warning("judge cache entry %s is unreadable; asking again", path)
            return None

    def _store(self, key: str, messages: Messages, params: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        path = self._cache_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "model": self.model, "messages": list(messages), "parameters": dict(params),
                 "response": response, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False, indent=1)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    # -- estimate -----------------------------------------------------------------------------------------------

    def estimate(self, requests: Iterable[Messages], **parameters: Any) -> Estimate:
        """Dry run over the requests (each a messages list, all with the same parameters): how many calls, how
        many already cached, rough tokens and cost of the rest. Sends nothing."""
        params = self._parameters(parameters)
        output_per_call = int(params.get("max_tokens") or self.output_tokens_estimate)
        calls = cached = input_tokens = output_tokens = 0
        for messages in requests:
            calls += 1
            if self._cache_path(request_key(self.model, messages, params)).is_file():
                cached += 1
                continue
            input_tokens += estimate_tokens(messages)
            output_tokens += output_per_call
        cost = input_tokens / 1000 * self.price_input_per_1k + output_tokens / 1000 * self.price_output_per_1k
        return Estimate(calls, cached, input_tokens, output_tokens, cost, self.model)

    # -- requests -----------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise a one-line JudgeError unless an endpoint and a key are configured."""
        self._endpoint_and_key()

    def _endpoint_and_key(self) -> tuple[str, str]:
        if not self.base_url:
            raise JudgeError("no judge endpoint: eval.judge.base_url is null (set it to an OpenAI-compatible base URL, "
                             "e.g. https://api.openai.com/v1)")
        key = os.environ.get(self.api_key_env, "")
        if not key.strip():
            raise JudgeError(f"no judge API key: environment variable {self.api_key_env} is not set "
                             "(eval.judge.api_key_env names it)")
        return f"{self.base_url}/chat/completions", key.strip()

    def complete(self, messages: Messages, **parameters: Any) -> Reply:
        """The judge's reply to `messages` (OpenAI chat format) with the configured parameters updated by
        `parameters`: from the cache, else from the endpoint (then cached)."""
        params = self._parameters(parameters)
        key = request_key(self.model, messages, params)
        hit = self.cached(messages, **parameters)
        if hit is not None:
            return hit
        url, api_key = self._endpoint_and_key()
        body = json.dumps({"model": self.model, "messages": list(messages), **params}).encode("utf-8")
        response = self._post(url, api_key, body)
        reply = self._reply(response, key, cached=False)  # malformed replies fail before they are cached
        self._store(key, messages, params, response)
        if reply.model and reply.model != self.model:
            log.warning("judge: asked for %s, the endpoint says %s answered", self.model, reply.model)
        return reply

    def _reply(self, response: Mapping[str, Any], key: str, cached: bool) -> Reply:
        try:
            content = response["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"judge reply without choices[0].message.content (keys: {sorted(response)})") from None
        usage = {k: int(v) for k, v in (response.get("usage") or {}).items() if isinstance(v, (int, float))}
        return Reply(content or "", str(response.get("model") or ""), self.model, usage, cached, key)

    def _post(self, url: str, api_key: str, body: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        attempts = self.max_retries + 1
        last = ""
        for attempt in range(attempts):
            retry_after = 0.0
            self.sent += 1
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    raw = answer.read()
                try:
                    return json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise JudgeError(f"judge endpoint {url}: the reply is not JSON ({raw[:80]!r})") from None
            except urllib.error.HTTPError as err:
                detail = _scrub(_error_detail(err), api_key)
                if err.code not in RETRY_STATUS:
                    raise JudgeError(f"judge endpoint {url}: HTTP {err.code} {detail}") from None
                last = f"HTTP {err.code} {detail}"
                retry_after = _retry_after(err.headers.get("Retry-After") if err.headers else None)
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", None) or err
                last = _scrub(f"{type(err).__name__}: {reason}", api_key)
            if attempt + 1 < attempts:
                delay = min(self.backoff * 2 ** attempt, self.backoff_max)
                delay = max(delay, min(retry_after, self.backoff_max))
                log.warning("judge: %s; retry %d/%d in %.1f s", last, attempt + 1, self.max_retries, delay)
                self.sleep(delay)
        raise JudgeError(f"judge endpoint {url}: gave up after {attempts} attempts ({last})")


def _error_detail(err: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error reply (OpenAI's {"error": {"message"}}), else its reason; short."""
    try:
        payload = json.loads(err.read().decode("utf-8", "replace"))
        message = payload.get("error", {}).get("message") if isinstance(payload.get("error"), dict) else None
        message = message or payload.get("error") or payload.get("message")
    except (ValueError, AttributeError, OSError):
        message = None
    text = str(message or err.reason or "")
    return text if len(text) <= 200 else text[:200] + "..."


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to the backoff
