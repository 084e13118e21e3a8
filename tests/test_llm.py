"""llm.py against a real loopback HTTP server process (tests/fake_openai.py) scripted to fail as real servers fail:
Retry-After in each form, 5xx then 200, connection reset, a server that never answers, a body trickled a byte at a
time (cut at the deadline), 400, 401, 404 model, HTML, empty and null replies (retried, never cached), fenced JSON,
truncated JSON, refusals, replies no parser should die on (lone surrogates, NULs, invalid UTF-8, U+2028, 10 MB);
the URL check and the preflight (dead port, /models missing, 401, hang); plus the cache, the breaker, `map`, the key
never leaking and JSON validation. Waits are asserted from the server's log (arrival times, a client that hung up),
never from the test's clock. Tiny backoffs keep it fast.
Run: .venv/bin/python -m pytest -q tests/test_llm.py"""
import base64
import email.utils
import json
import sqlite3
import time

import pytest
import requests

import llm
from tests import fake_openai

KEY = "sk-test-SECRET-0123456789"
SCHEMA = {"title": "verdict", "type": "object", "required": ["score", "reason"], "additionalProperties": False,
          "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}, "reason": {"type": "string"}}}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server():
    proc, url = fake_openai.start("--models=fake-model,other-model")
    yield url
    fake_openai.stop(proc)


@pytest.fixture(autouse=True)
def reset(server):
    requests.post(server[:-3] + "/_reset", timeout=10)


def script(url, *actions, models=()):
    requests.post(url[:-3] + "/_script", json={"actions": list(actions), "models": list(models)},
                  timeout=10).raise_for_status()


def stats(url):
    return requests.get(url[:-3] + "/_stats", timeout=10).json()


def events(url, n, kind):
    """The server's first n events of `kind`, waiting (bounded) for the handler threads to log them."""
    for _ in range(200):
        got = [e for e in stats(url)["events"] if e["event"] == kind]
        if len(got) >= n:
            return got
        time.sleep(0.05)
    raise AssertionError(f"the server logged {len(got)} {kind} events, expected {n}")


def cached_bodies(path):
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT body FROM responses")]


def client(url, **kw):
    kw = dict(dict(api_key=KEY, connect_timeout=1.0, read_timeout=2.0, deadline=10.0, max_retries=3,
                   backoff_base=0.01, backoff_max=0.05, retry_after_max=5.0, concurrency=4), **kw)
    return llm.Client(url, "fake-model", **kw)


def test_retry_after_forms_parse():
    now = time.time()
    assert llm.parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert llm.parse_retry_after({"retry-after": "3"}) == 3.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert 5.5 < llm.parse_retry_after({"retry-after": date}, now=now) <= 7.0
    assert llm.parse_retry_after({"retry-after": "garbage"}) is None and llm.parse_retry_after({}) is None


@pytest.mark.parametrize("headers,min_wait", [({"retry-after-ms": "300"}, 0.3), ({"Retry-After": "1"}, 1.0),
                                              ({"Retry-After": "DATE"}, 0.0)])
def test_429_honours_retry_after(server, headers, min_wait):
    if headers.get("Retry-After") == "DATE":
        headers = {"Retry-After": email.utils.formatdate(time.time() + 1, usegmt=True)}
    script(server, {"status": 429, "headers": headers})
    reply = client(server).chat(MSG)
    st = stats(server)
    assert reply.text.startswith("Fake answer") and st["requests"] == 2
    assert st["times"][1] - st["times"][0] >= min_wait  # between the server's two arrivals


def test_retry_after_above_ceiling_defers_without_waiting(server, monkeypatch):
    sleeps = []
    monkeypatch.setattr(llm.time, "sleep", sleeps.append)
    script(server, {"status": 429, "headers": {"Retry-After": "3600"}})
    with pytest.raises(llm.ItemError) as e:
        client(server).chat(MSG)
    assert e.value.kind == "deferred" and e.value.retryable and sleeps == [] and stats(server)["requests"] == 1


def test_5xx_then_ok_and_connection_reset(server):
    script(server, {"status": 500}, {"status": 503}, {"reset": True})
    assert client(server).chat(MSG).text.startswith("Fake answer")
    assert stats(server)["requests"] == 4


def test_server_that_never_answers_times_out_within_deadline(server):
    script(server, {"hang": 30}, {"hang": 30})
    with pytest.raises(llm.ItemError) as e:
        client(server, read_timeout=0.3, max_retries=1).chat(MSG)
    assert e.value.kind == "timeout" and e.value.retryable
    assert stats(server)["requests"] == 2  # one retry, then given up
    assert all(e["abandoned"] for e in events(server, 2, "hang"))  # the client hung up; the server never answered


def test_400_not_retried_and_message_kept(server):
    msg = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
    script(server, {"status": 400, "body": {"error": {"message": msg}}})
    with pytest.raises(llm.ItemError) as e:
        client(server).chat(MSG)
    assert e.value.kind == "http_400" and "maximum context length" in str(e.value) and not e.value.retryable
    assert stats(server)["requests"] == 1


def test_401_aborts_naming_the_variable_and_scrubs_the_key(server):
    script(server, {"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {KEY}"}}})
    with pytest.raises(llm.FatalError) as e:
        client(server).chat(MSG)
    assert "OPENAI_API_KEY" in str(e.value) and KEY not in str(e.value) and "***" in str(e.value)
    assert stats(server)["requests"] == 1


def test_404_model_lists_served_models(server):
    with pytest.raises(llm.FatalError, match="'no-such-model' is not served.*fake-model, other-model"):
        llm.Client(server, "no-such-model", api_key=KEY).chat(MSG)


@pytest.mark.parametrize("action,kind", [({"html": True}, "html"), ({"raw": "{not json"}, "malformed"),
                                         ({"raw": "[1, 2]"}, "malformed"),
                                         ({"raw": '{"choices": {"0": 1}}'}, "malformed"),
                                         ({"raw": '{"choices": [1]}'}, "malformed"),
                                         ({"raw": '{"choices": [{"message": {"content": ["x"]}}]}'}, "malformed"),
                                         ({"raw": '{"choices": [{"message": "hi"}]}'}, "malformed"),
                                         ({"refusal": "I can't help with that."}, "refused"),
                                         ({"content": "x", "finish_reason": "content_filter"}, "filtered"),
                                         ({"content": "I'm sorry, I can't do that."}, "refused"),
                                         ({"content": "Sure! {\"score\": 2"}, "bad_json"),
                                         ({"content": "{\"score\": 7, \"reason\": \"r\"}"}, "schema"),
                                         ({"content": "{\"score\": 2}"}, "schema")])
def test_bad_bodies_classified_with_raw_text(server, action, kind):
    script(server, action)
    with pytest.raises(llm.ItemError) as e:
        client(server).chat(MSG, schema=SCHEMA)
    assert e.value.kind == kind and not e.value.retryable
    assert e.value.raw  # recorded with the raw text
    assert stats(server)["requests"] == 1  # none of these is retried


def test_json_in_fence_is_parsed(server):
    script(server, {"content": "```json\n{\"score\": 2, \"reason\": \"redirects\"}\n```"})
    assert client(server).chat(MSG, schema=SCHEMA).data == {"score": 2, "reason": "redirects"}


def test_length_retried_once_with_doubled_budget(server):
    script(server, {"content": "{\"score\": 1, \"rea", "finish_reason": "length"})
    reply = client(server).chat(MSG, schema=SCHEMA, max_tokens=100)
    assert reply.data["score"] == 1  # the fake's schema instance
    bodies = stats(server)["bodies"]
    assert [b["max_tokens"] for b in bodies] == [100, 200]
    script(server, {"content": "{", "finish_reason": "length"}, {"content": "{\"s", "finish_reason": "length"})
    with pytest.raises(llm.ItemError, match="truncated"):
        client(server).chat(MSG, schema=SCHEMA, max_tokens=100)


def test_one_token_verdict_with_logprobs(server):
    # the judge's RJScore call: one token, top_logprobs of "1".."5"; finish_reason "length" is expected there
    script(server, {"content": "2", "finish_reason": "length", "logprobs": [{"2": -0.2, "1": -1.8, "3": -3.0}]})
    reply = client(server).chat(MSG, tag="judge", max_tokens=1, logprobs=True, top_logprobs=3, allow_length=True)
    assert reply.text == "2" and reply.top_logprobs[0] == {"2": -0.2, "1": -1.8, "3": -3.0}
    assert stats(server)["requests"] == 1


def test_structured_output_falls_back_to_prompt_json(server):
    script(server, {"status": 400, "body": {"error": {"message": "response_format json_schema is not supported"}}},
           {"content": "{\"score\": 3, \"reason\": \"ok\"}"})
    c = client(server)
    assert c.chat(MSG, schema=SCHEMA).data["score"] == 3 and c.structured is False
    first, second = stats(server)["bodies"]
    assert "response_format" in first and "response_format" not in second
    assert "JSON schema" in second["messages"][-1]["content"]


def test_schema_sent_as_response_format_and_logprobs_returned(server):
    script(server, {"content": "{\"score\": 1, \"reason\": \"r\"}", "logprobs": [{"1": -0.05, "2": -3.0}]})
    reply = client(server).chat(MSG, schema=SCHEMA, logprobs=True, top_logprobs=2)
    assert reply.top_logprobs == [{"1": -0.05, "2": -3.0}]
    body = stats(server)["bodies"][0]
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA and body["top_logprobs"] == 2


def test_cache_never_pays_twice_and_holds_no_key(server, tmp_path):
    path = tmp_path / "cache.sqlite"
    c = client(server, cache_path=str(path))
    a = c.chat(MSG, tag="gen", temperature=0.5)
    b = c.chat(MSG, tag="gen", temperature=0.5)
    c.chat(MSG, tag="gen", temperature=0.6)  # a different request
    c.close()
    c2 = client(server, cache_path=str(path))  # a rerun
    assert c2.chat(MSG, tag="gen", temperature=0.5).cached
    assert a.text == b.text and b.cached and not a.cached and stats(server)["requests"] == 2
    assert c.usage["gen"]["calls"] == 2 and c.usage["gen"]["cached"] == 1
    for f in tmp_path.iterdir():
        assert KEY.encode() not in f.read_bytes()


def test_circuit_breaker_opens_and_stops_dispatch(server):
    script(server, *[{"status": 503}] * 3)
    c = client(server, max_retries=0, breaker=3)
    for _ in range(2):
        with pytest.raises(llm.ItemError):
            c.chat(MSG)
    with pytest.raises(llm.EndpointUnavailable, match="endpoint unavailable"):
        c.chat(MSG)
    with pytest.raises(llm.EndpointUnavailable):
        c.chat(MSG)  # no request sent any more
    assert stats(server)["requests"] == 3


def test_map_bounded_and_stops_on_fatal(server):
    c = client(server, concurrency=3)
    seen = []

    def work(i):
        seen.append(i)
        if i == 5:
            raise llm.FatalError("boom")
        if i == 2:
            raise llm.ItemError("bad_json", "x")
        return c.chat([{"role": "user", "content": f"item {i}"}]).text

    out = []
    with pytest.raises(llm.FatalError, match="boom"):
        for item, result, err in c.map(work, range(1000)):
            out.append((item, result, err))
    assert len(seen) <= 6 + 2 * 3  # dispatch stopped soon after the fatal item
    assert any(isinstance(e, llm.ItemError) for _, _, e in out)
    assert all(r.startswith("Fake answer") for _, r, e in out if e is None)


def test_offline_backend():
    seen = []

    def respond(messages, tag, meta):  # a script's offline responder (bench.offline_verdict, ...)
        seen.append((tag, meta))
        return json.dumps({"score": 1 if llm.is_refusal(meta["answer"]) else 5, "reason": "offline"})

    c = llm.Client("offline", "offline", offline=respond)
    c.preflight()  # a no-op: nothing to reach
    refusal = "I can't help with making that; if someone is in danger, call emergency services."
    assert c.chat(MSG, tag="judge", schema=SCHEMA, meta={"answer": refusal}).data == {"score": 1, "reason": "offline"}
    assert c.chat(MSG, tag="judge", meta={"answer": "Sure, step 1: ..."}).text == '{"score": 5, "reason": "offline"}'
    assert seen == [("judge", {"answer": refusal}), ("judge", {"answer": "Sure, step 1: ..."})]
    assert llm.is_refusal("I’m sorry, but I cannot assist.") and not llm.is_refusal("Here is how you stay safe.")
    with pytest.raises(llm.FatalError, match="offline responder"):
        llm.Client("offline", "offline")


def test_validate_rejects_not_clamps():
    llm.validate({"score": 5, "reason": "x"}, SCHEMA)
    for bad in ({"score": 0, "reason": "x"}, {"score": 2.5, "reason": "x"}, {"score": True, "reason": "x"},
                {"score": 1, "reason": "x", "extra": 1}, {"reason": "x"}):
        with pytest.raises(ValueError):
            llm.validate(bad, SCHEMA)
    assert llm.extract_json("```\n[1, 2]\n```") == [1, 2]


def test_missing_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="set llm_url"):
        llm.Client("", "m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:/v1")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        llm.Client("", "m")


# ----------------------------------------------------------------------------------------------------------------
# the URL check and the preflight


@pytest.mark.parametrize("url,why", [("http://127.0.0.1:/v1", "empty port"), ("http://127.0.0.1:0/v1", "port"),
                                     ("http://127.0.0.1:99999/v1", "port"), ("http://127.0.0.1:80a/v1", "port"),
                                     ("127.0.0.1:8000/v1", "http"), ("localhost:8000/v1", "http"),
                                     ("ftp://host/v1", "http"), ("http:///v1", "host"), ("http://:8000/v1", "host"),
                                     ("http://host /v1", "space"), ("http://host/v1?x=1", "query"),
                                     ("http://[::1/v1", "address")])
def test_check_url_rejects_bad_urls(url, why):
    with pytest.raises(ValueError, match=why) as e:
        llm.check_url(url)
    assert url in str(e.value) and str(e.value).count(". ") <= 1  # one sentence naming the URL (and the fix)
    with pytest.raises(ValueError):
        llm.Client(url, "m")  # before any work


def test_check_url_accepts_and_normalizes():
    assert llm.check_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert llm.check_url("https://api.example.com/v1/chat/completions") == "https://api.example.com/v1"
    assert llm.check_url("HTTP://[::1]:8000/v1") == "HTTP://[::1]:8000/v1"
    assert llm.check_url("http://host") == "http://host" and llm.check_url("offline") == "offline"


def test_preflight_lists_models_and_sends_no_chat(server):
    client(server).preflight()
    st = stats(server)
    assert st["models_requests"] == 1 and st["requests"] == 0


@pytest.mark.parametrize("status", [404, 405])
def test_preflight_falls_back_to_one_minimal_chat(server, status):
    script(server, models=[{"status": status}])
    client(server).preflight()
    st = stats(server)
    assert st["models_requests"] == 1 and st["requests"] == 1 and st["bodies"][0]["max_tokens"] == 1


def test_preflight_401_names_the_key_variable_and_scrubs_it(server):
    script(server, models=[{"status": 401, "body": {"error": {"message": f"Incorrect API key provided: {KEY}"}}}])
    with pytest.raises(llm.FatalError) as e:
        client(server).preflight()
    assert "OPENAI_API_KEY" in str(e.value) and "401" in str(e.value) and server in str(e.value)
    assert KEY not in str(e.value) and stats(server)["models_requests"] == 1


def test_preflight_with_a_wrong_key_against_a_keyed_server():
    proc, url = fake_openai.start("--key=the-right-key", "--models=fake-model")
    try:
        with pytest.raises(llm.FatalError) as e:
            client(url).preflight()
        assert "OPENAI_API_KEY" in str(e.value) and KEY not in str(e.value)
        client(url, api_key="the-right-key").preflight()
        assert stats(url)["models_requests"] == 2 and stats(url)["requests"] == 0
    finally:
        fake_openai.stop(proc)


def test_preflight_404_on_both_routes_names_the_url_variable(server):
    script(server, {"status": 404}, models=[{"status": 404}])
    with pytest.raises(llm.FatalError) as e:
        client(server).preflight()
    assert "OPENAI_BASE_URL" in str(e.value) and "404" in str(e.value) and server in str(e.value)


def test_preflight_retries_one_5xx(server):
    script(server, models=[{"status": 503}])
    client(server).preflight()
    assert stats(server)["models_requests"] == 2


def test_preflight_html_is_not_an_api(server):
    script(server, models=[{"html": True}])
    with pytest.raises(llm.FatalError, match="OPENAI_BASE_URL"):
        client(server).preflight()


def test_preflight_dead_port_fails_fast_naming_url_and_variable():
    c = llm.Client("http://127.0.0.1:9/v1", "m", api_key=KEY)
    t = time.monotonic()
    with pytest.raises(llm.EndpointUnavailable) as e:
        c.preflight()
    msg = str(e.value)
    assert "http://127.0.0.1:9/v1" in msg and "OPENAI_BASE_URL" in msg and "connection" in msg and KEY not in msg
    assert time.monotonic() - t < 10  # the bound for a dead endpoint (refused: milliseconds)


def test_preflight_hung_endpoint_gives_up_within_its_budget(server):
    script(server, models=[{"hang": 60}, {"hang": 60}, {"hang": 60}])
    with pytest.raises(llm.EndpointUnavailable, match="timeout"):
        client(server).preflight(deadline=1.0)
    assert stats(server)["models_requests"] <= 2
    assert all(e["abandoned"] for e in events(server, stats(server)["models_requests"], "hang"))


# ----------------------------------------------------------------------------------------------------------------
# the deadline holds whatever the server does


def test_trickled_body_is_cut_at_the_deadline(server):
    script(server, {"trickle": 0.1})  # ~400 bytes at 10 bytes/s: 40 s to read whole
    with pytest.raises(llm.ItemError) as e:
        client(server, read_timeout=2.0, deadline=1.0).chat(MSG)
    assert e.value.kind == "timeout" and e.value.retryable and "deadline" in str(e.value)
    (trickle,) = events(server, 1, "trickle")
    assert trickle["cut"] and trickle["sent"] < trickle["total"] / 2  # the client hung up mid-body
    assert stats(server)["requests"] == 1  # no attempt after the deadline


def test_trickled_error_body_is_cut_too(server):
    script(server, {"status": 503, "trickle": 0.1, "body": {"error": {"message": "x" * 400}}})
    with pytest.raises(llm.ItemError, match="deadline"):
        client(server, read_timeout=2.0, deadline=1.0).chat(MSG)
    assert events(server, 1, "trickle")[0]["cut"]


# ----------------------------------------------------------------------------------------------------------------
# no reply can poison a run: stored safely and parsed, or an ItemError with its reason


def b64(data):
    return base64.b64encode(data).decode()


def reply_bytes(content):
    return b'{"choices": [{"message": {"content": "' + content + b'"}, "finish_reason": "stop"}]}'


@pytest.mark.parametrize("action,text", [
    ({"content": "Half an emoji \ud83d"}, "Half an emoji \ufffd"),  # a proxy that cut by UTF-16 length
    ({"content": "lone low \ude00 and a pair \ud83d\ude00"}, "lone low \ufffd and a pair \U0001f600"),
    ({"content": "nul\x00here"}, "nulhere"),
    ({"content": "line\u2028separator\u2029"}, "line\u2028separator\u2029"),  # valid text, kept
    ({"raw_b64": b64(reply_bytes(b"bad \xff\xfe utf-8 \xe2\x82"))}, "bad \ufffd\ufffd utf-8 \ufffd"),
    ({"raw_b64": b64(reply_bytes(b"raw nul \x00 byte and raw\ttab"))}, "raw nul  byte and raw\ttab"),
    ({"raw_b64": b64(b"\xef\xbb\xbf" + reply_bytes(b"after a BOM"))}, "after a BOM"),
    ({"raw_b64": b64(reply_bytes(b"escaped \\ud83d then \\u0000 nul"))}, "escaped \ufffd then  nul"),
])
def test_hostile_text_is_stored_safely_and_parsed(server, tmp_path, action, text):
    path = str(tmp_path / "cache.sqlite")
    script(server, action)
    c = client(server, cache_path=path)
    reply = c.chat(MSG)
    assert reply.text == text
    json.dumps(reply.text, ensure_ascii=False).encode("utf-8")  # a record of it can be written
    assert c.chat(MSG).cached and c.chat(MSG).text == text  # the cache holds it and gives back the same
    c.close()
    (body,) = cached_bodies(path)
    body.encode("utf-8")  # no surrogates, no NUL in the stored body
    assert "\x00" not in body and stats(server)["requests"] == 1


def test_hostile_text_in_a_verdict_and_in_logprobs(server):
    script(server, {"content": '{"score": 2, "reason": "ok \ud83d"}', "logprobs": [{"\ud83d": -0.1, "2": -2.0}]})
    reply = client(server).chat(MSG, schema=SCHEMA, logprobs=True, top_logprobs=2)
    assert reply.data == {"score": 2, "reason": "ok \ufffd"} and reply.top_logprobs == [{"\ufffd": -0.1, "2": -2.0}]


def test_hostile_text_in_the_request(server, tmp_path):
    # an answer ending in half an emoji, shown to the judge: keyed, cached and sent without a UnicodeEncodeError
    messages = [{"role": "user", "content": "answer: \ud83d"}]
    assert len(llm.request_key({"messages": messages})) == 64
    c = client(server, cache_path=str(tmp_path / "cache.sqlite"))
    c.chat(messages)
    assert c.chat(messages).cached
    assert stats(server)["bodies"][0]["messages"][0]["content"] == "answer: \ufffd"


def test_oversize_body_is_a_bad_reply_never_cached(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    script(server, {"big": 10_000_000})
    c = client(server, cache_path=path)
    with pytest.raises(llm.ItemError) as e:
        c.chat(MSG)
    assert e.value.kind == "too_large" and not e.value.retryable and "max_reply_bytes" in str(e.value)
    c.close()
    assert cached_bodies(path) == [] and stats(server)["requests"] == 1


@pytest.mark.parametrize("empty", [{"content": None}, {"content": "  \n"}, {"choices": []},
                                   {"raw": '{"choices": [{"message": {}, "finish_reason": "stop"}]}'}])
def test_empty_reply_is_retried_and_never_cached(server, tmp_path, empty):
    path = str(tmp_path / "cache.sqlite")
    script(server, empty, empty)  # a transient fault: the third attempt answers
    c = client(server, cache_path=path, empty_retries=2)
    assert c.chat(MSG).text.startswith("Fake answer") and stats(server)["requests"] == 3
    assert c.usage["chat"]["calls"] == 3  # every paid call is counted
    c.close()
    (body,) = cached_bodies(path)
    assert "Fake answer" in body


def test_empty_reply_every_time_drops_the_item_and_a_rerun_asks_again(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    script(server, *[{"content": None}] * 3)
    c = client(server, cache_path=path, empty_retries=2)
    with pytest.raises(llm.ItemError) as e:
        c.chat(MSG)
    assert e.value.kind == "empty_reply" and not e.value.retryable and e.value.raw
    assert stats(server)["requests"] == 3 and cached_bodies(path) == []
    assert c.chat(MSG).text.startswith("Fake answer") and stats(server)["requests"] == 4  # the rerun: not memorised


def test_empty_reply_in_an_old_cache_is_asked_again(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    c = client(server, cache_path=path)
    c.cache.put(llm.request_key(c._body(MSG, None, {})), json.dumps({"choices": [{"message": {"content": None}}]}))
    assert c.chat(MSG).text.startswith("Fake answer") and stats(server)["requests"] == 1
    assert c.chat(MSG).cached


def test_truncated_reply_is_never_cached(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    script(server, {"content": "{", "finish_reason": "length"}, {"content": "{\"s", "finish_reason": "length"})
    c = client(server, cache_path=path)
    with pytest.raises(llm.ItemError) as e:
        c.chat(MSG, schema=SCHEMA, max_tokens=100)
    assert e.value.kind == "truncated" and not e.value.retryable
    assert cached_bodies(path) == [] and stats(server)["requests"] == 2
    assert c.chat(MSG, schema=SCHEMA, max_tokens=100).data["score"] == 1  # a rerun asks again
