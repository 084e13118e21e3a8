"""
One client for every LLM call in the project (pair generation, judging): OpenAI-compatible chat completions over
`requests`, made safe to run 350,000 times against a flaky endpoint.

    client = Client(url, model, concurrency=8, cache_path="out/llm_cache.sqlite")   # a bad URL: ValueError
    client.preflight()                                                                    # before any work
    reply = client.chat(messages, tag="chosen", temperature=0.7, max_tokens=512)        # reply.text
    reply = client.chat(messages, tag="verify", schema=VERDICT_SCHEMA)                     # reply.data (validated)
    for item, result, error in client.map(work, items): ...                               # as they complete

- url: `llm_url`, else $OPENAI_BASE_URL (e.g. http://host:8000/v1), checked by `check_url` (scheme, host, port);
  key: $OPENAI_API_KEY (optional for local servers). The key lives only in the Authorization header: it is scrubbed
  from every message and never stored.
- Preflight: one GET /models (or, where that is not served, one one-token chat call) fails a dead endpoint, a wrong
  URL or a bad key in seconds, with the URL, the status and the variable to fix.
- Failures: connection errors, timeouts, 408/409/429/5xx are retried with exponential backoff and full jitter;
  `retry-after-ms` / `Retry-After` (seconds or HTTP date) are honoured, and a wait above `retry_after_max` defers
  the item (ItemError, retryable) instead of parking a worker. 400 is not retried (ItemError with the server's
  message; a 400 about `response_format` switches the client to prompt-only JSON). 401/403 and 404 raise FatalError
  (stop the run). `breaker` consecutive transport failures raise EndpointUnavailable: callers flush and exit
  non-zero, and a rerun resumes. `deadline` bounds one call, retries and body included: bodies are streamed and the
  clock checked between socket reads, so a server that trickles bytes cannot hold a call past it.
- Hostile replies: a body is decoded as UTF-8 (invalid bytes -> U+FFFD, NUL bytes dropped); every string parsed from
  it has lone surrogates (half an emoji) replaced by U+FFFD and NULs removed (`clean`), so any reply can be written,
  hashed and stored; a body above `max_reply_bytes` is an ItemError (too_large). Empty replies (no choices, null or
  blank content) are asked again up to `empty_retries` times, then an ItemError (empty_reply).
- Cache: SQLite (WAL) of raw 200 bodies (as decoded above; JSON escapes such as \\ud83d stay ASCII escapes) keyed by
  sha256 of the request body (model, messages, parameters), so a crash, a rerun or a parser fix never pays for the
  same call twice. Only the model's answers are cached (a refusal or an invalid verdict included); a malformed,
  empty or truncated reply never is, so a transient fault is not memorised.
- Accounting: client.usage[tag] = {calls, cached, prompt_tokens, completion_tokens} from each reply's `usage`;
  client.cost() prices them with `prices` ($ per 1M prompt / completion tokens). Cached replies cost nothing.
- Offline backend (url "offline"): no HTTP; the script's `offline(messages, tag, meta) -> str` makes the reply text
  (generate_pairs.offline_reply, bench.offline_verdict). A smoke-test backend for CI and the demo, not a model.

  Real judges may ask for `logprobs=True, top_logprobs=5`; reply.top_logprobs then holds, per generated token,
  {token: logprob} of the alternatives (None when the server sent none, e.g. offline). A one-token score
  (`max_tokens=1`) ends with finish_reason "length": pass `allow_length=True`. Text from models shown to a judge
  belongs inside delimiters whose boundary is a hash of that text (unguessable by it, yet stable, so cacheable).
"""
import concurrent.futures as cf
import email.utils
import hashlib
import json
import os
import random
import re
import sqlite3
import string
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import requests
import urllib3

RETRY_STATUS = {408, 409, 429}  # plus every 5xx
UNCACHED = ("malformed", "empty_reply")  # transient faults, not the model's answer: asked again, never memorised
SURROGATE_RE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs, so any left in a str is lone
REFUSAL_RE = re.compile(
    r"\b(i\s*(?:am|'m|’m)\s*(?:sorry|unable|not able)|i\s*(?:can\s*not|cannot|can't|can’t|won't|won’t|will not)"
    r"|unable to (?:help|assist|provide)|not able to (?:help|assist|provide)|as an ai\b)", re.I)


class FatalError(RuntimeError):
    """The run cannot continue (bad key, unknown model, config): stop dispatching, flush, exit non-zero."""
    exit_code = 2  # configurator.EXIT_CONFIG


class EndpointUnavailable(FatalError):
    """The circuit breaker opened after too many consecutive transport failures; a rerun resumes."""
    exit_code = 3  # configurator.EXIT_INCOMPLETE


class ItemError(RuntimeError):
    """One request failed for good (or, with retryable=True, for now); record it and move on.
    kind (the reason to record): retryable: timeout (deadline included), connection, http_5xx, http_408/409/429,
    deferred; for good: http_400 (and other 4xx), html, malformed, too_large, empty_reply, truncated, filtered,
    refused, bad_json, schema. raw: the server's text (key scrubbed), for the errors file."""

    def __init__(self, kind, message, raw="", retryable=False):
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.raw, self.retryable = kind, message, raw, retryable


@dataclass
class Reply:
    text: str
    data: object = None  # the parsed, validated JSON when a schema was given
    finish_reason: str = ""
    usage: dict = field(default_factory=dict)
    top_logprobs: list = None  # [{token: logprob}] per generated token, when the server sent logprobs
    cached: bool = False


# ----------------------------------------------------------------------------------------------------------------
# JSON helpers: one fence stripped, parsed, validated against a JSON-schema subset (the same schema is sent to the
# server as response_format, so what we ask for and what we accept cannot drift apart).

FENCE_RE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?```$", re.S)


def extract_json(text):
    """Parse `text` as JSON after stripping whitespace and one surrounding ``` fence; raises ValueError."""
    s = (text or "").strip()
    m = FENCE_RE.match(s)
    if m:
        s = m.group(1).strip()
    return json.loads(s)


def validate(value, schema, path="$"):
    """Raise ValueError naming the first place where `value` breaks `schema` (type, properties, required,
    additionalProperties, enum, minimum/maximum, minLength/maxLength, items, minItems/maxItems). Out-of-range
    values are rejected, never clamped."""
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    t = schema.get("type")
    if t == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif t == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = t is None or isinstance(value, types[t])
    if not ok:
        raise ValueError(f"{path}: expected {t}, got {type(value).__name__} {str(value)[:60]!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValueError(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValueError(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, str):
        if len(value.strip()) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            raise ValueError(f"{path}: string length {len(value)} outside the allowed range")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1 << 30):
            raise ValueError(f"{path}: {len(value)} items, expected {schema.get('minItems', 0)}.."
                             f"{schema.get('maxItems', 'any')}")
        for i, v in enumerate(value):
            validate(v, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            if k not in value:
                raise ValueError(f"{path}: missing required field {k!r}")
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(props))
            if extra:
                raise ValueError(f"{path}: unexpected fields {extra}")
        for k, sub in props.items():
            if k in value:
                validate(value[k], sub, f"{path}.{k}")
    return value


def is_refusal(text):
    """Keyword refusal detector: True when the opening of `text` reads as a refusal. A judge-free metric and the
    offline backends' rule; crude on purpose (it does not read the rest of the answer)."""
    return bool(REFUSAL_RE.search((text or "")[:300]))


# ----------------------------------------------------------------------------------------------------------------
# what comes from outside: the endpoint's URL, and any text a server sends


def check_url(url, name="llm_url"):
    """The endpoint to use: `url`, else $OPENAI_BASE_URL; "offline" as is; else an http(s) base URL, returned without
    a trailing slash or /chat/completions. Anything else (no scheme, no host, an empty, zero or non-numeric port,
    spaces, a query) is a ValueError naming the URL and the fix, before any work starts; `name` is the setting that
    holds it (llm_url, judge_url)."""
    if not url:
        url, name = os.environ.get("OPENAI_BASE_URL", ""), "OPENAI_BASE_URL"
    if not url:
        raise ValueError("no LLM endpoint: set llm_url (or OPENAI_BASE_URL) to a base URL such as "
                         "http://localhost:8000/v1, or to 'offline' for the template backend")
    if url == "offline":
        return url
    fix = f"set {name} to a base URL such as http://localhost:8000/v1"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parses it: a ValueError when not a number in 0..65535
    except ValueError as e:
        raise ValueError(f"{name} {url!r} has an invalid port or address ({e}): {fix}") from None
    host_port = parts.netloc.rpartition("@")[2]
    if any(c.isspace() or ord(c) < 32 for c in url):
        problem = "contains a space or a control character"
    elif parts.scheme.lower() not in ("http", "https"):
        problem = "does not start with http:// or https://"
    elif not parts.hostname:
        problem = "has no host"
    elif host_port.endswith(":"):  # urlsplit reads "host:" as no port, which requests would send to port 80
        problem, fix = "has an empty port", "write the port number after the colon (e.g. :8000), or drop the colon"
    elif port == 0:
        problem, fix = "has port 0", "write the port the server listens on (e.g. :8000)"
    elif parts.query or parts.fragment:
        problem, fix = "has a query or fragment", "remove it (the client appends /chat/completions and /models)"
    else:
        return url.rstrip("/").removesuffix("/chat/completions")
    raise ValueError(f"{name} {url!r} {problem}: {fix}")


def clean(value):
    """`value` (a str, or lists and dicts of them) safe to write, hash and store: lone surrogates (half an emoji cut
    by a proxy) become U+FFFD and NULs are removed. Everything else, U+2028 included, is kept as sent."""
    if isinstance(value, str):
        return SURROGATE_RE.sub("\ufffd", value).replace("\x00", "")
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    return value


# -----------------------------------------------------------------------------
# prompts and rules: the templates and the taxonomy that the generator and the judge share


def load_taxonomy(path):
    """data/taxonomy.json -> {"version", "rules": {rule id: rule + category/subcategory ids}}; clear errors."""
    with open(path) as f:
        tax = json.load(f)
    if "version" not in tax or "categories" not in tax:
        raise ValueError(f"taxonomy {path} needs 'version' and 'categories' at the top level")
    rules = {}
    for cat in tax["categories"]:
        for sub in cat["subcategories"]:
            for rule in sub["rules"]:
                missing = {"id", "refuse", "safe_help", "video_guidance"} - set(rule)
                if missing:
                    raise ValueError(f"taxonomy {path}: rule {rule.get('id')!r} lacks {sorted(missing)}")
                if rule["id"] in rules:
                    raise ValueError(f"taxonomy {path}: rule id {rule['id']!r} is used twice")
                rules[rule["id"]] = dict(rule, category=cat["id"], subcategory=sub["id"])
    return {"version": tax["version"], "rules": rules}


def load_template(path):
    """A prompt template file: `### system` then `### user` sections with ${name} placeholders ->
    {"system": Template, "user": Template}. The generator and the judge keep their prompts in data/prompts/."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt template {path} is missing")
    with open(path, encoding="utf-8") as f:
        parts = re.split(r"^### (system|user)[ \t]*$", f.read(), flags=re.M)
    sections = {k: string.Template(v.strip()) for k, v in zip(parts[1::2], parts[2::2])}
    if "user" not in sections:
        raise ValueError(f"prompt template {path} needs a '### user' section")
    return sections


def render(template, **fields):
    """Chat messages from a template; a missing placeholder is a KeyError naming it."""
    return [{"role": role, "content": template[role].substitute(fields)} for role in ("system", "user")
            if role in template]


def parse_retry_after(headers, now=None):
    """Seconds to wait from `retry-after-ms` or `Retry-After` (delta-seconds or an HTTP date), else None."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# ----------------------------------------------------------------------------------------------------------------
# the response cache


class Cache:
    """sqlite3 (WAL) table request-hash -> raw response body. One connection shared by the pool's threads behind a
    lock: each put is a single-row commit (~0.1 ms), small next to an LLM call."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives a killed process (what resume needs), not a power cut; FULL fsyncs every put
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, body TEXT, created REAL)")
        self.db.commit()
        self.lock = threading.Lock()

    def get(self, key):
        with self.lock:
            row = self.db.execute("SELECT body FROM responses WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key, body):
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", (key, body, time.time()))
            self.db.commit()

    def close(self):
        with self.lock:
            self.db.close()


def request_key(body):
    """sha256 of the request body. surrogatepass: any str hashes (valid text hashes as it always has)."""
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def usage_of(raw):
    """The `usage` object of a 200 body, {} when there is none or the body is not what it should be."""
    try:
        usage = json.loads(raw, strict=False).get("usage")
    except (ValueError, AttributeError):
        return {}
    return usage if isinstance(usage, dict) else {}


def first_choice(obj, raw):
    """(choice, message) of a parsed 200 body; ItemError when its shape is not the protocol's, or it has no choice."""
    if not isinstance(obj, dict):
        raise ItemError("malformed", "HTTP 200 whose body is not a JSON object", raw=raw[:2000])
    choices = obj.get("choices")
    if not choices:
        raise ItemError("empty_reply", "the reply has no choices", raw=raw[:2000])
    choice = choices[0] if isinstance(choices, list) else None
    message = (choice.get("message") or {}) if isinstance(choice, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("content"), (str, type(None))):
        raise ItemError("malformed", "HTTP 200 whose choices are not [{message: {content: text}}]", raw=raw[:2000])
    return choice, message


def top_logprobs(choice):
    """[{token: logprob}] per generated token from an OpenAI `logprobs` object; None when absent or misshapen."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not content:
        return None
    try:
        return [{t["token"]: float(t["logprob"]) for t in (pos.get("top_logprobs") or [pos])} for pos in content]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# the client


class Client:
    def __init__(self, url, model, api_key=None, connect_timeout=10.0, read_timeout=120.0, deadline=600.0,
                 max_retries=6, backoff_base=1.0, backoff_max=60.0, retry_after_max=120.0, breaker=20,
                 concurrency=8, cache_path=None, prices=(0.0, 0.0), offline=None, empty_retries=2,
                 max_reply_bytes=4 << 20):
        """url: base URL ending in /v1, "offline", or None/"" for $OPENAI_BASE_URL (check_url: a ValueError when
        malformed). Timeouts, deadline (one call, all retries and the body included) and backoff are in seconds.
        prices: ($ per 1M prompt tokens, $ per 1M completion tokens) for the cost estimate. offline: fn(messages,
        tag, meta) -> str, for url "offline". empty_retries: how often an empty reply is asked again.
        max_reply_bytes: a longer body is a bad reply (too_large), not read into memory."""
        url = check_url(url)
        self.offline = url == "offline"
        if self.offline and offline is None:
            raise FatalError("llm_url=offline needs an offline responder (the script passes one)")
        self.url, self.model, self.respond = url, model, offline
        self._key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
        self.timeout, self.deadline = (connect_timeout, read_timeout), deadline
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max
        self.retry_after_max, self.breaker, self.concurrency = retry_after_max, breaker, concurrency
        self.empty_retries, self.max_reply_bytes, self.prices = empty_retries, max_reply_bytes, prices
        self.structured = True  # send schemas as response_format; False once the endpoint rejected that
        self.cache = Cache(cache_path) if cache_path and not self.offline else None
        self.lock = threading.Lock()
        self.failures = 0  # consecutive transport failures (breaker)
        self.broken = None  # the EndpointUnavailable once the breaker opened
        self.usage = {}  # tag -> {calls, cached, prompt_tokens, completion_tokens}
        self.local = threading.local()

    def __repr__(self):  # never shows the key
        return f"Client(url={self.url!r}, model={self.model!r}, key={'***' if self._key else 'none'})"

    def scrub(self, text):
        text = str(text)
        return text.replace(self._key, "***") if self._key else text

    def session(self):
        s = getattr(self.local, "session", None)
        if s is None:
            s = self.local.session = requests.Session()
            if self._key:
                s.headers["Authorization"] = f"Bearer {self._key}"
        return s

    # -- before any work ----------------------------------------------------------------------------------------

    def preflight(self, deadline=8.0):
        """Fail in seconds, before any work, when this endpoint cannot serve the run: one GET {url}/models and, where
        that route is not served (404/405), one minimal chat call (max_tokens=1, not cached). A transport failure or
        a 5xx is tried once more within `deadline` seconds in all. Raises EndpointUnavailable (nothing answers:
        refused, timeout, 5xx) or FatalError (401/403: the key; 404, or a web page: the URL); each message names the
        URL, the status or error, and the variable to fix. A no-op offline."""
        if self.offline:
            return
        until = time.monotonic() + deadline
        path, status, headers, raw = "/models", *self._probe("GET", "/models", None, deadline / 2, until)
        if status in (404, 405):
            ping = {"model": self.model, "messages": [{"role": "user", "content": "Reply with OK."}], "max_tokens": 1}
            path, status, headers, raw = "/chat/completions", *self._probe("POST", "/chat/completions", ping,
                                                                         deadline / 2, until)
            if status == 200:
                self._count("preflight", usage_of(raw), cached=False)
        where = f"{self.url}{path} answered HTTP {status}" + (f" ({server_message(raw)})" if raw.strip() else "")
        if status in (401, 403):
            raise self._fatal(f"{where}: set OPENAI_API_KEY to a key this endpoint accepts")
        if status in (404, 405):
            raise FatalError(f"{self.url} serves neither /models nor /chat/completions ({where}): set "
                             "OPENAI_BASE_URL (or --llm_url) to an OpenAI-compatible base URL, usually ending in /v1")
        if status >= 500:
            raise EndpointUnavailable(f"{where}, twice: wait for the server, or set OPENAI_BASE_URL (or --llm_url) "
                                      "to one that is up")
        if status == 200 and path == "/models":
            try:
                self._check_body(headers, raw)
            except ItemError as e:
                raise FatalError(f"{self.url}/models answered HTTP 200 with {e.message}, not the API: set "
                                 "OPENAI_BASE_URL (or --llm_url) to an OpenAI-compatible base URL, usually ending "
                                 "in /v1") from None

    def _probe(self, method, path, body, timeout, until):
        """Up to two quick attempts for preflight: (status, headers, text) of the first answer that is not a 5xx/408
        (or of the second), else EndpointUnavailable naming the URL and the transport error."""
        for attempt in (1, 2):
            try:
                status, headers, raw = self._attempt(method, path, body, (timeout, timeout), until)
            except ItemError as e:
                if attempt == 2 or until - time.monotonic() < 0.5:
                    raise EndpointUnavailable(f"{self.url}{path} cannot be reached ({e}): start the server, or set "
                                              "OPENAI_BASE_URL (or --llm_url) to one that is up") from None
            else:
                if (status < 500 and status != 408) or attempt == 2 or until - time.monotonic() < 0.5:
                    return status, headers, raw
            time.sleep(0.2)

    # -- one request --------------------------------------------------------------------------------------------

    def chat(self, messages, tag="chat", schema=None, meta=None, allow_length=False, **params):
        """One chat completion. schema: a JSON schema (subset, see validate) the reply must match; reply.data holds
        the parsed object. meta: caller data for the offline responder (never sent). allow_length: accept
        finish_reason "length" as final (a one-token verdict with max_tokens=1 always ends that way); otherwise it
        is retried once with double max_tokens, then an ItemError. params: temperature, max_tokens, seed,
        logprobs, top_logprobs, ... passed through. Raises ItemError / FatalError."""
        if self.offline:
            text = self.respond(messages, tag, meta)
            body = {"choices": [{"message": {"content": text}, "finish_reason": "stop"}], "usage": {}}
            self._count(tag, {}, cached=False)
            return self._parse(json.dumps(body), schema, allow_length=False, cached=False)
        until = time.monotonic() + self.deadline  # one deadline for the whole call: retries, re-asks, bodies
        for budget_retry in (False, True):
            reply = self._chat_once(messages, tag, schema, params, allow_length, until)
            if reply.finish_reason != "length" or allow_length:
                return reply
            if budget_retry:
                raise ItemError("truncated", "finish_reason=length twice, the second time with a doubled "
                                "max_tokens", raw=reply.text)
            params = dict(params, max_tokens=2 * params.get("max_tokens", 1024))

    def _body(self, messages, schema, params):
        body = clean(dict(model=self.model, messages=messages, **params))  # half an emoji in an answer, too
        if schema is not None and self.structured:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": schema.get("title", "reply"), "schema": schema}}
        elif schema is not None:  # prompt-only JSON: the endpoint rejected response_format
            note = ("\n\nReply with only a JSON object (no prose, no code fence) that matches this JSON schema:\n"
                    + json.dumps(schema))
            body["messages"] = body["messages"][:-1] + [dict(body["messages"][-1],
                                                             content=body["messages"][-1]["content"] + note)]
        return body

    def _chat_once(self, messages, tag, schema, params, allow_length, until):
        """A cached reply, else a fresh one (an empty one asked again up to empty_retries times). Only a finished
        answer is cached: never a malformed, empty or truncated body, which would repeat a transient fault forever."""
        body = self._body(messages, schema, params)
        key = request_key(body)
        raw = self.cache.get(key) if self.cache else None
        if raw is not None:  # a cache from an older version may hold an empty reply: then ask again
            try:
                reply = self._parse(raw, schema, allow_length, cached=True)
            except ItemError as e:
                if e.kind not in UNCACHED:
                    self._count(tag, {}, cached=True)
                    raise
            else:
                if reply.finish_reason != "length" or allow_length:
                    self._count(tag, {}, cached=True)
                    return reply
        for attempt in range(self.empty_retries + 1):
            try:
                raw = self._post(body, until)
            except ItemError as e:
                if e.kind == "http_400" and schema is not None and self.structured and re.search(
                        r"response_format|json_schema|guided|grammar", e.raw, re.I):
                    self.structured = False  # sticky for this client: the endpoint does not do structured output
                    return self._chat_once(messages, tag, schema, params, allow_length, until)
                raise
            self._count(tag, usage_of(raw), cached=False)
            try:
                reply = self._parse(raw, schema, allow_length, cached=False)
            except ItemError as e:
                wait = self._backoff(attempt + 1)
                if e.kind == "empty_reply" and attempt < self.empty_retries and wait < until - time.monotonic():
                    time.sleep(wait)
                    continue
                if e.kind == "empty_reply":
                    raise ItemError(e.kind, f"{e.message} ({attempt + 1} attempts)", e.raw) from None
                if self.cache and e.kind not in UNCACHED:
                    self.cache.put(key, raw)  # the model's answer, refused or invalid: a rerun need not pay again
                raise
            if self.cache and (reply.finish_reason != "length" or allow_length):
                self.cache.put(key, raw)
            return reply

    def _attempt(self, method, path, body, timeout, until):
        """One HTTP exchange that ends by `until` (time.monotonic()) whatever the server does: the body is streamed
        and each socket read may block only for the time left, so a server that trickles bytes cannot hold it.
        Returns (status, headers, text): the body decoded as UTF-8 (invalid bytes -> U+FFFD, NUL bytes dropped),
        key scrubbed. Raises ItemError: timeout / connection (retryable), too_large (body over max_reply_bytes)."""
        left = until - time.monotonic()
        if left <= 0:
            raise ItemError("timeout", "no time left before the deadline", retryable=True)
        try:
            r = self.session().request(method, self.url + path, json=body, stream=True,
                                       timeout=(min(timeout[0], left), min(timeout[1], left)))
        except requests.Timeout as e:
            raise ItemError("timeout", self.scrub(e), retryable=True) from None
        except requests.RequestException as e:  # refused, reset, dropped
            raise ItemError("connection", self.scrub(e), retryable=True) from None
        chunks, size = [], 0
        try:
            sock = getattr(r.raw.connection, "sock", None)  # urllib3 resets its timeout on the next request
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    raise ItemError("timeout", f"deadline {self.deadline}s reached while reading the body from "
                                    f"{self.url}{path} ({size} bytes by then)", retryable=True)
                if sock is not None:
                    sock.settimeout(min(timeout[1], left))
                chunk = r.raw.read1(1 << 16, decode_content=True)  # what one socket read brings, never a full buffer
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_reply_bytes:
                    raise ItemError("too_large", f"the body from {self.url}{path} exceeds max_reply_bytes="
                                    f"{self.max_reply_bytes}", raw=self.scrub(b"".join(chunks)[:2000].decode(
                                        "utf-8", "replace")))
                chunks.append(chunk)
        except urllib3.exceptions.ReadTimeoutError as e:
            raise ItemError("timeout", self.scrub(e), retryable=True) from None
        except (urllib3.exceptions.HTTPError, OSError) as e:  # reset or dropped mid-body, a bad gzip stream
            raise ItemError("connection", self.scrub(e), retryable=True) from None
        finally:
            r.close()  # after a full body the connection is already back in the pool; else it is closed
        text = b"".join(chunks).decode("utf-8-sig", "replace").replace("\x00", "")
        return r.status_code, r.headers, self.scrub(text)

    def _backoff(self, attempt):
        """Exponential backoff, full jitter: retry k waits uniform(0, base * 2^(k-1)), capped at backoff_max."""
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))

    def _post(self, body, until):
        """POST with retries until `until`; returns the raw 200 body (a JSON object) or raises."""
        attempt = 0
        while True:
            if self.broken:  # checked before every attempt: another thread may have opened the breaker
                raise self.broken
            wait, raw = None, ""
            try:
                status, headers, raw = self._attempt("POST", "/chat/completions", body, self.timeout, until)
            except ItemError as e:
                if not e.retryable:
                    raise
                kind, message = e.kind, e.message
            else:
                if status == 200:
                    return self._check_body(headers, raw)
                message = f"HTTP {status} from {self.url}: {server_message(raw)}"
                if status in (401, 403):
                    raise self._fatal(f"{self.url} answered HTTP {status} ({server_message(raw)}): set "
                                      "OPENAI_API_KEY to a key this endpoint accepts, and OPENAI_BASE_URL (or "
                                      "llm_url) to the right endpoint")
                if status == 404:
                    raise self._fatal(self._explain_404(raw))
                if status not in RETRY_STATUS and status < 500:
                    raise ItemError(f"http_{status}", message, raw=raw)
                kind = "http_5xx" if status >= 500 else f"http_{status}"
                wait = parse_retry_after(headers)
                if wait is not None and wait > self.retry_after_max:
                    raise ItemError("deferred", f"{message}; Retry-After {wait:.0f}s exceeds retry_after_max="
                                    f"{self.retry_after_max}s, the item is left for a rerun", raw, retryable=True)
            attempt += 1
            wait = self._backoff(attempt) if wait is None else wait
            left = until - time.monotonic()
            if attempt > self.max_retries or wait >= left:
                why = "retries exhausted" if attempt > self.max_retries else f"deadline {self.deadline}s reached"
                self._transport_failure()
                raise ItemError(kind, f"{message} ({why} after {attempt} attempts)", raw, retryable=True)
            time.sleep(wait)

    def _check_body(self, headers, raw):
        if "html" in headers.get("content-type", "") or raw.lstrip()[:1] == "<":
            raise ItemError("html", "an HTML body (a proxy or login page?)", raw=raw[:2000])
        try:
            obj = json.loads(raw, strict=False)  # strict=False: raw control characters inside strings are text
        except ValueError:
            raise ItemError("malformed", "a body that is not JSON", raw=raw[:2000]) from None
        if not isinstance(obj, dict):
            raise ItemError("malformed", "a body that is not a JSON object", raw=raw[:2000])
        with self.lock:
            self.failures = 0
        return raw

    def _fatal(self, message):
        """A FatalError that also stops every other thread's next call (they would hit the same wall)."""
        with self.lock:
            self.broken = self.broken or FatalError(message)
        return self.broken

    def _transport_failure(self):
        with self.lock:
            self.failures += 1
            if self.failures >= self.breaker and not self.broken:
                self.broken = EndpointUnavailable(
                    f"endpoint unavailable: {self.failures} consecutive requests to {self.url} failed after "
                    "retries; stopping (rerun to resume)")
        if self.broken:
            raise self.broken

    def _explain_404(self, raw):
        try:
            status, _, models = self._attempt("GET", "/models", None, self.timeout, time.monotonic() + 10)
            ids = [m.get("id") for m in json.loads(models).get("data", [])] if status == 200 else None
        except (ItemError, ValueError, AttributeError, TypeError):
            ids = None
        if ids is None:
            return (f"{self.url}/chat/completions answered 404 ({server_message(raw)}) and /models is not served "
                    "either: check llm_url (an OpenAI-compatible base URL ending in /v1)")
        return (f"model {self.model!r} is not served at {self.url} ({server_message(raw)}); models there: "
                f"{', '.join(map(str, ids)) or '(none)'}; set llm_model to one of them")

    def _parse(self, raw, schema, allow_length, cached):
        """Classify a 200 body; return a Reply or raise ItemError. Every string in it is `clean`ed first."""
        try:
            obj = clean(json.loads(raw, strict=False))
        except ValueError:  # only a cache entry from an older version can get here
            raise ItemError("malformed", "a body that is not JSON", raw=raw[:2000]) from None
        choice, msg = first_choice(obj, raw)
        text, finish = msg.get("content"), str(choice.get("finish_reason") or "")
        if msg.get("refusal"):
            raise ItemError("refused", f"the model refused: {str(msg['refusal'])[:200]}", raw=raw[:2000])
        if finish == "content_filter":
            raise ItemError("filtered", "the endpoint's content filter stopped the reply", raw=raw[:2000])
        if not text or not text.strip():
            raise ItemError("empty_reply", f"empty content (finish_reason={finish!r})", raw=raw[:2000])
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
        reply = Reply(text=text, finish_reason=finish, usage=usage, top_logprobs=top_logprobs(choice), cached=cached)
        if schema is not None and (finish != "length" or allow_length):
            try:
                data = extract_json(text)
            except ValueError as e:
                kind = "refused" if is_refusal(text) else "bad_json"
                raise ItemError(kind, f"the reply is not JSON ({e})", raw=text[:2000]) from None
            try:
                reply.data = validate(data, schema)
            except ValueError as e:
                raise ItemError("schema", str(e)[:300], raw=text[:2000]) from None
        return reply

    def _count(self, tag, usage, cached):
        tokens = lambda k: int(usage[k]) if isinstance(usage.get(k), (int, float)) else 0  # noqa: E731
        with self.lock:
            u = self.usage.setdefault(tag, dict(calls=0, cached=0, prompt_tokens=0, completion_tokens=0))
            u["cached" if cached else "calls"] += 1
            if not cached:  # cached replies cost nothing now
                u["prompt_tokens"] += tokens("prompt_tokens")
                u["completion_tokens"] += tokens("completion_tokens")

    def cost(self):
        """Estimated dollars spent by this client so far, from `usage` and `prices` ($ per 1M tokens)."""
        p = sum(u["prompt_tokens"] for u in self.usage.values())
        c = sum(u["completion_tokens"] for u in self.usage.values())
        return (p * self.prices[0] + c * self.prices[1]) / 1e6

    # -- many requests ------------------------------------------------------------------------------------------

    def map(self, fn, items):
        """Run fn(item) on `concurrency` threads; yield (item, result, None) or (item, None, exception) as each
        finishes, so the caller writes each record when it is ready (items finished together: in input order, so
        with one worker the output order is the input's). At most 2*concurrency items are in flight. A FatalError
        stops dispatching: the in-flight items are still yielded, then the error is raised."""
        items, pending, fatal, seq = iter(items), {}, None, {}
        with cf.ThreadPoolExecutor(self.concurrency) as pool:
            while True:
                while fatal is None and len(pending) < 2 * self.concurrency:
                    item = next(items, StopIteration)
                    if item is StopIteration:
                        break
                    fut = pool.submit(fn, item)
                    pending[fut], seq[fut] = item, len(seq)
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in sorted(done, key=seq.pop):  # a set: its order would vary from run to run
                    item = pending.pop(fut)
                    if fut.cancelled():
                        continue
                    err = fut.exception()
                    if isinstance(err, FatalError):
                        fatal = fatal or err
                        for other in pending:  # queued, not started: never run them
                            other.cancel()
                        continue
                    yield (item, None, err) if err else (item, fut.result(), None)
        if fatal:
            raise fatal

    def close(self):
        if self.cache:
            self.cache.close()


def server_message(raw):
    """The error message inside an OpenAI-style error body, else the first 300 characters."""
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:300]
