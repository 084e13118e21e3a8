"""
A real HTTP server on loopback that speaks the OpenAI chat-completions protocol, scripted to fail the way real
servers fail. Used by tests (as a separate process) and by the generate_pairs benchmark.

    python tests/fake_openai.py [--port=0] [--latency=0.1] [--flaky=0.05] [--key=sk-x] [--models=a,b] [--log=F]

prints `PORT <n>` once it listens on 127.0.0.1. Without a script, a request is answered after `latency` seconds
with a reply that satisfies its `response_format` JSON schema (strings are distinct pseudo-words derived from the
request, so generated queries do not collapse as duplicates), or with plain text. `--flaky=p` answers a fraction p
of requests with 500 or 429 (retry-after-ms: 5) instead. Control endpoints:
  POST /_script  {"actions": [...], "models": [...]}  queue actions, one consumed per chat request (per GET /models
    for "models"), in order. An action is a dict:
      {"status": 429, "headers": {"Retry-After": "1"}, "body": ...}   any status/headers/body
      {"hang": 30}  never answer (sleep, then drop the connection)    {"reset": true}  TCP reset
      {"html": true}   200 with an HTML page                          {"raw": "not json"}  200, that body
      {"choices": []}  {"content": null}  {"content": "...", "finish_reason": "length"}  {"refusal": "..."}
      {"logprobs": [{"1": -0.1, "2": -2.3}]}  first-token alternatives, with the default or given content
      {"raw_b64": "..."}  200, exactly these bytes (invalid UTF-8, NUL bytes)   {"big": n}  content of n bytes
      {"trickle": 0.1, ...}  headers at once, then the body one byte every 0.1 s (a proxy with a stuck upstream)
    GET /models takes status, headers, body, hang, reset, html, raw, raw_b64 and trickle; else it lists --models.
  POST /_reset  clear the queues and the counters
  GET /_stats  {"requests", "ok", "models_requests", "bodies": last 50 bodies, "times": their arrival (monotonic s),
                "events": what the server saw of the client: {"event": "hang", "abandoned": true} when the client
                hung up before the hang ended, {"event": "trickle", "sent", "total", "cut"} for each trickled body}
--log appends {"sha", "ids"} for every 200 chat reply (ids: the `vid\\d+` names in the request), flushed per line.
"""
import argparse
import base64
import hashlib
import json
import random
import re
import select
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("amber basalt cedar delta ember fjord garnet harbor indigo juniper kelp lumen marble nectar onyx prism quartz "
         "raven sierra tundra umber velvet willow xenon yarrow zephyr").split()


def pseudo_words(seed, n=8):
    h = hashlib.sha256(seed.encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] + str(b) for b in h[:n])


def instance(schema, seed, index=0):
    """A value satisfying `schema` (the llm.validate subset); strings are distinct per seed/path."""
    if "enum" in schema:
        return schema["enum"][index % len(schema["enum"])]
    t = schema.get("type")
    if t == "object":
        return {k: instance(v, f"{seed}.{k}") for k, v in schema.get("properties", {}).items()}
    if t == "array":
        n = max(schema.get("minItems", 1), 1)
        return [instance(schema.get("items", {}), f"{seed}[{i}]", i) for i in range(n)]
    if t == "string":
        return "Fake " + pseudo_words(seed)
    if t in ("integer", "number"):
        return schema.get("minimum", 1)
    if t == "boolean":
        return True
    return None


class State:
    def __init__(self, args):
        self.args, self.lock = args, threading.Lock()
        self.reset()
        self.rng = random.Random(args.seed)
        self.log = open(args.log, "a") if args.log else None

    def reset(self):
        self.queue, self.models_queue, self.requests, self.ok, self.models_requests = [], [], 0, 0, 0
        self.bodies, self.times, self.events = [], [], []

    def event(self, **e):
        with self.lock:
            self.events.append(e)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; every reply carries Content-Length
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, 40 ms delayed-ACK stalls

    def log_message(self, *a):  # quiet
        pass

    def send(self, status, body, headers=None, ctype="application/json", trickle=0.0):
        data = body.encode() if isinstance(body, str) else body
        data = data if isinstance(data, bytes) else json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        step, sent = (1 if trickle else max(len(data), 1)), 0
        try:
            while sent < len(data):
                self.wfile.write(data[sent:sent + step])
                sent = min(sent + step, len(data))
                time.sleep(trickle)
        except OSError:  # the client hung up (its deadline, its max_reply_bytes): broken pipe or reset
            self.close_connection = True
        if trickle:
            self.server.state.event(event="trickle", sent=sent, total=len(data), cut=sent < len(data))

    def hang(self, seconds):
        """Answer nothing for `seconds`, watching the socket: a client that gives up first is logged as such."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if select.select([self.connection], [], [], 0.05)[0]:
                if self.connection.recv(1, socket.MSG_PEEK) == b"":
                    return self.server.state.event(event="hang", abandoned=True)
                time.sleep(0.05)
        self.server.state.event(event="hang", abandoned=False)

    def bad_key(self):
        """True (after answering 401) when --key is set and the request does not carry it."""
        key = self.server.state.args.key
        if not key or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        # like OpenAI, echo the key that was sent: the client must scrub it from what it records
        sent = (self.headers.get("Authorization") or "")[7:]
        self.send(401, {"error": {"message": f"Incorrect API key provided: {sent}", "code": 401}})
        return True

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n).decode() if n else ""

    def do_GET(self):
        st = self.server.state
        if self.path == "/_stats":
            with st.lock:
                return self.send(200, {"requests": st.requests, "ok": st.ok, "models_requests": st.models_requests,
                                       "bodies": st.bodies[-50:], "times": st.times[-50:], "events": st.events})
        if self.path.rstrip("/").endswith("/models"):
            with st.lock:
                st.models_requests += 1
                a = st.models_queue.pop(0) if st.models_queue else {}
            if self.bad_key():
                return
            if not self.act_common(a):
                self.send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in st.args.models]},
                          trickle=a.get("trickle", 0.0))
            return
        self.send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        st, text = self.server.state, self.read_body()
        if self.path == "/_script":
            script = json.loads(text)
            with st.lock:
                st.queue.extend(script.get("actions", []))
                st.models_queue.extend(script.get("models", []))
            return self.send(200, {"queued": len(st.queue)})
        if self.path == "/_reset":
            with st.lock:
                st.reset()
            return self.send(200, {})
        if not self.path.endswith("/chat/completions"):
            return self.send(404, {"error": {"message": f"no route {self.path}"}})
        body = json.loads(text)
        with st.lock:
            st.requests += 1
            st.bodies.append(body)
            st.times.append(time.monotonic())
        if self.bad_key():
            return
        if st.args.models and body.get("model") not in st.args.models:
            return self.send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        with st.lock:
            action = st.queue.pop(0) if st.queue else None
            flaky = action is None and st.args.flaky > 0 and st.rng.random() < st.args.flaky
        if st.args.latency:
            time.sleep(st.args.latency)
        if flaky:
            return self.send(*((500, {"error": {"message": "flaky"}}) if st.rng.random() < 0.5 else
                               (429, {"error": {"message": "slow down"}}, {"retry-after-ms": "5"})))
        self.act(st, body, action or {})

    def act_common(self, a):
        """The failure modes shared by every route; False when `a` asks for none of them (a normal reply)."""
        if "hang" in a:
            self.hang(a["hang"])
            self.close_connection = True
        elif a.get("reset"):  # SO_LINGER 0 then close -> the client sees a TCP RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif a.get("status", 200) != 200:
            self.send(a["status"], a.get("body", {"error": {"message": f"scripted {a['status']}"}}), a.get("headers"),
                      trickle=a.get("trickle", 0.0))
        elif a.get("html"):
            self.send(200, "<html><body>Gateway login</body></html>", ctype="text/html")
        elif "raw" in a or "raw_b64" in a:
            raw = base64.b64decode(a["raw_b64"]) if "raw_b64" in a else a["raw"]
            self.send(200, raw, trickle=a.get("trickle", 0.0))
        else:
            return False
        return True

    def act(self, st, body, a):
        if self.act_common(a):
            return
        sha = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if "content" in a:
            content = a["content"]
        elif "big" in a:
            content = "x" * a["big"]
        else:
            rf = (body.get("response_format") or {}).get("json_schema")
            content = json.dumps(instance(rf["schema"], sha)) if rf else "Fake answer: " + pseudo_words(sha)
        message = {"role": "assistant", "content": content}
        if a.get("refusal"):
            message = {"role": "assistant", "content": None, "refusal": a["refusal"]}
        choice = {"index": 0, "message": message, "finish_reason": a.get("finish_reason", "stop")}
        if a.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": max(top, key=top.get), "logprob": max(top.values()),
                                               "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}
                                              for top in a["logprobs"]]}
        prompt_tokens = len(json.dumps(body["messages"])) // 4
        reply = {"id": "chatcmpl-" + sha[:12], "object": "chat.completion", "model": body.get("model"),
                 "choices": a.get("choices", [choice]),
                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(content or "") // 4,
                           "total_tokens": prompt_tokens + len(content or "") // 4}}
        self.send(200, reply, trickle=a.get("trickle", 0.0))
        with st.lock:
            st.ok += 1
            if st.log:
                st.log.write(json.dumps({"sha": sha, "ids": sorted(set(re.findall(r"vid\d+", json.dumps(body))))})
                             + "\n")
                st.log.flush()


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--flaky", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--key", default="")
    ap.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=[])
    ap.add_argument("--log", default="")
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.request_queue_size = 256
    server.state = State(args)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


def start(*args, timeout=30):
    """Start the server as a subprocess; return (process, base_url). The caller stops the process (`stop`)."""
    import os
    import subprocess
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdout=subprocess.PIPE, text=True)
    ready = select.select([proc.stdout], [], [], timeout)[0]  # a server that never starts fails, it does not hang
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        stop(proc)
        raise AssertionError(f"fake server did not start within {timeout} s: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def stop(proc, timeout=10):
    proc.terminate()
    try:
        proc.wait(timeout)
    except Exception:  # subprocess.TimeoutExpired: it ignored SIGTERM
        proc.kill()
        proc.wait(timeout)


if __name__ == "__main__":
    main(sys.argv[1:])
