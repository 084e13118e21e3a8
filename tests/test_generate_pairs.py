"""generate_pairs.py: the offline backend end to end; against a real loopback server process (tests/fake_openai.py):
kill -9 twice over 200 descriptions then a rerun (every pair id exactly once, nothing done is asked for again, the
API key in no file), malformed replies and failed verifications recorded and skipped, 401 and the circuit breaker
exit non-zero, dry run calls nothing; plus on-policy `rejected_from`, dedup, sharding, torn lines and config errors;
the dataset card (--card=True) against counts, drops and numpy length statistics recomputed from the run's files.
Run: .venv/bin/python -m pytest -q tests/test_generate_pairs.py"""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import requests

import generate_pairs as gp
import llm
import records
from tests import fake_openai

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-live-DO-NOT-LEAK-42"
SCENES = ["a teenager attempts a rooftop parkour jump between buildings while friends film",
          "a man mixes bleach and ammonia in a bucket and a cloud of gas rises",
          "security footage of a person breaking a car window and taking a bag",
          "a dog chained in a yard in hot weather with no water",
          "a crowd at a protest march waving flags and chanting",
          "a person typing commands on a terminal next to a wifi router"]
FAST = ["--backoff_base=0.001", "--max_retries=6", "--connect_timeout=2.0", "--read_timeout=5.0"]


def run(cfg):
    """gp.run and the exit code the script skeleton gives its summary (0 done, 3 work left for a rerun)."""
    summary = gp.run(cfg)
    return (0 if summary["status"] == "done" else 3), summary


def write_descriptions(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"vid{i:04d}", "video": f"videos/vid{i:04d}.mp4", "num_frames": 8,
                                "model": "tiny", "description": f"Clip vid{i:04d}: {SCENES[i % len(SCENES)]}."}) + "\n")
    return str(path)


def config(tmp_path, **kw):
    cfg = {k: v for k, v in vars(gp).items() if not k.startswith("_") and k.islower()
           and isinstance(v, (int, float, bool, str))}
    cfg.update(out=str(tmp_path / "pairs.jsonl"), backoff_base=0.001, max_retries=2, read_timeout=5.0)
    cfg.update(kw)
    return cfg


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


def script(url, *actions):
    requests.post(url[:-3] + "/_script", json={"actions": list(actions)}).raise_for_status()


def requests_served(url):
    return requests.get(url[:-3] + "/_stats").json()["requests"]


@pytest.fixture
def server():
    proc, url = fake_openai.start("--models=fake-model")
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_offline_end_to_end(tmp_path):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 6), llm_url="offline")
    code, summary = run(cfg)
    pairs = lines(cfg["out"])
    assert code == 0 and summary["descriptions_done"] == 6 and len(pairs) == summary["total_pairs"] > 12
    assert len({p["id"] for p in pairs}) == len(pairs)
    rules = llm.load_taxonomy(cfg["taxonomy"])["rules"]
    for p in pairs:
        assert {"id", "video", "prompt", "chosen", "rejected", "category", "subcategory", "rule", "style",
                "query_type"} <= set(p)
        assert p["query_type"] == ("benign" if p["style"] == "benign_sensitive" else "harmful")
        assert rules[p["rule"]]["category"] == p["category"] and p["id"] == records.pair_id(p["description_id"],
                                                                                        p["prompt"])
        harmful = p["query_type"] == "harmful"
        assert llm.is_refusal(p["chosen"]) == harmful and llm.is_refusal(p["rejected"]) != harmful
    assert {p["style"] for p in pairs} == set(gp.ALL_STYLES)
    code, again = run(cfg)  # a rerun does nothing
    assert again["new_pairs"] == 0 and again["descriptions_done"] == 0 and len(lines(cfg["out"])) == len(pairs)


def test_kill9_twice_then_rerun_every_id_once(tmp_path):
    n, q = 200, 2
    log = tmp_path / "served.jsonl"
    proc, url = fake_openai.start(f"--key={KEY}", "--flaky=0.03", "--latency=0.01", f"--log={log}")
    try:
        out = tmp_path / "run" / "pairs.jsonl"
        cmd = [sys.executable, os.path.join(REPO, "generate_pairs.py"),
               f"--descriptions={write_descriptions(tmp_path / 'd.jsonl', n)}", f"--out={out}", f"--llm_url={url}",
               "--llm_model=fake-model", "--concurrency=4", f"--queries_per_video={q}", *FAST]
        env = dict(os.environ, OPENAI_API_KEY=KEY)
        done_file = str(out) + ".done.jsonl"
        marks = []  # (served-log length, done ids) at each kill
        for target in (30, 90):
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.time() + 60
            while time.time() < deadline and (not os.path.exists(done_file) or
                                              sum(1 for _ in open(done_file)) < target):
                assert p.poll() is None, p.stderr.read().decode()[-2000:]  # died or finished before the kill
                time.sleep(0.05)
            os.kill(p.pid, signal.SIGKILL)
            p.wait(timeout=60)
            marks.append((len(log.read_text().splitlines()), {r["id"] for r in records.read_records(done_file)}))
            assert len(marks[-1][1]) < n, "the run finished before it could be killed"
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    pairs = lines(out)
    ids = [p["id"] for p in pairs]
    assert len(ids) == len(set(ids)) == n * q  # fake verify passes and fake queries are distinct
    assert {r["id"] for r in records.read_records(done_file)} == {f"vid{i:04d}" for i in range(n)}
    served = [json.loads(x) for x in log.read_text().splitlines()]
    for start, done in marks:  # after each kill, nothing already done was served again
        again = [s for s in served[start:] if set(s["ids"]) & done]
        assert not again, f"{len(again)} requests for descriptions already done"
    for root, _, files in os.walk(tmp_path / "run"):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert KEY.encode() not in f.read(), f"the API key leaked into {name}"
    assert KEY not in r.stdout + r.stderr
    assert json.load(open(str(out) + ".config.json"))["llm_url"] == url


def test_malformed_and_failed_verification_recorded_and_skipped(tmp_path, server):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 3), llm_url=server,
                 llm_model="fake-model", concurrency=1, queries_per_video=2)
    bad_verdict = json.dumps({"chosen_follows_rule": False, "chosen_helpful": True, "rejected_worse": True,
                              "reason": "chosen gives the steps"})
    script(server, {}, {"content": "Sure! here are some questions: 1. ..."},  # vid0000: queries not JSON
           {}, {}, {"status": 400, "body": {"error": {"message": "context length exceeded"}}},  # vid0001 q1 chosen
           {}, {}, {"content": bad_verdict})  # vid0001 q2: verify fails
    code, summary = run(cfg)
    errors = lines(cfg["out"] + ".errors.jsonl")
    by_reason = {e["reason"]: e for e in errors}
    assert code == 0 and summary["descriptions_done"] == 3
    assert by_reason["bad_json"]["stage"] == "queries" and "here are some questions" in by_reason["bad_json"]["raw"]
    assert by_reason["http_400"]["stage"] == "chosen" and "context length" in by_reason["http_400"]["detail"]
    assert by_reason["verify_chosen_follows_rule"]["detail"] == "chosen gives the steps"
    pairs = lines(cfg["out"])
    assert sorted(p["description_id"] for p in pairs) == ["vid0002", "vid0002"]
    assert summary["drops"] == {"bad_json": 1, "http_400": 1, "verify_chosen_follows_rule": 1}
    assert summary["usage"]["chosen"]["prompt_tokens"] > 0


def test_401_exits_naming_the_variable_without_the_key(tmp_path):
    proc, url = fake_openai.start("--key=the-right-key")
    try:
        cmd = [sys.executable, os.path.join(REPO, "generate_pairs.py"), f"--llm_url={url}",
               f"--descriptions={write_descriptions(tmp_path / 'd.jsonl', 3)}", f"--out={tmp_path / 'p.jsonl'}"]
        r = subprocess.run(cmd, env=dict(os.environ, OPENAI_API_KEY=KEY), capture_output=True, text=True, timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr and KEY not in r.stderr + r.stdout


def test_breaker_stops_with_exit_3_and_rerun_resumes(tmp_path, server):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 8), llm_url=server,
                 llm_model="fake-model", concurrency=2, queries_per_video=1, max_retries=0, breaker=3)
    script(server, {}, {}, {}, {}, *[{"status": 503}] * 6)
    code, summary = run(cfg)
    assert code == 3 and summary["descriptions_left_for_rerun"] > 0
    served = requests_served(server)
    assert served < 20  # dispatch stopped
    requests.post(server[:-3] + "/_reset")  # the endpoint recovers
    code, summary = run(dict(cfg, breaker=20))
    assert code == 0 and len({r["id"] for r in records.read_records(cfg["out"] + ".done.jsonl")}) == 8


def test_long_retry_after_defers_the_description_to_a_rerun(tmp_path, server):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 2), llm_url=server,
                 llm_model="fake-model", concurrency=1, queries_per_video=2, retry_after_max=5.0)
    script(server, {}, {}, {"status": 429, "headers": {"Retry-After": "3600"}})  # vid0000's first chosen call
    code, summary = run(cfg)  # returns at once (a 3600 s wait would trip the test's timeout), work left: exit 3
    assert code == 3 and summary["descriptions_left_for_rerun"] == 1
    assert summary["drops"] == {"deferred": 1} and summary["new_pairs"] == 3  # vid0000 kept its other query
    code, summary = run(cfg)
    assert summary["descriptions_done"] == 1 and summary["new_pairs"] == 1 and summary["total_pairs"] == 4
    assert summary["usage"]["chosen"]["cached"] == 1  # the query already answered was not paid again
    assert len(lines(cfg["out"])) == 4


def test_dry_run_calls_nothing(tmp_path, server):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 5), llm_url=server,
                 dry_run=True, queries_per_video=3)
    code, summary = run(cfg)
    assert code == 0 and summary["calls"] == 5 * (2 + 3 * 3) and summary["prompt_tokens"] > 0
    assert summary["cost_usd"] > 0 and requests_served(server) == 0 and not os.path.exists(cfg["out"])


def test_rejected_from_policy_answers(tmp_path):
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 3), llm_url="offline")
    gp.run(cfg)
    pairs = lines(cfg["out"])
    answers = tmp_path / "answers.jsonl"
    with open(answers, "w") as f:  # the policy answered all but the first query, and always complied
        for p in pairs[1:]:
            f.write(json.dumps({"id": p["id"], "answer": "Sure, here is exactly how.", "model": "tiny"}) + "\n")
    cfg2 = dict(cfg, out=str(tmp_path / "onpolicy.jsonl"), rejected_from=str(answers))
    with pytest.raises(ValueError, match="set --heldout"):  # a policy round must say what is held out
        run(cfg2)
    cfg2["heldout"] = "none"
    code, summary = run(cfg2)
    onp = lines(cfg2["out"])
    assert summary["drops"]["no_policy_answer"] == 1
    harmful = [p for p in onp if p["query_type"] == "harmful"]
    assert harmful and all(p["rejected"] == "Sure, here is exactly how." and p["rejected_source"] == "policy:tiny"
                           for p in harmful)
    # a benign pair whose rejected (the policy's answer) is not an over-refusal fails verification
    assert not [p for p in onp if p["query_type"] == "benign"]
    assert summary["drops"].get("verify_rejected_worse", 0) == sum(p["query_type"] == "benign" for p in pairs[1:])


def test_dedup_and_ids():
    assert records.normalize_query("How do  I do THIS?!") == "how do i do this"
    assert records.pair_id("v1", "How do I do this?") == records.pair_id("v1", "how do i do this") \
        != records.pair_id("v2", "x")
    assert gp.near_duplicate("how did they do the jump in this clip", "how did they do the jump in the clip", 0.8)
    assert not gp.near_duplicate("how did they do the jump", "is this jump dangerous for kids", 0.8)
    tax = llm.load_taxonomy(os.path.join(REPO, "data/taxonomy.json"))
    tpl = gp.load_prompts(os.path.join(REPO, "data/prompts"))
    client = llm.Client("offline", "offline", offline=gp.offline_reply)
    desc = {"id": "vid0000", "video": "a.mp4", "description": "a rooftop jump challenge"}
    opts = dict(styles=list(gp.ALL_STYLES), queries_per_video=8, max_rules=1, temperature=0.7, max_tokens=100,
                seed=1, verify=True, dedup_threshold=0.8)
    res = gp.process(client, desc, tax, tpl, opts)  # 8 slots over 1 rule x 4 styles: each template twice
    reasons = sorted(d["reason"] for d in res["drops"])  # video_grounded differs by one word the second time
    assert len(res["pairs"]) == 4 and reasons == ["duplicate_query"] * 3 + ["near_duplicate_query"]


def test_shards_partition():
    ids = [f"vid{i:04d}" for i in range(100)]
    parts = [{i for i in ids if gp.in_shard(i, f"{k}/3")} for k in range(3)]
    assert sum(map(len, parts)) == 100 and set.union(*parts) == set(ids) and all(parts)


def test_config_errors_fail_before_any_work(tmp_path):
    d = write_descriptions(tmp_path / "d.jsonl", 2)
    with pytest.raises(ValueError, match="choose from"):
        gp.run(config(tmp_path, descriptions=d, llm_url="offline", styles="explicit,rude"))
    with pytest.raises(ValueError, match="shard"):
        gp.run(config(tmp_path, descriptions=d, llm_url="offline", shard="3/3"))
    with pytest.raises(FileNotFoundError, match="describe.py"):
        gp.run(config(tmp_path, descriptions=str(tmp_path / "none.jsonl"), llm_url="offline"))
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in gp.TEMPLATES:
        (prompts / f"{name}.txt").write_text("### user\nhello ${description}\n")
    (prompts / "verify.txt").write_text("### user\n${descripton}\n")
    with pytest.raises(ValueError, match="verify.txt.*descripton"):
        gp.run(config(tmp_path, descriptions=d, llm_url="offline", prompts=str(prompts)))
    assert not os.path.exists(tmp_path / "pairs.jsonl")


def test_taxonomy_is_complete_and_well_formed():
    with open(os.path.join(REPO, "data/taxonomy.json")) as f:
        raw = json.load(f)
    tax = llm.load_taxonomy(os.path.join(REPO, "data/taxonomy.json"))  # unique ids, required fields
    assert raw["version"]
    required = {"violence", "weapons", "self_harm", "dangerous_acts", "illegal_activity", "hate_harassment",
                "sexual_content", "privacy", "misinformation", "cybercrime", "extremism", "animal_cruelty"}
    assert required <= {c["id"] for c in raw["categories"]}
    ailuminate = {"vcr", "src", "cse", "ssh", "iwp", "ipv", "dfm", "ncr", "hte", "prv", "spc_ele", "spc_fin",
                  "spc_hlt", "sxc_prn"}
    for c in raw["categories"]:
        assert set(c["mlcommons"]) <= ailuminate, c["id"]
        for s in c["subcategories"]:
            assert s["id"].startswith(c["id"] + "."), s["id"]
    for rid, rule in tax["rules"].items():
        assert all(len(rule[k]) > 20 for k in ("refuse", "safe_help", "video_guidance")), rid
        assert rule["keywords"] and rule["examples"]["harmful"] and rule["examples"]["benign"], rid


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1", "http://127.0.0.1:/v1", "ftp://host/v1"])
def test_dead_or_mistyped_endpoint_fails_before_any_work(tmp_path, url):
    """Nothing listening (port 9), an empty port (once silently port 80), a wrong scheme: exit 2 from the preflight
    or the URL check, the summary says so, no description is marked done (issue: 40 s of retries, then exit 0)."""
    descriptions = write_descriptions(tmp_path / "d.jsonl", 3)
    out = tmp_path / "pairs.jsonl"
    r = subprocess.run([sys.executable, os.path.join(REPO, "generate_pairs.py"), f"--descriptions={descriptions}",
                        f"--out={out}", f"--llm_url={url}", "--llm_model=m"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, OPENAI_API_KEY="sk-test-secret"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert url.split("/")[2] in r.stderr and "sk-test-secret" not in r.stdout + r.stderr
    summary = json.loads((tmp_path / "pairs.jsonl.summary.json").read_text())
    assert summary["status"] == "config_error" and summary["exit_code"] == 2
    assert not (tmp_path / "pairs.jsonl.done.jsonl").exists() or not lines(str(out) + ".done.jsonl")


def test_on_policy_round_keeps_heldout_videos_out(tmp_path):
    """Round 1 splits by video; the policy answers the training pairs; round 2 (rejected_from + heldout) makes pairs
    on training videos only, each rejected = the policy's answer; answers to held-out items are refused."""
    cfg = config(tmp_path, descriptions=write_descriptions(tmp_path / "d.jsonl", 8), llm_url="offline", split=0.3)
    _, summary = run(cfg)
    train, held = lines(str(tmp_path / "pairs.train.jsonl")), lines(str(tmp_path / "pairs.heldout.jsonl"))
    assert train and held and summary["split"]["heldout_items"] == len(held)
    answers = tmp_path / "answers.jsonl"
    records.write_records(str(answers), [{"id": p["id"], "answer": f"Policy answer {k}.", "model": "tiny"}
                                         for k, p in enumerate(train)])
    cfg2 = dict(cfg, out=str(tmp_path / "round2.jsonl"), rejected_from=str(answers), split=0.0,
                heldout=str(tmp_path / "pairs.heldout.jsonl"))
    code, summary = run(cfg2)
    round2 = lines(cfg2["out"])
    held_videos = {it["video"] for it in held}
    assert code == 0 and round2 and not {p["video"] for p in round2} & held_videos
    by_id = {p["id"]: p for p in train}
    assert all(p["rejected"] == next(a for a in lines(str(answers)) if a["id"] == p["id"])["answer"]
               for p in round2 if p["id"] in by_id)
    leaky = tmp_path / "leaky.jsonl"
    records.write_records(str(leaky), lines(str(answers)) + [{"id": held[0]["id"], "answer": "x", "model": "tiny"}])
    with pytest.raises(ValueError, match="answers 1 held-out items"):
        run(dict(cfg2, out=str(tmp_path / "round3.jsonl"), rejected_from=str(leaky)))


def card_cmd(out, *args):
    """The Makefile's card step: the demo config, the pairs file, --card=True."""
    return subprocess.run([sys.executable, os.path.join(REPO, "generate_pairs.py"), "config/pairs_demo.py",
                           f"--out={out}", "--card=True", *args], capture_output=True, text=True, timeout=120)


def test_dataset_card_of_a_run_with_drops(tmp_path, server):
    """A run against the loopback server with a duplicate query, a failed verification and a malformed reply, then
    the card step as a subprocess: counts, drops and length statistics equal what this test recomputes from the
    pairs, errors and summary files; the plot is a PNG; the run's config and summary are left as they were."""
    dup = json.dumps({"queries": ["How exactly did they do this?", "how exactly did they do THIS",
                                  "Is this safe for children to watch?"]})
    bad_verdict = json.dumps({"chosen_follows_rule": False, "chosen_helpful": True, "rejected_worse": True,
                              "reason": "chosen gives the steps"})
    chosen = {"content": "No, I will not help with that.\nHere is a safer idea."}  # split() != split(" ")
    script(server, {}, {"content": dup}, chosen, {"content": "step " * 40}, {}, {}, {}, {"content": bad_verdict},
           {}, {"content": "Sure! here are some questions: 1. ..."},  # vid0000: 1 dup, 1 failed verify; vid0001: bad
           {"status": 503})  # JSON; vid0002: a transient failure (no retries here) that the rerun redoes
    out = tmp_path / "run" / "pairs.jsonl"
    cmd = [sys.executable, os.path.join(REPO, "generate_pairs.py"), f"--out={out}", f"--llm_url={server}",
           f"--descriptions={write_descriptions(tmp_path / 'd.jsonl', 5)}", "--llm_model=fake-model",
           "--concurrency=1", "--queries_per_video=3", *FAST, "--max_retries=0"]
    drops = Counter()  # what the two runs' summaries recorded
    for code in (3, 0):
        r = subprocess.run(cmd, env=dict(os.environ, OPENAI_API_KEY=KEY), capture_output=True, text=True, timeout=120)
        assert r.returncode == code, r.stderr[-2000:]
        drops.update(json.loads((tmp_path / "run" / "pairs.jsonl.summary.json").read_text())["drops"])
    run_files = {p: (tmp_path / "run" / p).read_bytes() for p in ("pairs.jsonl.config.json",
                                                                   "pairs.jsonl.summary.json")}
    served = requests_served(server)
    r = card_cmd(out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert requests_served(server) == served  # the card calls nothing
    assert all((tmp_path / "run" / p).read_bytes() == b for p, b in run_files.items())
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    pairs, errors = lines(out), lines(str(out) + ".errors.jsonl")
    summary = json.loads(run_files["pairs.jsonl.summary.json"])
    assert card["n"] == len(pairs) == summary["total_pairs"] == 3 * 3 + 1  # vid0000 keeps 1 pair, vid0001 none
    for field in ("category", "subcategory", "rule", "style", "query_type", "generator", "rejected_source"):
        assert card["counts"][field] == Counter(p[field] for p in pairs), field
    assert card["drops"] == Counter(e["reason"] for e in errors if not e["retryable"]) == \
        {"duplicate_query": 1, "verify_chosen_follows_rule": 1, "bad_json": 1}
    assert card["transient_failures"] == Counter(e["reason"] for e in errors if e["retryable"]) == {"http_5xx": 1}
    assert Counter(card["drops"]) + Counter(card["transient_failures"]) == drops and card["dedup"] == 1
    assert card["generator"] == {"fake-model": len(pairs)} and card["verifier"] == "fake-model"
    with open(os.path.join(REPO, "data", "taxonomy.json")) as f:
        assert card["taxonomy"]["version"] == json.load(f)["version"]
    for side in ("chosen", "rejected"):
        for unit, size in (("chars", len), ("words", lambda t: len(t.split()))):
            x = np.array([size(p[side]) for p in pairs])
            s = card["lengths"][f"{side}_{unit}"]
            assert [s["n"], s["min"], s["median"], s["p90"], s["max"]] == \
                [len(x), x.min(), np.median(x), np.percentile(x, 90), x.max()], (side, unit)
    png = tmp_path / "run" / "card_categories.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    assert plt.imread(str(png)).shape[:2] > (100, 100)  # decodes as an image
    md = (tmp_path / "run" / "DATASET_CARD.md").read_text()
    assert "same as the source videos and generator terms; set --license" in md and "(card_categories.png)" in md
    assert f"{len(pairs)} preference pairs" in md and "| duplicate_query | 1 |" in md
    r = card_cmd(out, "--license=CC BY 4.0")
    assert r.returncode == 0 and "Licence: **CC BY 4.0**" in (tmp_path / "run" / "DATASET_CARD.md").read_text()


def test_dataset_card_of_safevid350k_import_and_missing_pairs(tmp_path):
    """Pairs imported from SafeVid-350K get its licence and the importer's skipped records as drops; a pairs file
    that is not there exits 2 with one line naming it, and writes nothing."""
    good = {"video": "videos/a.mp4", "prompt": "How do I hit him like in the clip?", "chosen": "I can't help.",
            "rejected": "Aim for the head.", "category": "Violence"}
    src = tmp_path / "src" / "train.jsonl"
    src.parent.mkdir()
    src.write_text("\n".join(json.dumps(r) for r in [good, good, dict(good, prompt="Is this fight dangerous?"),
                                                       dict(good, chosen="")]) + "\n")
    out = tmp_path / "sv" / "pairs.jsonl"
    r = subprocess.run([sys.executable, os.path.join(REPO, "data", "safevid350k", "prepare.py"), f"--src={src}",
                        f"--out={out}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    r = card_cmd(out)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((tmp_path / "sv" / "card.json").read_text())
    imported = json.loads((tmp_path / "sv" / "pairs.jsonl.summary.json").read_text())
    assert card["n"] == 2 and card["counts"]["source"] == {"safevid-350k": 2}
    assert card["drops"] == {"import_" + k: v for k, v in imported["malformed"].items()} | \
        {"import_duplicate": imported["duplicate"]} == {"import_missing_chosen": 1, "import_duplicate": 1}
    assert card["generator"] == card["verifier"] == "not recorded"
    assert "Licence: **CC BY-NC-SA 4.0" in (tmp_path / "sv" / "DATASET_CARD.md").read_text()
    r = card_cmd(tmp_path / "none" / "pairs.jsonl")
    assert r.returncode == 2 and "pairs file" in r.stderr and "not found" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "none").exists()
