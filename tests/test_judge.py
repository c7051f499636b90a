"""The judge client against a test server on 127.0.0.1 that speaks the chat-completions protocol with scripted
answers, and MMHal-Bench's scoring on scripted judge replies."""

from __future__ import annotations

import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from halludpo.judge import Judge, JudgeError, estimate_tokens, request_key
from halludpo.metrics import mmhal
from tests.conftest import serving

MODEL = "judge-model-2024-01-01"
KEY = "test-key-0123456789"
KEY_ENV = "HALLUDPO_TEST_JUDGE_KEY"


def completion(content: str, model: str = MODEL) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


class ChatTestServer(ThreadingHTTPServer):
    """A test server for POST /v1/chat/completions: answers from `script` in order, each (status, body, headers);
    when the script runs out it echoes the last user message. Records every request it receives."""

    daemon_threads = True

    def __init__(self, script=()):
        super().__init__(("127.0.0.1", 0), ChatTestHandler)
        self.script = list(script)
        self.requests: list[dict] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatTestHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.path != "/v1/chat/completions":
            status, payload, headers = 404, {"error": {"message": "no such route"}}, {}
        elif self.server.script:
            status, payload, headers = self.server.script.pop(0)
        else:
            status, payload, headers = 200, completion("echo: " + body["messages"][-1]["content"]), {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def make_judge(base_url, tmp_path, **kwargs) -> tuple[Judge, list[float]]:
    sleeps: list[float] = []
    options = dict(api_key_env=KEY_ENV, max_retries=3, timeout=5, backoff=0.5, price_input_per_1k=0.01,
                   price_output_per_1k=0.03, output_tokens_estimate=300, parameters={"temperature": 0.0},
                   sleep=sleeps.append) | kwargs
    return Judge(base_url, MODEL, tmp_path / "cache", **options), sleeps


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- requests and the cache ----------------------------------------------------------------------------------


def test_request_carries_pinned_model_key_and_parameters(tmp_path):
    with serving(ChatTestServer([(200, completion("fine", model=MODEL + "-served"), {})])) as server:
        judge, _ = make_judge(server.base_url, tmp_path)
        reply = judge.complete(ask("hello"), max_tokens=20)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {KEY}"
    assert request["body"] == {"model": MODEL, "messages": ask("hello"), "temperature": 0.0, "max_tokens": 20}
    assert (reply.content, reply.requested_model, reply.model) == ("fine", MODEL, MODEL + "-served")
    assert reply.usage == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert not reply.cached


def test_second_call_comes_from_the_cache(tmp_path):
    with serving(ChatTestServer()) as server:
        judge, _ = make_judge(server.base_url, tmp_path)
        first = judge.complete(ask("is there a dog?"))
        second = judge.complete(ask("is there a dog?"))
        assert len(server.requests) == 1  # the second call did not reach the server
        assert second.cached and not first.cached
        assert (second.content, second.model, second.key) == (first.content, first.model, first.key)
        # another parameter or another model is another request
        judge.complete(ask("is there a dog?"), temperature=0.7)
        assert len(server.requests) == 2
    assert first.key == request_key(MODEL, ask("is there a dog?"), {"temperature": 0.0})
    # the cache is on disk: a new client with neither endpoint nor key still reads it
    offline, _ = make_judge(None, tmp_path, api_key_env="HALLUDPO_UNSET_VARIABLE")
    assert offline.complete(ask("is there a dog?")).content == "echo: is there a dog?"
    cache_text = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert KEY not in cache_text and MODEL in cache_text


def test_retries_after_500_and_429_with_backoff(tmp_path):
    script = [(500, {"error": {"message": "upstream broke"}}, {}),
              (429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
              (200, completion("third time"), {})]
    with serving(ChatTestServer(script)) as server:
        judge, sleeps = make_judge(server.base_url, tmp_path)
        assert judge.complete(ask("x")).content == "third time"
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]  # backoff 0.5 s, doubling


def test_retry_after_longer_than_the_backoff_is_honoured(tmp_path):
    script = [(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}), (200, completion("ok"), {})]
    with serving(ChatTestServer(script)) as server:
        judge, sleeps = make_judge(server.base_url, tmp_path)
        judge.complete(ask("x"))
    assert sleeps == [7.0]


def test_gives_up_after_max_retries_in_one_line(tmp_path):
    script = [(503, {"error": {"message": "overloaded"}}, {})] * 4
    with serving(ChatTestServer(script)) as server:
        judge, sleeps = make_judge(server.base_url, tmp_path)
        with pytest.raises(JudgeError, match=r"gave up after 4 attempts \(HTTP 503 overloaded\)") as err:
            judge.complete(ask("x"))
    assert len(server.requests) == 4 and sleeps == [0.5, 1.0, 2.0]
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached


def test_connection_errors_are_retried(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge, sleeps = make_judge(f"http://127.0.0.1:{port}/v1", tmp_path, max_retries=2)
    with pytest.raises(JudgeError, match="gave up after 3 attempts") as err:
        judge.complete(ask("x"))
    assert sleeps == [0.5, 1.0] and "\n" not in str(err.value)


def test_client_errors_fail_at_once_without_the_key(tmp_path):
    script = [(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, {})]
    with serving(ChatTestServer(script)) as server:
        judge, sleeps = make_judge(server.base_url, tmp_path)
        with pytest.raises(JudgeError, match="HTTP 401 Incorrect API key provided") as err:
            judge.complete(ask("x"))
    assert len(server.requests) == 1 and sleeps == []
    assert KEY not in str(err.value) and "***" in str(err.value)


def test_missing_key_is_one_line_and_sends_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with serving(ChatTestServer()) as server:
        judge, _ = make_judge(server.base_url, tmp_path)
        with pytest.raises(JudgeError) as err:
            judge.complete(ask("x"))
        assert server.requests == []
    assert str(err.value) == (f"no judge API key: environment variable {KEY_ENV} is not set "
                              "(eval.judge.api_key_env names it)")


def test_missing_endpoint_is_one_line(tmp_path):
    judge, _ = make_judge(None, tmp_path)
    with pytest.raises(JudgeError, match=r"^no judge endpoint: eval.judge.base_url is null") as err:
        judge.check()
    assert "\n" not in str(err.value)


def test_a_key_in_place_of_its_variable_name_is_refused_without_echoing_it(tmp_path):
    with pytest.raises(JudgeError, match="NAME of an environment variable") as err:
        make_judge(None, tmp_path, api_key_env="sk-proj-abc.def")
    assert "sk-proj" not in str(err.value)


def test_from_config_block(tmp_path):
    block = {"base_url": None, "model": MODEL, "api_key_env": KEY_ENV, "max_retries": 2, "timeout": 9,
             "backoff": 0.1, "backoff_max": 5.0, "price_input_per_1k": 0.5, "price_output_per_1k": 1.5,
             "output_tokens_estimate": 10, "cache_dir": str(tmp_path / "c"), "parameters": {"temperature": 0.0}}
    judge = Judge.from_config(block)
    assert (judge.base_url, judge.model, judge.max_retries, judge.timeout) == (None, MODEL, 2, 9)
    assert judge.describe() == {"endpoint": None, "model": MODEL, "parameters": {"temperature": 0.0},
                                "api_key_env": KEY_ENV, "cache_dir": str(tmp_path / "c"),
                                "cache_key": "sha256 of (model, messages, parameters)"}


# --- the dry-run estimate ------------------------------------------------------------------------------------


def test_estimate_counts_calls_tokens_and_cost_before_any_call(tmp_path):
    requests = [ask("a" * 400), ask("b" * 401), ask("a" * 400)]
    # ceil(400 / 4) + 4 per message + 3 per request = 107; ceil(401 / 4) + 7 = 108
    assert [estimate_tokens(r) for r in requests] == [107, 108, 107]
    with serving(ChatTestServer()) as server:
        judge, _ = make_judge(server.base_url, tmp_path)
        first = judge.estimate(requests)
        assert server.requests == []  # the estimate sends nothing
        assert (first.calls, first.cached, first.to_send) == (3, 0, 3)
        assert (first.input_tokens, first.output_tokens) == (322, 900)
        assert first.cost == pytest.approx(322 / 1000 * 0.01 + 900 / 1000 * 0.03)
        judge.complete(ask("a" * 400))
        second = judge.estimate(requests)  # both copies of the cached request are free now
    assert (second.calls, second.cached, second.input_tokens, second.output_tokens) == (3, 2, 108, 300)
    assert second.cost == pytest.approx(0.00108 + 0.009)
    assert second.line() == (f"judge {MODEL}: 3 calls (2 cached, 1 to send), ~108 input + ~300 output tokens, "
                             "~$0.0101")
    # max_tokens, when given, is the output estimate
    assert judge.estimate([ask("z")], max_tokens=50).output_tokens == 50


# --- MMHal-Bench ---------------------------------------------------------------------------------------------


def record(i: int, kind: str) -> dict:
    return {"question_type": kind, "image_id": f"img{i}", "image_content": ["Dog", "Umbrella"],
            "question": f"Question {i}?", "gt_answer": f"Standard answer {i}.", "model_answer": f"Answer {i}."}


def test_judge_prompt_fills_the_template():
    prompt = mmhal.judge_prompt(record(1, "attribute"))
    assert prompt.startswith("Please act as an impartial and objective judge and evaluate the quality")
    assert prompt.endswith("### Image Contents\nDog, Umbrella\n\n### Question\nQuestion 1?\n\n"
                           "### Standard Human-Generated Answer\nStandard answer 1.\n\n"
                           "### LMM Response to Evaluate\nAnswer 1.\n")
    for rating, meaning in mmhal.RATING_SCALE.items():
        assert f"- Rating: {rating}, {meaning}\n" in prompt
    assert mmhal.judge_messages(record(1, "attribute")) == [{"role": "user", "content": prompt}]
    with pytest.raises(ValueError, match="model_answer"):
        mmhal.judge_prompt({k: v for k, v in record(1, "x").items() if k != "model_answer"})


@pytest.mark.parametrize(("reply", "rating"), [
    ("The answer is correct.\nRating: 6, very informative with good analysis or reasoning", 6),
    ("Explanation... rating: 2", 2),
    ("RATING: 4", 4),
    ("Rating: 5. To repeat, Rating: 5", 5),   # the same rating twice is one rating
    ("Rating: 3 or maybe Rating: 5", None),    # two ratings: none (scored 0)
    ("I cannot rate this.", None),
    ("Rating:4", None),                       # the original needs "rating: " with the space
])
def test_parse_rating(reply, rating):
    assert mmhal.parse_rating(reply) == rating


def test_score_by_hand():
    ratings = [6, 2, 4, None, 3, 0, 5, 1]
    metrics = mmhal.score(ratings)
    # None counts as 0: (6 + 2 + 4 + 0 + 3 + 0 + 5 + 1) / 8 = 21 / 8; below 3: 2, 0, 0, 1 -> 4 / 8
    assert metrics["average_score"] == pytest.approx(21 / 8)
    assert metrics["hallucination_rate"] == pytest.approx(4 / 8)
    assert metrics["n"] == 8 and metrics["n_unparsed"] == 1
    # position i % 8 gives the type when records carry none: one rating per type here
    assert metrics["per_type"] == dict(zip(mmhal.QUESTION_TYPES, [6, 2, 4, 0, 3, 0, 5, 1]))
    two_types = mmhal.score([6, 2, 4], ["counting", "counting", "other"])["per_type"]
    assert two_types == {"counting": 4.0, "other": 4.0}


def test_evaluate_through_the_judge(tmp_path):
    replies = ["Accurate and detailed. Rating: 6, very informative with good analysis or reasoning, no hallucination",
               "It claims a cat that is not there. Rating: 1, somewhat informative, with hallucination",
               "No false claim, little content. Rating: 3",
               "Hard to say."]
    records = [record(0, "attribute"), record(1, "adversarial"), record(2, "attribute"), record(3, "counting")]
    with serving(ChatTestServer([(200, completion(r), {}) for r in replies])) as server:
        judge, _ = make_judge(server.base_url, tmp_path)
        dry = mmhal.estimate(records, judge)
        assert (dry.calls, dry.cached) == (4, 0) and server.requests == []
        result = mmhal.evaluate(records, judge)
        assert len(server.requests) == 4
        assert all(r["body"]["temperature"] == 0.0 and r["body"]["model"] == MODEL for r in server.requests)
        assert server.requests[1]["body"]["messages"] == mmhal.judge_messages(records[1])
        again = mmhal.evaluate(records, judge)  # every reply from the cache
        assert len(server.requests) == 4
    m = result["metrics"]
    assert [item["rating"] for item in result["items"]] == [6, 1, 3, None]
    assert m["average_score"] == pytest.approx((6 + 1 + 3 + 0) / 4)
    assert m["hallucination_rate"] == pytest.approx(2 / 4)  # 1 and the unparsed reply (0)
    assert m["per_type"] == {"attribute": 4.5, "adversarial": 1.0, "counting": 0.0}
    assert result["protocol"]["judge"]["model"] == MODEL
    assert result["protocol"]["judge_models_answering"] == [MODEL]
    assert result["protocol"]["usage"] == {"prompt_tokens": 44, "completion_tokens": 28}
    assert not result["protocol"]["complete"]  # 4 of MMHal-Bench's 96 questions
    assert again["metrics"] == m and all(item["cached"] for item in again["items"])
    assert again["protocol"]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
