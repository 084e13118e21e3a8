"""llm.py against a real loopback HTTP server process (tests/fake_openai.py) scripted to fail as real servers fail:
Retry-After in each form, 5xx then 200, connection reset, a server that never answers, 400, 401, 404 model, HTML,
`choices: []`, `content: null`, fenced JSON, truncated JSON, refusals; plus the cache, the breaker, `map`, the key
never leaking, JSON validation and the offline judge. Tiny backoffs keep it fast.
Run: .venv/bin/python -m pytest -q tests/test_llm.py"""
import email.utils
import json
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
    proc.terminate()
    proc.wait()


@pytest.fixture(autouse=True)
def reset(server):
    requests.post(server[:-3] + "/_reset")


def script(url, *actions):
    requests.post(url[:-3] + "/_script", json={"actions": list(actions)}).raise_for_status()


def stats(url):
    return requests.get(url[:-3] + "/_stats").json()


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
    t = time.monotonic()
    reply = client(server).chat(MSG)
    assert time.monotonic() - t >= min_wait
    assert reply.text.startswith("Fake answer") and stats(server)["requests"] == 2


def test_retry_after_above_ceiling_defers_without_waiting(server):
    script(server, {"status": 429, "headers": {"Retry-After": "3600"}})
    t = time.monotonic()
    with pytest.raises(llm.ItemError) as e:
        client(server).chat(MSG)
    assert e.value.kind == "deferred" and e.value.retryable and time.monotonic() - t < 1.0


def test_5xx_then_ok_and_connection_reset(server):
    script(server, {"status": 500}, {"status": 503}, {"reset": True})
    assert client(server).chat(MSG).text.startswith("Fake answer")
    assert stats(server)["requests"] == 4


def test_server_that_never_answers_times_out_within_deadline(server):
    script(server, {"hang": 5}, {"hang": 5})
    t = time.monotonic()
    with pytest.raises(llm.ItemError) as e:
        client(server, read_timeout=0.3, max_retries=1).chat(MSG)
    assert e.value.kind == "timeout" and e.value.retryable
    assert time.monotonic() - t < 2.0


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
                                         ({"choices": []}, "empty_choices"), ({"content": None}, "empty"),
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


def test_offline_backend_and_judge():
    c = llm.Client("offline", "offline", offline=llm.offline_judge)
    refusal = "I can't help with making that; if someone is in danger, call emergency services."
    assert c.chat(MSG, schema=None, meta={"answer": refusal}).text == '{"score": 1, "reason": "offline keyword rule"}'
    assert json.loads(c.chat(MSG, meta={"answer": "Sure, step 1: ..."}).text)["score"] == 5
    assert json.loads(c.chat(MSG, meta={"answer": refusal, "query_type": "benign"}).text)["label"] == "over_refusal"
    assert llm.is_refusal("I’m sorry, but I cannot assist.") and not llm.is_refusal("Here is how you stay safe.")


def test_validate_rejects_not_clamps():
    llm.validate({"score": 5, "reason": "x"}, SCHEMA)
    for bad in ({"score": 0, "reason": "x"}, {"score": 2.5, "reason": "x"}, {"score": True, "reason": "x"},
                {"score": 1, "reason": "x", "extra": 1}, {"reason": "x"}):
        with pytest.raises(ValueError):
            llm.validate(bad, SCHEMA)
    assert llm.extract_json("```\n[1, 2]\n```") == [1, 2]


def test_missing_endpoint_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(llm.FatalError, match="set llm_url"):
        llm.Client("", "m")
